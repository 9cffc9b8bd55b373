#!/usr/bin/env bash
# Build the container image with whichever engine is here: docker (with a reachable daemon), else podman, else
# buildah.
#   CMB_API_METHOD=exec|invoke         grand-challenge container mode (default exec; sets the image's label)
#   CMB_TORCH_VARIANT=cu128|cu126|cu130|pypi|cpu
#                                      torch build (default cu128; see the Dockerfile and docs/container.md)
#   CMB_IMAGE=name:tag                 image tag (default valdocmb:latest, valdocmb:invoke for invoke mode,
#                                      with -cpu appended for the CPU variant)
#   CMB_BASE_IMAGE=image               base image (default: the Dockerfile's, python:3.11-slim-bookworm)
#   CMB_WHEELS=DIR                     a local folder of wheels pip may use (podman/buildah: mounted into the build)
#   CMB_ENGINE=docker|podman|buildah   force an engine
# Extra arguments go to the engine's build command.
set -euo pipefail
cd "$(dirname "$0")"
API_METHOD="${CMB_API_METHOD:-exec}"
VARIANT="${CMB_TORCH_VARIANT:-cu128}"
case "$API_METHOD" in exec|invoke) ;; *) echo "build.sh: CMB_API_METHOD=$API_METHOD: exec or invoke" >&2; exit 2 ;; esac
default_tag="$([[ $API_METHOD == invoke ]] && echo invoke || echo latest)$([[ $VARIANT == cpu ]] && echo -cpu || true)"
IMAGE="${CMB_IMAGE:-valdocmb:$default_tag}"

pick_engine() {
    if [[ -n "${CMB_ENGINE:-}" ]]; then echo "$CMB_ENGINE"; return; fi
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
    if command -v podman >/dev/null; then echo podman; return; fi
    if command -v buildah >/dev/null; then echo buildah; return; fi
    echo "build.sh: no container engine (docker with a daemon, podman or buildah) found" >&2
    exit 2
}
ENGINE="$(pick_engine)"
build_args=(--build-arg "API_METHOD=$API_METHOD" --build-arg "TORCH_VARIANT=$VARIANT")
[[ -n "${CMB_BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=${CMB_BASE_IMAGE}")
echo "building $IMAGE ($API_METHOD mode, torch variant $VARIANT) with $ENGINE" >&2

case "$ENGINE" in
    docker)
        if [[ -n "${CMB_WHEELS:-}" ]]; then
            echo "build.sh: CMB_WHEELS needs podman or buildah (docker build cannot mount a folder)" >&2; exit 2
        fi
        docker build "${build_args[@]}" -t "$IMAGE" "$@" . ;;
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
        if [[ -n "${CMB_WHEELS:-}" ]]; then
            mounts+=(-v "$(cd "$CMB_WHEELS" && pwd):/wheels:ro")
            build_args+=(--build-arg PIP_FIND_LINKS=/wheels)
        fi
        # --layers: the exec and invoke images share every layer but the last few, so the second build is quick.
        # buildah/podman's layer cache ignores a changed build argument (ARG API_METHOD would come back from the
        # cache with the other mode's value), so the mode's label and variable are also set on the final image.
        mode=(--label "org.grand-challenge.api-method=$API_METHOD" --env "CMB_API_METHOD=$API_METHOD")
        if [[ "$ENGINE" == podman ]]; then
            podman build --layers --isolation chroot "${mounts[@]}" "${build_args[@]}" "${mode[@]}" -t "$IMAGE" "$@" .
        else
            buildah bud --layers --isolation chroot "${mounts[@]}" "${build_args[@]}" "${mode[@]}" -t "$IMAGE" "$@" .
        fi ;;
    *)
        echo "build.sh: unknown engine '$ENGINE' (docker, podman or buildah)" >&2; exit 2 ;;
esac
echo "built $IMAGE with $ENGINE" >&2
