# syntax=docker/dockerfile:1
# dcn-node container image (docs/operations.md#docker).
#
# CPU (default):
#   docker build -t dcn-node .
# CUDA: a CUDA runtime base and the matching PyTorch wheel index, e.g.
#   docker build -t dcn-node:cuda \
#     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all ... dcn-node:cuda          (inference.device: auto picks CUDA)
# Run:
#   docker run -d --name dcn-node -p 11112:11112 -p 9108:9108 \
#     -v dcn-spool:/var/lib/dcn-node -v /srv/dcn-node/etc:/etc/dcn-node dcn-node
ARG BASE=python:3.11-slim-bookworm

# -- base: Python 3.11+ (CUDA images have none: the distribution's is installed) --------
FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# -- build: a virtual environment with torch and dcn-node --------------------------------
FROM base AS build
# The same CPU pin as the Makefile's TORCH_SPEC; TORCH_INDEX picks CPU or a CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/dcn-node/venv
ENV PATH=/opt/dcn-node/venv/bin:$PATH
RUN pip install --upgrade pip \
    && pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
# The runtime only: dcn_train (phantoms, training) stays out of the image. The shipped weights
# (dcn_node/models/) and default config are package data: installed with the package.
COPY dcn_node ./dcn_node
# constraints.txt: the pynetdicom release the fast receive path is written for (and the
# Celery release the workers are tested with). The cluster extra (psycopg, celery): one
# image serves every role, all in one (serve) or in cluster mode (receive, worker).
RUN pip install -c constraints.txt ".[cluster]" && dcn-node --version

# -- runtime: the environment (its package holds the weights) and a config; no root ------
FROM base AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dcn-node" \
      org.opencontainers.image.description="DICOM node running the DCN COVID-19 CT model (research use, not for diagnostic use)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 dcn-node \
    && useradd --system --uid 10001 --gid dcn-node --home-dir /var/lib/dcn-node \
       --shell /usr/sbin/nologin dcn-node \
    && mkdir -p /var/lib/dcn-node/spool /etc/dcn-node \
    && chown -R dcn-node:dcn-node /var/lib/dcn-node
COPY --from=build /opt/dcn-node/venv /opt/dcn-node/venv
COPY deploy/docker/dcn-node.yaml /etc/dcn-node/dcn-node.yaml
ENV PATH=/opt/dcn-node/venv/bin:$PATH \
    HOME=/var/lib/dcn-node \
    XDG_CACHE_HOME=/var/lib/dcn-node/.cache
USER 10001:10001
WORKDIR /var/lib/dcn-node
# The spool (received instances, index, results, outbox) and the configuration.
VOLUME ["/var/lib/dcn-node", "/etc/dcn-node"]
# DICOM (node.port) and metrics/health (metrics.port).
EXPOSE 11112 9108
# Asks /readyz on metrics.port of the config; start-period covers loading the model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["dcn-node", "healthcheck", "--config", "/etc/dcn-node/dcn-node.yaml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["dcn-node"]
CMD ["serve", "--config", "/etc/dcn-node/dcn-node.yaml"]
