# Cerebral microbleed detection (VALDO Task 2) as a grand-challenge algorithm container.
#
# BASE_IMAGE: any Debian/Ubuntu image with Python 3.11 and venv. The default is the official Python image; torch
# 2.13.0 from PyPI is the CUDA build and brings its CUDA runtime and cuDNN as wheels, so only the host's NVIDIA
# driver is needed. A PyTorch CUDA runtime image (pytorch/pytorch:*-cuda*-runtime with Python 3.11) works too.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# torch 2.13.0 from PyPI is built for CUDA 13 (NVIDIA driver >= 580). For older drivers pick another build, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=

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
RUN pip install "${TORCH_SPEC}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install -r /opt/app/requirements.txt \
    && python -c "import torch, SimpleITK, nnunetv2; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

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
