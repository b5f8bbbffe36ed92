#!/bin/sh
# One-shot release job: publish a feature version to Redis (atomic alias swap), then load the
# LoRA adapter into the running vLLM server so the gateway can ask for it by name.
# Every input is an environment variable, so compose and Kubernetes run the same image unchanged:
#   TANDEM_DATASET, TANDEM_NAMESPACE, TANDEM_REDIS_URL   where the features go (required)
#   JOB_PUBLISH_ARGS                                     extra `tandem features publish` flags, e.g.
#                                                        --items-embeddings /artifacts/.../x.safetensors
#   TANDEM_VLLM_URL                                      the vLLM server (needed to load an adapter)
#   JOB_ADAPTER_NAME, JOB_ADAPTER_PATH                   adapter name and its path AS SEEN BY vLLM;
#                                                        leave JOB_ADAPTER_NAME empty to skip
#   JOB_WAIT_SECONDS                                     how long to wait for vLLM (default 600)
set -eu

: "${TANDEM_DATASET:?set TANDEM_DATASET (e.g. ml-100k)}"
: "${TANDEM_NAMESPACE:?set TANDEM_NAMESPACE (the feature-store key namespace)}"
: "${TANDEM_REDIS_URL:?set TANDEM_REDIS_URL (e.g. redis://redis:6379/0)}"

echo "publishing features: dataset=${TANDEM_DATASET} namespace=${TANDEM_NAMESPACE}"
# JOB_PUBLISH_ARGS is split on spaces on purpose (paths under /artifacts have none).
# shellcheck disable=SC2086
tandem features publish --dataset "${TANDEM_DATASET}" --namespace "${TANDEM_NAMESPACE}" \
    ${JOB_PUBLISH_ARGS:-}

if [ -z "${JOB_ADAPTER_NAME:-}" ]; then
    echo "JOB_ADAPTER_NAME is empty: no adapter to load"
    exit 0
fi
: "${TANDEM_VLLM_URL:?set TANDEM_VLLM_URL to load an adapter}"
: "${JOB_ADAPTER_PATH:?set JOB_ADAPTER_PATH (the adapter directory inside the vLLM container)}"

# vLLM takes minutes to load a model: wait for /health instead of failing the whole release.
deadline=$(( $(date +%s) + ${JOB_WAIT_SECONDS:-600} ))
until python /opt/tandem/healthcheck.py "${TANDEM_VLLM_URL%/}/health" 2>/dev/null; do
    if [ "$(date +%s)" -ge "${deadline}" ]; then
        echo "vLLM at ${TANDEM_VLLM_URL} not healthy after ${JOB_WAIT_SECONDS:-600}s" >&2
        exit 1
    fi
    sleep 5
done

echo "loading adapter ${JOB_ADAPTER_NAME} from ${JOB_ADAPTER_PATH} into ${TANDEM_VLLM_URL}"
tandem ranker adapter load --vllm-url "${TANDEM_VLLM_URL}" \
    --name "${JOB_ADAPTER_NAME}" --path "${JOB_ADAPTER_PATH}"
echo "release job done"
