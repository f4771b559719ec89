# syntax=docker/dockerfile:1
# One image for both roles of the PAE service: `api` (pae-serve) and `worker` (pae-worker).
# Each flavour is a target of its own, which every builder follows (buildah does not expand an ARG
# inside `FROM <stage>`); the last one, `cpu`, is the default:
#
#   docker build -t pae-stack:cpu .                          # ONNX Runtime on CPU, no torch
#   docker build -t pae-stack:cpu-torch --target cpu-torch . # adds torch, for RUNTIME=torch
#   docker build -t pae-stack:cuda --target cuda .           # onnxruntime-gpu on the CUDA base
#   docker build -t pae-stack:trt --target cuda --build-arg WITH_TENSORRT=true .
#   docker build -t pae-stack:cpu-nomodel --build-arg BAKE_MODEL=false .   # mount /models instead
#
# podman/buildah: add `--format docker` (OCI images drop HEALTHCHECK). `make image-test` builds the
# `cpu` target that way on a Debian base made by debootstrap and checks the running container.
#
# torch is installed only where it runs: the export stage (the model repository is exported and
# parity-checked at build time; ONNX graphs do not depend on the device) and the cpu-torch flavour.
# Every pip install is held to deploy/docker/constraints.txt, the versions `make run` uses, so the
# image answers the same bytes. Dependencies come from pyproject.toml before any source is copied,
# so a source change rebuilds the wheel, the export and two small layers, never the dependencies.

ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- bases: the interpreter each flavour runs on (builder and runtime share one, so /opt/venv moves) ----
FROM ${CPU_BASE} AS base-cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/pae/constraints.txt
COPY deploy/docker/constraints.txt deploy/docker/requirements.py /opt/pae/

FROM ${CUDA_BASE} AS base-cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/pae/constraints.txt DEBIAN_FRONTEND=noninteractive
# Ubuntu's point releases retire old package versions, so pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/constraints.txt deploy/docker/requirements.py /opt/pae/

# ---- the project as a wheel (pure Python: one wheel serves every flavour) ----
FROM base-cpu AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
RUN python3 -m venv /tmp/build \
 && /tmp/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- torch (CPU build) for the export stage ----
FROM base-cpu AS torch-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# ---- the model repository: pae-export on the committed checkpoint (or an empty mount point) ----
# The parity gate compares ONNX with torch on Fashion-MNIST test images, from Debian's package.
FROM torch-cpu AS export-deps
# Debian's point releases retire old package versions, so pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml /tmp/
RUN python3 /opt/pae/requirements.py --pyproject /tmp/pyproject.toml deps export > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM export-deps AS models
ARG MODEL_NAME=fmnist32-tiny
ARG BAKE_MODEL=true
# Only what the exporter imports, run from the source: a change elsewhere (service/, training/)
# keeps this stage cached instead of re-exporting an identical repository.
WORKDIR /src
COPY model/ model/
COPY export/ export/
COPY checkpoints/ checkpoints/
RUN mkdir -p /models \
 && if [ "${BAKE_MODEL}" = "true" ]; then \
      PYTHONPATH=/src /opt/venv/bin/python -m export.cli --checkpoint "checkpoints/${MODEL_NAME}" --repository /models; \
    fi

# ---- serving dependencies, per flavour ----
FROM base-cpu AS serve-deps-cpu
COPY pyproject.toml /tmp/
RUN python3 -m venv /opt/venv \
 && python3 /opt/pae/requirements.py --pyproject /tmp/pyproject.toml deps serve > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM base-cuda AS serve-deps-cuda
ARG WITH_TENSORRT=false
COPY pyproject.toml /tmp/
# The serve extra brings the CPU onnxruntime; the GPU wheel replaces it (both install one module).
# constraints.txt has no GPU packages (the dev venv has none); they are pinned here.
RUN python3 -m venv /opt/venv \
 && python3 /opt/pae/requirements.py --pyproject /tmp/pyproject.toml deps serve > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps "onnxruntime-gpu==1.31.1" \
 && if [ "${WITH_TENSORRT}" = "true" ]; then \
      /opt/venv/bin/pip install --no-cache-dir "tensorrt-cu12==11.4.0.106"; \
    fi

# ---- the containers: uid 10001, read-only friendly (writes go to /tmp), a healthcheck per role ----
# A flavour is its dependencies, this block, then the app layers (wheel, models) on top, so a source
# change rebuilds only those. buildah caches no step of a `FROM scratch` stage, so there is none.
FROM serve-deps-cpu AS runtime-cpu
ARG MODEL_NAME=fmnist32-tiny
LABEL org.opencontainers.image.title="pae-stack" \
      org.opencontainers.image.description="PAE tokenizer + LightningDiT service: api (pae-serve) and worker (pae-worker)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pae \
 && useradd --system --uid 10001 --gid pae --home-dir /home/pae --create-home --no-log-init pae
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/pae-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/pae-healthcheck
ENV PATH=/opt/venv/bin:${PATH} \
    MODEL_REPOSITORY=/models \
    MODEL_NAME=${MODEL_NAME} \
    PORT=8000 \
    WORKER_METRICS_PORT=9100 \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/pae
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["pae-healthcheck"]
ENTRYPOINT ["pae-entrypoint"]
CMD ["api"]

# The CUDA flavour: runtime-cpu's block and the app layers on the CUDA base (a stage cannot swap its base).
FROM serve-deps-cuda AS cuda
ARG MODEL_NAME=fmnist32-tiny
LABEL org.opencontainers.image.title="pae-stack" \
      org.opencontainers.image.description="PAE tokenizer + LightningDiT service: api (pae-serve) and worker (pae-worker)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pae \
 && useradd --system --uid 10001 --gid pae --home-dir /home/pae --create-home --no-log-init pae
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/pae-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/pae-healthcheck
ENV PATH=/opt/venv/bin:${PATH} \
    MODEL_REPOSITORY=/models \
    MODEL_NAME=${MODEL_NAME} \
    PORT=8000 \
    WORKER_METRICS_PORT=9100 \
    XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/pae
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["pae-healthcheck"]
ENTRYPOINT ["pae-entrypoint"]
CMD ["api"]
COPY --from=models --chown=10001:10001 /models /models
COPY --from=wheel /wheels /opt/pae/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /opt/pae/wheels/*.whl
USER 10001:10001

# The torch flavour: the default image plus the `torch` extra (CPU torch first, from its index), for
# RUNTIME=torch, the eager reference. torch sits below the app layers, so a source change keeps it.
FROM runtime-cpu AS cpu-torch
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml /tmp/
RUN /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python3 /opt/pae/requirements.py --pyproject /tmp/pyproject.toml deps torch > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=models --chown=10001:10001 /models /models
COPY --from=wheel /wheels /opt/pae/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /opt/pae/wheels/*.whl
USER 10001:10001

# The default target: ONNX Runtime on CPU.
FROM runtime-cpu AS cpu
COPY --from=models --chown=10001:10001 /models /models
COPY --from=wheel /wheels /opt/pae/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /opt/pae/wheels/*.whl
USER 10001:10001
