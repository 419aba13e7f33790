# syntax=docker/dockerfile:1
# The kgrec candidates service: `kgrec serve` (FastAPI + uvicorn) for a registered model, CPU only.
#
#   docker build -f infra/docker/service.Dockerfile -t kgrec-service:0.1.0 .      # from the repo root
#   docker run --rm -p 127.0.0.1:8000:8000 -e KGREC_TRACKING_URI=http://mlflow:5000 \
#       -e KGREC_MODEL_NAME=kgrec-music kgrec-service:0.1.0
#
# Settings come from the environment: KGREC_TRACKING_URI (MLflow server), KGREC_MODEL_NAME (the
# registered model whose `champion` is served). The container runs as uid 10001 and writes only
# under /tmp (the downloaded champion), so it also runs with a read-only root filesystem.
#
# Binding: the default CMD listens on 0.0.0.0 *inside the container*, because that is the only way
# the container network (compose network, pod IP) reaches it. The service has no authentication:
# what guards it is where its port is published -- `-p 127.0.0.1:8000:8000` / compose's
# "127.0.0.1:8000:8000", or a ClusterIP Service (no NodePort/LoadBalancer) in infra/k8s.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build of torch first, so that nothing pulls the multi-GB CUDA build; the pin is the one
# in constraints.txt (tests/test_infra.py checks they agree).
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
# The tested dependency set, no dev extras.
RUN pip install -c constraints.txt .

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS service
# libgomp: OpenMP runtime for faiss and torch (the wheels bundle one; this is the fallback).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kgrec \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin kgrec
COPY --from=build /opt/venv /opt/venv
# Everything the process writes goes under /tmp (an emptyDir / tmpfs when the root fs is read-only):
# the champion download (tempfile), MLflow's and Prefect's home folders.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    KGREC_HOME=/tmp/kgrec-work \
    PREFECT_HOME=/tmp/prefect \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
# Liveness only (/readyz is the readiness probe of the orchestrator: it is 503 until the champion
# is loaded, and the container is still healthy then).
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["kgrec"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
