# syntax=docker/dockerfile:1
# One image for both roles of the PAE service: `api` (pae-serve) and `worker` (pae-worker).
#
#   docker build -t pae-stack:cpu .                                  # CPU, python:3.11-slim
#   docker build -t pae-stack:cuda --build-arg RUNTIME=cuda .        # CUDA + onnxruntime-gpu
#   docker build -t pae-stack:trt --build-arg RUNTIME=cuda --build-arg WITH_TENSORRT=true .
#   docker build -t pae-stack:cpu-nomodel --build-arg BAKE_MODEL=false .   # mount /models instead
#
# The model repository is exported from checkpoints/<MODEL_NAME> at build time into /models, always
# with CPU torch (ONNX graphs do not depend on the device); with BAKE_MODEL=false /models is left empty
# for a volume.

ARG RUNTIME=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- bases: the interpreter each flavour runs on (builder and runtime share one, so /opt/venv moves) ----
FROM ${CPU_BASE} AS base-cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

FROM ${CUDA_BASE} AS base-cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# Ubuntu's point releases retire old package versions, so pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- torch first, from the index that matches the flavour, so nothing later pulls another build ----
FROM base-cpu AS torch-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

FROM base-cuda AS torch-cuda
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"

# ---- the package and its serving dependencies ----
FROM torch-cpu AS builder-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
RUN /opt/venv/bin/pip install --no-cache-dir ".[serve]"

FROM torch-cuda AS builder-cuda
ARG ORT_GPU_VERSION=1.31.1
ARG WITH_TENSORRT=false
ARG TENSORRT_VERSION=11.4.0.106
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
# The serve extra brings the CPU onnxruntime; the GPU wheel replaces it (both install one module).
RUN /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && if [ "${WITH_TENSORRT}" = "true" ]; then \
      /opt/venv/bin/pip install --no-cache-dir "tensorrt-cu12==${TENSORRT_VERSION}"; \
    fi

# ---- the model repository (pae-export on the committed checkpoint), or an empty mount point ----
# Its own stage with the export extra, so exporter-only packages never reach the runtime image.
FROM torch-cpu AS models
ARG MODEL_NAME=fmnist32-tiny
ARG BAKE_MODEL=true
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
RUN /opt/venv/bin/pip install --no-cache-dir ".[export]"
COPY checkpoints/ checkpoints/
RUN mkdir -p /models \
 && if [ "${BAKE_MODEL}" = "true" ]; then \
      /opt/venv/bin/pae-export --checkpoint "checkpoints/${MODEL_NAME}" --repository /models; \
    fi

# ---- runtime: the venv, the models, an entrypoint; no compilers, no root ----
# The stage names below resolve from RUNTIME to local stages (pinned above); hadolint cannot follow that.
# hadolint ignore=DL3006
FROM builder-${RUNTIME} AS builder

# hadolint ignore=DL3006
FROM base-${RUNTIME} AS runtime
ARG MODEL_NAME=fmnist32-tiny
LABEL org.opencontainers.image.title="pae-stack" \
      org.opencontainers.image.description="PAE tokenizer + LightningDiT service: api (pae-serve) and worker (pae-worker)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pae \
 && useradd --system --uid 10001 --gid pae --home-dir /home/pae --create-home --no-log-init pae
COPY --from=builder /opt/venv /opt/venv
COPY --from=models --chown=10001:10001 /models /models
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/pae-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/pae-healthcheck
ENV PATH=/opt/venv/bin:${PATH} \
    MODEL_REPOSITORY=/models \
    MODEL_NAME=${MODEL_NAME} \
    PORT=8000 \
    WORKER_METRICS_PORT=9100 \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/pae
USER 10001:10001
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["pae-healthcheck"]
ENTRYPOINT ["pae-entrypoint"]
CMD ["api"]
