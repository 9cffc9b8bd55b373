#!/usr/bin/env bash
# Export for grand-challenge:
#   <out>/valdocmb.tar.gz   the image (`docker save | gzip`), for the algorithm's container upload
#   <out>/model.tar.gz      the contents of weights/, for the separate model upload; grand-challenge unpacks it
#                           into /opt/ml/model, which the container then prefers over its baked-in weights
# Usage: ./export.sh [--model-only] [out-dir]     (CMB_ENGINE, CMB_IMAGE as for build.sh)
#   --model-only   just the model tarball (test.sh mounts it at /opt/ml/model as the platform does)
set -euo pipefail
cd "$(dirname "$0")"
IMAGE="${CMB_IMAGE:-valdocmb:latest}"
MODEL_ONLY=0
if [[ "${1:-}" == "--model-only" ]]; then MODEL_ONLY=1; shift; fi
OUT="${1:-export}"
mkdir -p "$OUT"

# the model tarball holds what weights/ holds (MANIFEST.json at its root), without caches or partial files
export_model() {
    tar --exclude='.tmp-*' --exclude='__pycache__' -czf "$OUT/.model.tar.gz.partial" -C weights .
    mv "$OUT/.model.tar.gz.partial" "$OUT/model.tar.gz"
}
if [[ $MODEL_ONLY == 1 ]]; then
    export_model
    ls -lh "$OUT/model.tar.gz" >&2
    exit 0
fi
ENGINE="${CMB_ENGINE:-}"
if [[ -z "$ENGINE" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    elif command -v buildah >/dev/null; then ENGINE=buildah
    else echo "export.sh: no container engine found" >&2; exit 2; fi
fi
GZIP_CMD=(gzip -c)
command -v pigz >/dev/null && GZIP_CMD=(pigz -c)

echo "saving $IMAGE with $ENGINE" >&2
tmp="$OUT/.valdocmb.tar.gz.partial"
case "$ENGINE" in
    docker|podman) "$ENGINE" save "$IMAGE" | "${GZIP_CMD[@]}" > "$tmp" ;;
    buildah)
        archive="$(mktemp -u "${TMPDIR:-/tmp}/valdocmb-image.XXXXXX.tar")"
        buildah push --quiet "$IMAGE" "docker-archive:$archive:$IMAGE" >/dev/null
        "${GZIP_CMD[@]}" "$archive" > "$tmp"
        rm -f "$archive" ;;
    *) echo "export.sh: unknown engine '$ENGINE'" >&2; exit 2 ;;
esac
mv "$tmp" "$OUT/valdocmb.tar.gz"

export_model
(cd "$OUT" && sha256sum valdocmb.tar.gz model.tar.gz > SHA256SUMS)
ls -lh "$OUT"/valdocmb.tar.gz "$OUT"/model.tar.gz >&2
