# Cerebral microbleed detection (VALDO Task 2) as a grand-challenge algorithm container.
#
# BASE_IMAGE: any Debian/Ubuntu image with Python 3.11 and venv. The default is the official Python image; torch's
# CUDA builds bring their CUDA runtime and cuDNN as wheels, so only the host's NVIDIA driver is needed.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Which torch 2.13.0 build (docs/container.md, "GPU builds and grand-challenge's driver"):
#   cu128 (default)  CUDA 12.8 from the PyTorch index: any driver >= 525.60 (CUDA minor-version compatibility), which
#                    covers the R535/R550/R570 drivers of grand-challenge's T4 and A10G hosts
#   cu126, cu130     other CUDA builds from the PyTorch index (cu130 needs a driver >= 580)
#   pypi             PyPI's own wheel (for 2.13.0: CUDA 13.0, driver >= 580), for machines that reach only PyPI
#   cpu              the CPU-only build: about 5 GB smaller, for CPU-only jobs
# TORCH_INDEX_URL replaces the variant's index. PIP_FIND_LINKS (build.sh's CMB_WHEELS) names a local wheel folder:
# pip reads it from the environment for every install, and a variant's wheel found there is used without its index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=
ARG PIP_FIND_LINKS=

# grand-challenge hardware labels
LABEL processor.cpus="2" \
      processor.cpu.capabilities="null" \
      processor.memory="16G" \
      processor.gpu_count="1" \
      processor.gpu.compute_capability="null" \
      processor.gpu.memory="12G"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    CMB_METHOD=three-stage \
    CMB_DEVICE=auto \
    CMB_INPUT=/input \
    CMB_OUTPUT=/output \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    nnUNet_raw=/tmp/nnunet/raw \
    nnUNet_preprocessed=/tmp/nnunet/preprocessed \
    nnUNet_results=/tmp/nnunet/results \
    HF_HUB_OFFLINE=1

RUN (getent group user || groupadd -r user) \
    && (id -u user || useradd --no-log-init -r -g user -d /tmp -s /usr/sbin/nologin user) \
    && mkdir -p /opt/app /input /output /opt/ml/model \
    && chown user:user /output

# --system-site-packages keeps a base image's own torch visible (a PyTorch runtime base needs no second copy)
RUN python3 -m venv --system-site-packages /opt/venv
COPY requirements.txt /opt/app/requirements.txt
RUN set -e; \
    case "$TORCH_VARIANT" in \
        pypi) spec="torch==$TORCH_VERSION"; index="" ;; \
        cpu|cu[0-9]*) spec="torch==$TORCH_VERSION+$TORCH_VARIANT"; index="https://download.pytorch.org/whl/$TORCH_VARIANT" ;; \
        *) echo "TORCH_VARIANT=$TORCH_VARIANT: choose cu128, cu126, cu130, pypi or cpu" >&2; exit 2 ;; \
    esac; \
    index="${TORCH_INDEX_URL:-$index}"; \
    if [ -n "$PIP_FIND_LINKS" ] && ls "$PIP_FIND_LINKS"/torch-"$TORCH_VERSION"+"$TORCH_VARIANT"-*.whl >/dev/null 2>&1; then \
        index=""; \
    fi; \
    pip install "$spec" ${index:+--index-url "$index"}; \
    pip install -r /opt/app/requirements.txt; \
    python -c "import torch, SimpleITK, nnunetv2, fastapi, uvicorn; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /opt/app
ENV PYTHONPATH=/opt/app
# Only the inference core, the networks (installed as valdocmb.models, as pyproject.toml maps them), evaluate and
# the weights: training, tuning, benchmarks and the simulator stay out of the image.
COPY process.py pyproject.toml README.md /opt/app/
COPY valdocmb/__init__.py /opt/app/valdocmb/__init__.py
COPY valdocmb/core /opt/app/valdocmb/core
COPY valdocmb/evaluate /opt/app/valdocmb/evaluate
COPY models /opt/app/valdocmb/models
COPY weights /opt/app/weights
# /opt/app is read-only for the user: results go to /output, scratch to /tmp
RUN python -c "import valdocmb.core.run, valdocmb.core.three_stage, valdocmb.core.nnunet, valdocmb.evaluate" \
    && find /opt/app -name __pycache__ -prune -exec rm -rf {} +

USER user
ENTRYPOINT ["python", "/opt/app/process.py"]

# grand-challenge's container mode, chosen by this label: exec (run once per case, the default) or invoke (an HTTP
# server on port 4743: GET /health, POST /invoke). The same code serves both; CMB_API_METHOD tells process.py which.
# Last, so that the two modes' images share every layer above.
ARG API_METHOD=exec
LABEL org.grand-challenge.api-method="${API_METHOD}"
ENV CMB_API_METHOD=${API_METHOD}
EXPOSE 4743
