"""Release job: publish a feature version to Redis, then hot-load a LoRA adapter into EVERY vLLM
replica, so compose and Kubernetes release the same way with the same image.

Publishing runs the CLI (`tandem features publish`: a complete new version, then an atomic alias
swap). The adapter goes through vLLM's runtime endpoint (`ranker.adapters.ServerAdapters`:
`/v1/load_lora_adapter` plus a one-token smoke test). A plain Service would hand the request to
one random replica, so the job resolves TANDEM_VLLM_URL's host to all its addresses: point it at
a headless Service (Kubernetes: `ranker-headless`) and every pod gets the adapter. A replica
that already serves the name is left alone, so a retried job is harmless.

Environment (compose: deploy/env/job.env, Kubernetes: ConfigMap tandem-publish):
  TANDEM_DATASET, TANDEM_NAMESPACE, TANDEM_REDIS_URL   where the features go (required)
  JOB_PUBLISH_ARGS       extra `tandem features publish` flags (e.g. --items-embeddings PATH)
  JOB_ADAPTER_NAME       adapter to load, versioned like rec-v2; empty = publish only
  JOB_ADAPTER_PATH       its directory AS THE vLLM SERVER SEES IT (e.g. /adapters/rec-v2)
  TANDEM_VLLM_URL        the vLLM server(s), e.g. http://ranker-headless:8011
  JOB_WAIT_SECONDS       how long to wait for each replica's /health (default 600)
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

REQUIRED = ("TANDEM_DATASET", "TANDEM_NAMESPACE", "TANDEM_REDIS_URL")


class ReleaseError(RuntimeError):
    """The release cannot go on; the message says what to fix."""


def replica_urls(url: str) -> list[str]:
    """One base URL per address of the URL's host (all pods behind a headless Service)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.scheme:
        raise ReleaseError(f"TANDEM_VLLM_URL {url!r} is not a URL like http://ranker:8011")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ReleaseError(f"cannot resolve {parts.hostname}: {exc}") from None
    addresses = sorted({info[4][0] for info in infos})
    return [
        f"{parts.scheme}://{f'[{a}]' if ':' in a else a}:{port}{parts.path.rstrip('/')}"
        for a in addresses
    ]


def wait_healthy(url: str, timeout_s: float, poll_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise ReleaseError(f"vLLM at {url} not healthy after {timeout_s:.0f}s")
        time.sleep(poll_s)


def publish(env: dict[str, str]) -> None:
    command = [
        "tandem", "features", "publish",
        "--dataset", env["TANDEM_DATASET"],
        "--namespace", env["TANDEM_NAMESPACE"],
        *shlex.split(env.get("JOB_PUBLISH_ARGS", "")),
    ]  # fmt: skip
    print(f"publishing features: {shlex.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise ReleaseError("tandem features publish failed (its message is above)")


def load_adapter(env: dict[str, str]) -> None:
    from ranker.adapters import AdapterError, ServerAdapters

    name, path = env["JOB_ADAPTER_NAME"], env.get("JOB_ADAPTER_PATH", "")
    base = env.get("TANDEM_VLLM_URL", "")
    if not base or not path:
        raise ReleaseError("loading an adapter needs TANDEM_VLLM_URL and JOB_ADAPTER_PATH")
    wait_s = float(env.get("JOB_WAIT_SECONDS") or 600)
    urls = replica_urls(base)
    for url in urls:
        wait_healthy(url, wait_s)
        with ServerAdapters(url) as server:
            try:
                if name in server.loaded():
                    print(f"{url}: {name} already loaded", flush=True)
                    continue
                server.load(name, path)
            except AdapterError as exc:
                raise ReleaseError(f"{url}: {exc}") from None
        print(f"{url}: loaded {name} from {path}", flush=True)
    print(f"adapter {name} serving on {len(urls)} replica(s)", flush=True)


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    missing = [key for key in REQUIRED if not env.get(key)]
    try:
        if missing:
            raise ReleaseError(f"set {', '.join(missing)} (see deploy/env/job.env)")
        publish(env)
        if not env.get("JOB_ADAPTER_NAME"):
            print("JOB_ADAPTER_NAME is empty: no adapter to load", flush=True)
            return 0
        load_adapter(env)
    except ReleaseError as exc:
        print(f"release failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print("release done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
