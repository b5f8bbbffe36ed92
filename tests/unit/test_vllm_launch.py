"""The vLLM launcher: flags per profile, adapter naming, and the serve loop (against a stub server).

The stub is a tiny HTTP server installed as ``vllm.entrypoints.openai.api_server`` on a
temporary PYTHONPATH, so ``serve`` runs its real subprocess, health wait and warm-up quickly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy.vllm.launch import (
    LaunchConfig,
    LaunchError,
    build_command,
    build_env,
    main,
    parse_args,
    serve,
    wait_healthy,
)

# What every ranker server needs, whatever the hardware (RECIPES.md, docker-compose.yml).
COMMON_FLAGS = {
    "--served-model-name=base",
    "--dtype=bfloat16",
    "--logprobs-mode=processed_logprobs",
    "--enable-prompt-embeds",
    "--enable-lora",
    "--max-lora-rank=8",
    "--lora-target-modules=qkv_proj",
    "--enable-prefix-caching",
    "--max-model-len=2048",
}


def test_cpu_profile_uses_the_module_entrypoint_and_cpu_flags():
    config = LaunchConfig(profile="cpu", model="/m", lora_modules=("rec-v1=/a/rec-v1",))
    command = build_command(config)
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert set(command) >= COMMON_FLAGS | {
        "--model=/m",
        "--enforce-eager",
        f"--kv-cache-memory-bytes={256 * 1024**2}",
        "--lora-modules=rec-v1=/a/rec-v1",
        "--block-size=32",
    }
    assert not any(arg.startswith("--gpu-memory-utilization") for arg in command)
    env = build_env(config, base={"OMP_NUM_THREADS": "2"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_gpu_profile_sizes_the_cache_by_memory_share_and_keeps_cuda_graphs():
    config = LaunchConfig(profile="gpu", model="/artifacts/llm", port=8011)
    command = build_command(config)
    assert set(command) >= COMMON_FLAGS | {"--gpu-memory-utilization=0.9", "--port=8011"}
    assert "--enforce-eager" not in command
    assert not any(arg.startswith("--block-size") for arg in command)  # vLLM's GPU default
    assert not any(arg.startswith("--kv-cache-memory-bytes") for arg in command)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in build_env(config, base={})


def test_several_adapters_go_in_one_flag_because_a_repeated_flag_keeps_the_last():
    config = LaunchConfig(lora_modules=("rec-v1=/a/1", "rec-v2=/a/2"))
    command = build_command(config)
    at = command.index("--lora-modules")
    assert command[at + 1 : at + 3] == ["rec-v1=/a/1", "rec-v2=/a/2"]
    assert sum(arg.startswith("--lora-modules") for arg in command) == 1


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (("rec=/a",), "versioned"),
        (("rec-v1",), "NAME=DIR"),
        (("rec-v1=/a", "rec-v1=/b"), "repeat"),
    ],
)
def test_adapter_names_must_be_versioned_and_unique(modules, message):
    with pytest.raises(LaunchError, match=message):
        LaunchConfig(lora_modules=modules)


def test_cli_prints_the_argv_and_passes_unknown_flags_through(capsys):
    assert (
        main(["--print", "--profile", "gpu", "--model", "/m", "--max-num-batched-tokens=4096"]) == 0
    )
    argv = json.loads(capsys.readouterr().out)
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[-1] == "--max-num-batched-tokens=4096"
    _, config = parse_args(["--no-prefix-caching", "--omp-threads", "2", "--block-size", "32"])
    assert {"--no-enable-prefix-caching", "--block-size=32"} <= set(build_command(config))
    assert build_env(config, base={})["OMP_NUM_THREADS"] == "2"


def test_a_merged_checkpoint_is_served_without_lora_under_its_version_name():
    _, config = parse_args(["--no-lora", "--served-model-name", "rec-v3"])
    command = build_command(config)
    assert "--served-model-name=rec-v3" in command
    assert not any("lora" in arg for arg in command)
    with pytest.raises(LaunchError, match="LoRA is off"):
        LaunchConfig(lora=False, lora_modules=("rec-v1=/a",))


def test_cli_rejects_a_bad_adapter_name_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lora-modules", "latest=/a"])
    assert exit_info.value.code == 2
    assert "must be versioned" in capsys.readouterr().err


def test_serve_refuses_an_adapter_folder_without_an_adapter(tmp_path: Path):
    with pytest.raises(LaunchError, match=r"adapter_config\.json"):
        serve(LaunchConfig(lora_modules=(f"rec-v1={tmp_path}",)))


def test_health_wait_stops_as_soon_as_the_server_process_dies():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(LaunchError, match="exited with code 3"):
        wait_healthy("http://127.0.0.1:9", timeout_s=30, process=process)


STUB_SERVER = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port = int(next(a for a in sys.argv if a.startswith("--port=")).split("=")[1])
    log = open(sys.argv[0] + ".requests", "a")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.write(json.dumps(body) + "\\n")
            log.flush()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"text": "A"}]}')
            server.shutting_down = True

    server = HTTPServer(("127.0.0.1", port), Handler)
    server.shutting_down = False
    while not server.shutting_down:
        server.handle_request()
    raise SystemExit(7)
    """
)


def test_serve_waits_for_health_warms_up_with_a_long_prompt_and_returns_the_exit_code(
    tmp_path: Path, monkeypatch
):
    package = tmp_path / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package.parent.parent, package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STUB_SERVER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    from tandem.testing.processes import free_port

    config = LaunchConfig(model="/m", port=free_port())
    assert serve(config, ready_timeout_s=30) == 7
    warm_up = json.loads((package / "api_server.py.requests").read_text().splitlines()[0])
    assert warm_up["model"] == "base" and warm_up["max_tokens"] == 1
    assert len(warm_up["prompt"].split()) >= 15
