#!/usr/bin/env bash
# Smoke test of the containers the way grand-challenge runs them: build both modes' images (unless --no-build), then
# run each method on the example case in each input layout (VALDO 2021, grand-challenge sockets, plain folder) and
# check the outputs: file names, geometry equal to the input, binary values, results.json, the weights used, and the
# detected CMBs against the example's reference. Exits non-zero and prints what differed on any difference.
#
# The platform's restrictions hold for every run: no network, /input read-only, the model tarball from export.sh
# unpacked read-only at /opt/ml/model (the container must use it), a separate empty /tmp, the image's non-root user.
#   exec mode:   one container per case and layout.
#   invoke mode: one container per method, kept up; the input folder is filled with one layout's case after the
#                other and each is invoked in turn (the second and later invocations run with the model loaded).
#
#   ./test.sh [--no-build] [--methods "three-stage nnunet"] [--modes "exec invoke"] [--layouts "valdo2021 gc folder"]
#   CMB_ENGINE, CMB_BASE_IMAGE, CMB_TORCH_VARIANT, CMB_WHEELS as for build.sh; CMB_IMAGE / CMB_INVOKE_IMAGE name the
#   two images (default valdocmb:latest / valdocmb:invoke, -cpu appended for the CPU variant); CMB_GPU=1 passes the
#   GPU in (docker/podman).
set -euo pipefail
cd "$(dirname "$0")"
BUILD=1
METHODS="three-stage nnunet"
MODES="exec invoke"
LAYOUTS="valdo2021 gc folder"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --method|--methods) METHODS="$2"; shift ;;
        --modes) MODES="$2"; shift ;;
        --layouts) LAYOUTS="$2"; shift ;;
        *) echo "test.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
suffix="$([[ "${CMB_TORCH_VARIANT:-}" == cpu ]] && echo -cpu || true)"
declare -A IMAGES=([exec]="${CMB_IMAGE:-valdocmb:latest$suffix}" [invoke]="${CMB_INVOKE_IMAGE:-valdocmb:invoke$suffix}")
PORT="${CMB_PORT:-4743}"

if [[ -z "${CMB_ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then CMB_ENGINE=docker
    elif command -v podman >/dev/null && podman run --rm "${IMAGES[exec]}" --help >/dev/null 2>&1; then CMB_ENGINE=podman
    elif command -v buildah >/dev/null; then CMB_ENGINE=buildah
    else echo "test.sh: no container engine found" >&2; exit 2; fi
fi
export CMB_ENGINE
status=0
summary=()

label_of() {
    case "$CMB_ENGINE" in
        docker|podman) "$CMB_ENGINE" image inspect --format '{{index .Config.Labels "org.grand-challenge.api-method"}}' "$1" ;;
        buildah) buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.grand-challenge.api-method"}}' "$1" ;;
    esac
}
for mode in $MODES; do
    if [[ $BUILD == 1 ]]; then CMB_API_METHOD=$mode CMB_IMAGE="${IMAGES[$mode]}" ./build.sh; fi
    label="$(label_of "${IMAGES[$mode]}")"
    if [[ "$label" != "$mode" ]]; then
        echo "DIFFERENCE ${IMAGES[$mode]}: label org.grand-challenge.api-method is '$label', not '$mode'" >&2
        status=1
    fi
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/valdocmb-test.XXXXXX")"
NETNS_PID=""
cleanup() {
    [[ -n "$NETNS_PID" ]] && kill "$NETNS_PID" 2>/dev/null
    rm -rf "$WORK" 2>/dev/null || echo "test.sh: $WORK holds files the containers' user wrote; remove them as root" >&2
}
trap cleanup EXIT
chmod 777 "$WORK"

# buildah (no daemon) runs containers in the host's network; give them a private network namespace with only a
# loopback instead, as --network none does (needs root; without it the code's own refusal to connect remains)
netns=()
if [[ "$CMB_ENGINE" == buildah ]]; then
    unshare --net --fork sleep infinity 2>/dev/null &
    NETNS_PID=$!
    sleep 0.5
    if kill -0 "$NETNS_PID" 2>/dev/null && nsenter --net="/proc/$NETNS_PID/ns/net" ip link set lo up 2>/dev/null; then
        netns=(nsenter --net="/proc/$NETNS_PID/ns/net")
    else
        echo "test.sh: no private network namespace (not root?): containers share the host's network" >&2
    fi
fi

# the model tarball as grand-challenge unpacks it
./export.sh --model-only "$WORK/export" 2>/dev/null
mkdir -p "$WORK/model"
tar -xzf "$WORK/export/model.tar.gz" -C "$WORK/model"
chmod -R a+rX "$WORK/model"

fresh_tmp() {  # a new, empty /tmp for each container
    local dir
    dir="$(mktemp -d "$WORK/tmp.XXXXXX")"
    chmod 1777 "$dir"
    echo "$dir"
}

# start_container NAME IMAGE METHOD MOUNTS... [-- COMMAND...]: detached; empty COMMAND runs the image's entrypoint
start_container() {
    local name="$1" image="$2" method="$3"
    shift 3
    local mounts=(-v "$WORK/model:/opt/ml/model:ro" -v "$(fresh_tmp):/tmp")
    while [[ $# -gt 0 && "$1" != "--" ]]; do mounts+=(-v "$1"); shift; done
    [[ $# -gt 0 ]] && shift
    case "$CMB_ENGINE" in
        docker|podman)
            local extra=()
            [[ "${CMB_GPU:-0}" == 1 ]] && extra+=(--gpus all)
            [[ $# -gt 0 ]] && { extra+=(--entrypoint "$1"); shift; }
            "$CMB_ENGINE" run -d --name "$name" --network none "${extra[@]}" -e CMB_METHOD="$method" -e CMB_PORT="$PORT" \
                "${mounts[@]}" "$image" "$@" >/dev/null ;;
        buildah)
            local ctr
            ctr="$(buildah from --quiet --name "$name" "$image")"
            if [[ $# -eq 0 ]]; then
                read -r -a cmd <<< "$(buildah inspect --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$ctr")"
                set -- "${cmd[@]}"
            fi
            "${netns[@]}" buildah run --isolation chroot --env CMB_METHOD="$method" --env CMB_PORT="$PORT" \
                "${mounts[@]}" "$ctr" -- "$@" > "$WORK/$name.log" 2>&1 &
            echo $! > "$WORK/$name.pid" ;;
    esac
}

# wait_container NAME: its exit status; then removes it
wait_container() {
    local name="$1" rc=0
    case "$CMB_ENGINE" in
        docker|podman)
            rc="$("$CMB_ENGINE" wait "$name")"
            "$CMB_ENGINE" logs "$name" >&2 || true
            "$CMB_ENGINE" rm "$name" >/dev/null ;;
        buildah)
            wait "$(cat "$WORK/$name.pid")" || rc=$?
            cat "$WORK/$name.log" >&2
            buildah rm "$name" >/dev/null ;;
    esac
    return "$rc"
}

# exec_in NAME COMMAND...: a command beside a running container, in its network (the platform's shim does this)
exec_in() {
    local name="$1"
    shift
    case "$CMB_ENGINE" in
        docker|podman) "$CMB_ENGINE" exec -e CMB_PORT="$PORT" "$name" "$@" ;;
        buildah)
            local ctr rc=0
            ctr="$(buildah from --quiet "$(buildah inspect --format '{{.FromImageID}}' "$name")")"
            "${netns[@]}" buildah run --isolation chroot --env CMB_PORT="$PORT" -v "$PWD/tests:/tests:ro" "$ctr" -- "$@" || rc=$?
            buildah rm "$ctr" >/dev/null
            return $rc ;;
    esac
}

stop_container() {
    local name="$1"
    case "$CMB_ENGINE" in
        docker|podman) "$CMB_ENGINE" stop -t 10 "$name" >/dev/null; wait_container "$name" || true ;;
        buildah)
            # chroot isolation: the server is a process of this machine; SIGTERM it as the platform would
            pkill -TERM -f "^(/opt/venv/bin/)?python3? /opt/app/process\.py" || true
            wait_container "$name" || true ;;
    esac
}

# run_once IMAGE MOUNTS... -- COMMAND...: a command in a throwaway container, waited for
run_once() {
    local image="$1" name="valdocmb-test-$RANDOM"
    shift
    start_container "$name" "$image" "" "$@"
    wait_container "$name"
}

check() {  # check LAYOUT METHOD OUTPUT_DIR: the outputs in OUTPUT_DIR, mounted where check.py looks for them
    run_once "${IMAGES[exec]}" "$PWD/tests:/tests:ro" "$WORK:/work:ro" "$3:/work/$1/output:ro" -- \
        python /tests/container/check.py check "$1" "$2" /tests/data/example /work --weights-folder /opt/ml/model
}

run_once "${IMAGES[exec]}" "$PWD/tests:/tests:ro" "$WORK:/work" -- python /tests/container/check.py prepare /tests/data/example /work
chmod -R a+rwX "$WORK"

for method in $METHODS; do
    if [[ " $MODES " == *" exec "* ]]; then
        for layout in $LAYOUTS; do
            echo "== exec, $method, $layout" >&2
            output="$WORK/runs/exec-$method-$layout"  # a new folder per run: the container's files are not ours
            mkdir -p -m 777 "$output"
            start=$(date +%s)
            name="valdocmb-exec-$RANDOM"
            start_container "$name" "${IMAGES[exec]}" "$method" "$WORK/$layout/input:/input:ro" "$output:/output"
            if ! wait_container "$name"; then
                echo "DIFFERENCE exec $method $layout: the container exited non-zero" >&2
                status=1
            fi
            seconds=$(( $(date +%s) - start ))
            summary+=("exec    $method $layout: ${seconds} s (container start to exit, model load included)")
            check "$layout" "$method" "$output" || status=1
        done
    fi
    if [[ " $MODES " == *" invoke "* ]]; then
        echo "== invoke, $method: one container for: $LAYOUTS" >&2
        staging="$WORK/invoke-$method"
        mkdir -m 777 -p "$staging/input" "$staging/output"
        name="valdocmb-invoke-$RANDOM"
        start=$(date +%s)
        start_container "$name" "${IMAGES[invoke]}" "$method" "$staging/input:/input:ro" "$staging/output:/output" \
            "$PWD/tests:/tests:ro"
        if ! exec_in "$name" python /tests/container/invoke.py health 300; then
            echo "DIFFERENCE invoke $method: the server never answered /health" >&2
            status=1
            stop_container "$name"
            continue
        fi
        summary+=("invoke  $method: healthy $(( $(date +%s) - start )) s after start (model loaded, networks warmed)")
        number=0
        for layout in $LAYOUTS; do
            number=$((number + 1))
            # the platform puts each case under /input; /output is left as the previous invocation left it, so
            # the server itself must keep the invocations apart
            rm -rf "${staging:?}/input/"* && cp -r "$WORK/$layout/input/." "$staging/input/" && chmod -R a+rX "$staging/input"
            start=$(date +%s)
            if ! exec_in "$name" python /tests/container/invoke.py invoke; then
                echo "DIFFERENCE invoke $method $layout: /invoke did not answer 201" >&2
                status=1
            fi
            summary+=("invoke  $method $layout: invocation $number: $(( $(date +%s) - start )) s")
            output="$WORK/runs/invoke-$method-$layout"  # what /output held after this invocation
            mkdir -p "$output" && cp -r "$staging/output/." "$output/"
            check "$layout" "$method" "$output" || status=1
        done
        stop_container "$name"
    fi
done

printf '%s\n' "timings (${IMAGES[exec]}, ${IMAGES[invoke]}, engine $CMB_ENGINE):" "${summary[@]/#/  }"
if [[ $status == 0 ]]; then echo "test.sh: all passed ($METHODS; $MODES; $LAYOUTS)"; else echo "test.sh: FAILED" >&2; fi
exit $status
