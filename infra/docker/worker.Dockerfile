# syntax=docker/dockerfile:1
# Two images from one file, both CPU only:
#
#   worker (default target): a Prefect worker that runs the kgrec pipeline flow from the
#     `kgrec-pool` work pool (infra/prefect.yaml deploys the nightly flow to it).
#       docker build -f infra/docker/worker.Dockerfile -t kgrec-worker:0.1.0 .
#   tracking: the MLflow tracking server (Postgres through psycopg 3, artefacts in S3 through boto3)
#     and the Prefect server, at the versions of constraints.txt, so the servers match the clients.
#       docker build -f infra/docker/worker.Dockerfile --target tracking -t kgrec-tracking:0.1.0 .
#
# infra/docker-compose.yml builds and runs both.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- common runtime base
FROM ${PYTHON_IMAGE} AS base
# libgomp: OpenMP runtime for faiss and torch (the wheels bundle one; this is the fallback).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kgrec \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin kgrec
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PREFECT_HOME=/tmp/prefect \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# ---------------------------------------------------------------------------- tracking servers
FROM ${PYTHON_IMAGE} AS tracking-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt /src/constraints.txt
RUN pip install -c /src/constraints.txt mlflow prefect "psycopg[binary]" boto3

FROM base AS tracking
COPY --from=tracking-build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
# 5000: MLflow (`mlflow server`), 4200: Prefect (`prefect server start`); compose picks the command.
EXPOSE 5000 4200
ENTRYPOINT []
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

# ---------------------------------------------------------------------------- worker
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build of torch first (the pin is constraints.txt's; tests/test_infra.py checks it).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY kgrec ./kgrec
COPY features ./features
COPY models ./models
COPY serving ./serving
COPY flows ./flows
# The tested dependency set; neither dev nor stack extras (the worker talks to servers over HTTP).
RUN pip install -c constraints.txt .

FROM base AS worker
COPY --from=build /opt/venv /opt/venv
# The folder that infra/prefect.yaml's pull step changes into ({{ $KGREC_REPO }}): the deployment's
# entrypoint is flows/pipeline.py:pipeline_flow, relative to it. Only flows/ and the deployment file:
# a copy of kgrec/ there would shadow the installed package (the working directory comes first on
# sys.path) and hide its subpackages.
COPY flows /opt/kgrec/flows
COPY infra/prefect.yaml /opt/kgrec/infra/prefect.yaml
# KGREC_HOME (snapshots, work files) is a volume; created here so a fresh volume is owned by uid 10001.
RUN mkdir -p /var/lib/kgrec && chown 10001:10001 /var/lib/kgrec
ENV KGREC_REPO=/opt/kgrec \
    KGREC_HOME=/var/lib/kgrec \
    KGREC_DATA_DIR=/data
WORKDIR /opt/kgrec
USER 10001:10001
# The worker has no listener of its own (it polls the Prefect server); nothing to EXPOSE.
ENTRYPOINT ["prefect"]
CMD ["worker", "start", "--pool", "kgrec-pool", "--type", "process", "--install-policy", "never"]
