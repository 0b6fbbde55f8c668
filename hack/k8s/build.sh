#!/usr/bin/env bash
# Builds the pinned local control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd, kwok) from the Go module proxy into DEST (default .tools/bin). Each binary is pinned by the
# go.mod/go.sum of its module under hack/k8s/; one whose --version already reports the pinned
# version is left alone, so a second run costs seconds.
#
#   hack/k8s/build.sh [DEST]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-.tools/bin}
command -v go >/dev/null || { echo "error: go is not on PATH; it is needed to build the local Kubernetes control plane into $dest" >&2; exit 1; }
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# Module downloads go to the shared cache; a newer toolchain is fetched only if a module asks for one.
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto} GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"

pinned() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }

# True when DEST/BINARY --version prints a line starting with the word(s) WANT (the pinned version).
current() { [[ -x "$dest/$1" ]] && "$dest/$1" --version 2>/dev/null | grep -q -- "^${2//./\\.}\b"; }

# Builds each NAME=PACKAGE of MODULE_DIR into a scratch dir, then moves them into DEST, so an
# interrupted build never leaves a half-written binary behind.
build() {
  local module_dir=$1 ldflags=$2; shift 2
  local scratch; scratch=$(mktemp -d "$dest/.build.XXXXXX")
  trap 'rm -rf "$scratch"' RETURN
  local target
  for target in "$@"; do
    (cd "$here/$module_dir" && go build -ldflags "$ldflags" -o "$scratch/${target%%=*}" "${target#*=}")
  done
  for target in "$@"; do mv -f "$scratch/${target%%=*}" "$dest/"; done
}

k8s=$(pinned kubernetes k8s.io/kubernetes)           # v1.35.4
if ! { current kube-apiserver "Kubernetes $k8s" && current kube-controller-manager "Kubernetes $k8s" \
       && current kube-scheduler "Kubernetes $k8s"; }; then
  minor=${k8s#v1.}; minor=${minor%%.*}
  # What release builds stamp (hack/lib/version.sh), so /version and --version tell the truth.
  # The module proxy does not carry the release commit, so gitCommit is left empty.
  stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
  done
  echo "building kube-apiserver kube-controller-manager kube-scheduler $k8s" >&2
  build kubernetes "-s -w$stamp" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler
fi

etcd=$(pinned etcd go.etcd.io/etcd/server/v3)        # v3.6.x
if ! current etcd "etcd Version: ${etcd#v}"; then
  echo "building etcd $etcd" >&2
  build etcd "-s -w" etcd=go.etcd.io/etcd/server/v3
fi

kwok=$(pinned kwok sigs.k8s.io/kwok)                 # v0.8.x
if ! current kwok "kwok version $kwok"; then
  echo "building kwok $kwok" >&2
  build kwok "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok#v}" kwok=sigs.k8s.io/kwok/cmd/kwok
fi
