#!/usr/bin/env bash
# Smoke test of the container: build it (unless --no-build), run it on the example case in each input layout
# (VALDO 2021, grand-challenge sockets, plain folder), and check the outputs: file names, geometry equal to the
# input, binary values, results.json, and the detected CMBs against the example's reference.
# Exits non-zero and prints what differed on any difference.
#   ./test.sh [--no-build] [--method three-stage|nnunet|ensemble] [--layouts "valdo2021 gc folder"]
#   CMB_ENGINE, CMB_IMAGE, CMB_BASE_IMAGE as for build.sh; CMB_GPU=1 passes the GPU in (docker/podman).
set -euo pipefail
cd "$(dirname "$0")"
IMAGE="${CMB_IMAGE:-valdocmb:latest}"
METHOD="${CMB_METHOD:-three-stage}"
BUILD=1
LAYOUTS="valdo2021 gc folder"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --method) METHOD="$2"; shift ;;
        --layouts) LAYOUTS="$2"; shift ;;
        *) echo "test.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z "${CMB_ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then CMB_ENGINE=docker
    elif command -v podman >/dev/null && podman run --rm "$IMAGE" --help >/dev/null 2>&1; then CMB_ENGINE=podman
    elif command -v buildah >/dev/null; then CMB_ENGINE=buildah
    else echo "test.sh: no container engine found" >&2; exit 2; fi
fi
export CMB_ENGINE
if [[ $BUILD == 1 ]]; then ./build.sh; fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/valdocmb-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
chmod 777 "$WORK"

# run_in_image MOUNTS... -- COMMAND...   (COMMAND empty: the image's entrypoint)
run_in_image() {
    local mounts=()
    while [[ "$1" != "--" ]]; do mounts+=(-v "$1"); shift; done
    shift
    case "$CMB_ENGINE" in
        docker|podman)
            local gpu=()
            [[ "${CMB_GPU:-0}" == 1 ]] && gpu=(--gpus all)
            local entry=()
            [[ $# -gt 0 ]] && { entry=(--entrypoint "$1"); shift; }
            "$CMB_ENGINE" run --rm --network none "${gpu[@]}" -e CMB_METHOD="$METHOD" "${mounts[@]}" "${entry[@]}" \
                "$IMAGE" "$@" ;;
        buildah)
            # no daemon: run through buildah (chroot isolation; no network isolation, the code refuses to connect)
            local ctr rc=0
            ctr="$(buildah from --quiet "$IMAGE")"
            if [[ $# -eq 0 ]]; then
                read -r -a cmd <<< "$(buildah inspect --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$ctr")"
                set -- "${cmd[@]}"
            fi
            buildah run --isolation chroot --env CMB_METHOD="$METHOD" "${mounts[@]}" "$ctr" -- "$@" || rc=$?
            buildah rm "$ctr" >/dev/null
            return $rc ;;
    esac
}

status=0
run_in_image "$PWD/tests:/tests:ro" "$WORK:/work" -- python /tests/container/check.py prepare /tests/data/example /work
chmod -R a+rwX "$WORK"
for layout in $LAYOUTS; do
    echo "== $layout: $METHOD" >&2
    start=$(date +%s)
    if ! run_in_image "$WORK/$layout/input:/input:ro" "$WORK/$layout/output:/output" --; then
        echo "DIFFERENCE $layout: the container exited non-zero" >&2
        status=1
    fi
    echo "   container run: $(( $(date +%s) - start )) s" >&2
    run_in_image "$PWD/tests:/tests:ro" "$WORK:/work:ro" -- \
        python /tests/container/check.py check "$layout" "$METHOD" /tests/data/example /work || status=1
done
if [[ $status == 0 ]]; then echo "test.sh: all layouts passed ($METHOD, $IMAGE)"; else echo "test.sh: FAILED" >&2; fi
exit $status
