#!/usr/bin/env bash
# Build the rmjob images with podman where no registry is reachable (CI, `make images`):
# images/operator/Dockerfile and images/trainer/Dockerfile, unchanged, on a Debian bookworm base
# made by debootstrap; the trainer as its CPU variant (VARIANT=cpu, torch from PyPI).
#
#   hack/images/build.sh [operator] [trainer]        (default: both)
#
# Environment:
#   IMAGE_TAG       tag of the built images (default: dev); the images are
#                   localhost/rmjob-operator:$IMAGE_TAG and localhost/rmjob-trainer:$IMAGE_TAG-cpu
#   IMAGES_DIR      the directory holding operator/Dockerfile and trainer/Dockerfile (default: images)
#   CA_BUNDLE       a CA bundle pip must trust, e.g. a TLS-intercepting proxy's; given to the
#                   builds as the secret `ca-bundle` (default: /etc/ssl/certs/ca-certificates.crt
#                   when it exists; empty: pip's own bundle)
#   DEBIAN_MIRROR   the mirror debootstrap uses (default: http://deb.debian.org/debian)
#
# Layers are cached (podman's layer cache) and so are pip's downloads (a build cache mount):
# a rebuild without changes takes seconds, one after a code change only redoes the project layer.
set -euo pipefail

cd "$(dirname "$0")/../.."
IMAGE_TAG=${IMAGE_TAG:-dev}
IMAGES_DIR=${IMAGES_DIR:-images}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
[[ -e $CA_BUNDLE ]] || CA_BUNDLE=
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_BASE=localhost/debian:bookworm
PYTHON_BASE=localhost/rmjob-python:3.11-bookworm
# chroot isolation: no user namespaces or OCI runtime needed, so builds work inside containers.
# Docker's image format: the OCI one has no SHELL, and the trainer's RUN lines rely on pipefail.
BUILD=(podman build --isolation chroot --layers --format docker)

die() { echo "hack/images/build.sh: $*" >&2; exit 1; }

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer)
for target in "${targets[@]}"; do
    [[ $target == operator || $target == trainer ]] || die "unknown image '$target' (expected operator or trainer)"
done

ensure_tools() {
    command -v podman >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null && return
    [[ $(id -u) == 0 ]] || die "podman, buildah and debootstrap are missing; install them (Debian: apt-get install podman buildah debootstrap) or run as root"
    echo "installing podman, buildah, debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap
}

ensure_debian_base() {
    podman image exists "$DEBIAN_BASE" && return
    local rootfs
    rootfs=$(mktemp -d /var/tmp/rmjob-debootstrap.XXXXXX)
    trap 'rm -rf "$rootfs"' RETURN
    echo "debootstrapping $DEBIAN_BASE from $DEBIAN_MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    tar -C "$rootfs" -c . | podman import --quiet - "$DEBIAN_BASE" >/dev/null
}

secret_args=()
if [[ -n $CA_BUNDLE ]]; then
    secret_args=(--secret "id=ca-bundle,src=$CA_BUNDLE" --build-arg PIP_CERT=/run/secrets/ca-bundle)
fi

build() {  # build NAME TAG DOCKERFILE [podman build args...]
    local name=$1 tag=$2 dockerfile=$3 start=$SECONDS
    shift 3
    [[ -f $dockerfile ]] || die "no Dockerfile at $dockerfile"
    echo "building $tag from $dockerfile"
    local previous
    previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    "${BUILD[@]}" -f "$dockerfile" -t "$tag" "$@" . || die "building $name ($dockerfile) failed"
    local size
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    echo "built $tag in $((SECONDS - start)) s, $((size / 1000000)) MB"
    # The image this one replaces, with the layers only it used: each rebuild would leave them
    # behind (after a Dockerfile change, the trainer's 6.5 GB). podman refuses while anything
    # still uses it (a working container, another tag), and then it stays.
    if [[ -n $previous && $previous != "$(podman image inspect --format '{{.Id}}' "$tag")" ]]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
}

build_operator() {
    build python-base "$PYTHON_BASE" hack/images/python-base.Containerfile --build-arg BASE_IMAGE="$DEBIAN_BASE"
    build operator "localhost/rmjob-operator:$IMAGE_TAG" "$IMAGES_DIR/operator/Dockerfile" \
        --build-arg PYTHON_IMAGE="$PYTHON_BASE" "${secret_args[@]}"
}

build_trainer() {
    # PyPI's torch wheel is its CUDA build (with the nvidia-* wheels); it runs on CPU too.
    build trainer "localhost/rmjob-trainer:$IMAGE_TAG-cpu" "$IMAGES_DIR/trainer/Dockerfile" \
        --build-arg BASE_IMAGE="$DEBIAN_BASE" --build-arg VARIANT=cpu \
        --build-arg TORCH_INDEX=https://pypi.org/simple "${secret_args[@]}"
}

locked() {  # locked NAME COMMAND...: one at a time per NAME on this machine
    # Concurrent runs (parallel test workers) would debootstrap twice or build the same image
    # twice; the second one waits, then reuses the first one's layers.
    local name=$1
    shift
    ( flock 9; "$@" ) 9>"/var/tmp/rmjob-images-$name.lock"
}

ensure_tools
locked debian-base ensure_debian_base
for target in "${targets[@]}"; do
    locked "$target" "build_$target"
done
