#!/usr/bin/env bash
# Builds the pinned local control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd, kwok) from the Go module proxy into DEST (default .tools/bin). Each binary is pinned by the
# go.mod/go.sum of its module under hack/k8s/. Next to each binary, .NAME.stamp records a hash of
# what it was built from (go.mod, go.sum, -ldflags, GOFLAGS, Go version, CGO_ENABLED, GOOS/GOARCH);
# a binary whose stamp matches is left alone, so a second run costs seconds, and any change of
# those inputs rebuilds it. CGO_ENABLED is taken from the environment as before (the binaries may
# link libc dynamically): static linking is left alone, since changing it rebuilds everything.
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

pinned() {
  (cd "$here/$1" && go list -m -f '{{.Version}}' "$2") \
    || { echo "error: cannot resolve $2 in module hack/k8s/$1 (Go module proxy unreachable and not in the module cache?); go's message is above" >&2; return 1; }
}

# The hash of what MODULE_DIR's binaries are built from with LDFLAGS (the Go version as selected
# inside the module, which may ask for a newer toolchain).
inputs() {
  (cd "$here/$1" && { cat go.mod go.sum; echo "ldflags=$2"; echo "GOFLAGS=$GOFLAGS"
                      go env GOVERSION CGO_ENABLED GOOS GOARCH; }) | sha256sum | cut -d' ' -f1
}

current() { [[ -x "$dest/$1" && "$(cat "$dest/.$1.stamp" 2>/dev/null)" == "$2" ]]; }

# Builds each NAME=PACKAGE of MODULE_DIR into a scratch dir, then moves them into DEST and writes
# their stamps, so an interrupted build never leaves a half-written or wrongly stamped binary.
build() {
  local module_dir=$1 ldflags=$2 hash=$3; shift 3
  local scratch; scratch=$(mktemp -d "$dest/.build.XXXXXX")
  trap 'rm -rf "$scratch"' RETURN
  local target
  for target in "$@"; do
    (cd "$here/$module_dir" && go build -ldflags "$ldflags" -o "$scratch/${target%%=*}" "${target#*=}") \
      || { echo "error: building ${target%%=*} in module hack/k8s/$module_dir failed; go's message is above" >&2; return 1; }
  done
  for target in "$@"; do
    mv -f "$scratch/${target%%=*}" "$dest/"
    echo "$hash" > "$dest/.${target%%=*}.stamp"
  done
}

k8s=$(pinned kubernetes k8s.io/kubernetes)           # v1.35.4
minor=${k8s#v1.}; minor=${minor%%.*}
# What release builds stamp (hack/lib/version.sh), so /version and --version tell the truth.
# The module proxy does not carry the release commit, so gitCommit is left empty.
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  version_flags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
done
ldflags="-s -w$version_flags"
hash=$(inputs kubernetes "$ldflags")
if ! { current kube-apiserver "$hash" && current kube-controller-manager "$hash" && current kube-scheduler "$hash"; }; then
  echo "building kube-apiserver kube-controller-manager kube-scheduler $k8s" >&2
  build kubernetes "$ldflags" "$hash" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler
fi

etcd=$(pinned etcd go.etcd.io/etcd/server/v3)        # v3.6.x
ldflags="-s -w"
hash=$(inputs etcd "$ldflags")
if ! current etcd "$hash"; then
  echo "building etcd $etcd" >&2
  build etcd "$ldflags" "$hash" etcd=go.etcd.io/etcd/server/v3
fi

kwok=$(pinned kwok sigs.k8s.io/kwok)                 # v0.8.x
ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok#v}"
hash=$(inputs kwok "$ldflags")
if ! current kwok "$hash"; then
  echo "building kwok $kwok" >&2
  build kwok "$ldflags" "$hash" kwok=sigs.k8s.io/kwok/cmd/kwok
fi
