# dpoflow worker image. CPU by default; for a GPU worker build with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg EXTRAS=gpu .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG EXTRAS=""
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git && \
      rm -rf /var/lib/apt/lists/*; \
    fi && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY dpoflow ./dpoflow
COPY flows ./flows
COPY tasks ./tasks
RUN pip install "torch==${TORCH_VERSION}" && \
    pip install ".${EXTRAS:+[$EXTRAS]}"
COPY pipelines.yaml ./
COPY data ./data

RUN useradd --create-home --uid 1000 dpoflow && mkdir -p /data/hf && chown -R dpoflow /data /app
USER dpoflow
VOLUME ["/data"]
HEALTHCHECK CMD ["dpoflow", "validate", "-f", "/app/pipelines.yaml"]
ENTRYPOINT ["dpoflow"]
CMD ["run", "demo"]
