# syntax=docker/dockerfile:1.7
# Tandem service images: one Dockerfile, three targets that share every layer but the last.
#   gateway    tandem serve --role gateway   (port 8000)
#   retrieval  tandem serve --role retrieval (port 8001)
#   job        one-shot release: publish features to Redis, hot-load the LoRA adapter into vLLM
# Build from the repository root:
#   docker build -f deploy/docker/tandem.Dockerfile --target gateway -t tandem-gateway .
# Artifacts are mounted at /artifacts at run time (compose volume, Kubernetes PVC). To bake them
# into the image instead, override the empty `artifacts` stage with a named build context:
#   docker build ... --build-context artifacts=./artifacts
# The runtime runs as uid 10001 and writes only to /tmp, so a read-only root filesystem works.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# torch first, from the CPU index: any other spec pulls a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Default: no baked artifacts (replaced by `--build-context artifacts=DIR`).
FROM scratch AS artifacts

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers only here, for any dependency without a wheel; the runtime stage never sees them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tandem ./tandem
COPY retriever ./retriever
COPY ranker ./ranker
COPY feature_store ./feature_store
COPY enrichment ./enrichment
COPY services ./services
# Not editable: the venv must not point back into /src. torchvision & co. break transformers.
RUN pip install --no-cache-dir . \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tandem
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/tandem/healthcheck.py
COPY --from=artifacts . /artifacts/
# Every cache points into /tmp: the only writable path (tmpfs / emptyDir) under a read-only root.
# (DL3064 flags the TOKENIZERS_ name; it holds no secret.)
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    NUMBA_CACHE_DIR=/tmp/numba \
    TANDEM_ARTIFACTS_DIR=/artifacts
WORKDIR /tmp
USER 10001:10001

FROM runtime AS gateway
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "/opt/tandem/healthcheck.py", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["tandem", "serve"]
CMD ["--role", "gateway", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS retrieval
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/opt/tandem/healthcheck.py", "http://127.0.0.1:8001/healthz"]
ENTRYPOINT ["tandem", "serve"]
CMD ["--role", "retrieval", "--host", "0.0.0.0", "--port", "8001"]

FROM runtime AS job
COPY deploy/job/release.py /opt/tandem/release.py
# A one-shot job has nothing to probe: it succeeds or exits non-zero.
HEALTHCHECK NONE
ENTRYPOINT ["python", "/opt/tandem/release.py"]
