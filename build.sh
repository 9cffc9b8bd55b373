#!/usr/bin/env bash
# Build the container image with whichever engine is here: docker (with a reachable daemon), else podman, else
# buildah.
#   CMB_ENGINE=docker|podman|buildah   force an engine
#   CMB_IMAGE=name:tag                 image tag (default valdocmb:latest)
#   CMB_BASE_IMAGE=image               base image (default: the Dockerfile's, python:3.11-slim-bookworm)
# Extra arguments go to the engine's build command.
set -euo pipefail
cd "$(dirname "$0")"
IMAGE="${CMB_IMAGE:-valdocmb:latest}"

pick_engine() {
    if [[ -n "${CMB_ENGINE:-}" ]]; then echo "$CMB_ENGINE"; return; fi
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
    if command -v podman >/dev/null; then echo podman; return; fi
    if command -v buildah >/dev/null; then echo buildah; return; fi
    echo "build.sh: no container engine (docker with a daemon, podman or buildah) found" >&2
    exit 2
}
ENGINE="$(pick_engine)"
build_args=()
[[ -n "${CMB_BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=${CMB_BASE_IMAGE}")

case "$ENGINE" in
    docker)
        exec docker build "${build_args[@]}" -t "$IMAGE" "$@" . ;;
    podman|buildah)
        # Without a daemon, RUN steps use chroot isolation. pip inside them verifies TLS with the host's CA bundle
        # when the host has one (machines behind an intercepting proxy need that).
        mounts=()
        if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
            pip_conf="$(mktemp)"
            trap 'rm -f "$pip_conf"' EXIT
            printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$pip_conf"
            chmod 644 "$pip_conf"
            mounts+=(-v /etc/ssl/certs:/etc/ssl/certs:ro -v "$pip_conf:/etc/pip.conf:ro")
        fi
        if [[ "$ENGINE" == podman ]]; then
            podman build --isolation chroot "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" "$@" .
        else
            buildah bud --isolation chroot "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" "$@" .
        fi ;;
    *)
        echo "build.sh: unknown engine '$ENGINE' (docker, podman or buildah)" >&2; exit 2 ;;
esac
echo "built $IMAGE with $ENGINE" >&2
