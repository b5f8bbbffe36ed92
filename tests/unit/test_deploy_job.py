"""The release job (deploy/job/release.py): publishes features to a real Redis through the CLI,
hot-loads an adapter into every vLLM replica (real server), and fails with a clear message."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tandem.testing.data import synthetic_dataset
from tests.fixtures.deploy import REPO, run_tool

SCRIPT = REPO / "deploy" / "job" / "release.py"


def _release() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tandem_release_job", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(env: dict[str, str], cwd: Path):
    base = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(cwd),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
    }
    return run_tool([sys.executable, str(SCRIPT)], cwd=cwd, env={**base, **env}, timeout=180)


@pytest.fixture
def published_env(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    """A prepared tiny dataset under a private artifacts root, and where to publish it."""
    artifacts = tmp_path / "artifacts"
    synthetic_dataset(num_users=8, num_items=20).save(artifacts / "jobtest" / "data")
    return {
        "TANDEM_ARTIFACTS_DIR": str(artifacts),
        "TANDEM_DATASET": "jobtest",
        "TANDEM_NAMESPACE": namespace,
        "TANDEM_REDIS_URL": redis_url,
    }


def test_the_cli_command_the_job_runs_exists():
    import typer

    from tandem.cli import app

    group = typer.main.get_command(app).commands["features"]
    publish = group.commands["publish"]
    options = {opt for param in publish.params for opt in param.opts}
    assert {"--dataset", "--namespace"} <= options


def test_replicas_are_every_address_of_the_host():
    release = _release()
    urls = release.replica_urls("http://localhost:8011/")
    assert "http://127.0.0.1:8011" in urls
    assert all(u.endswith(":8011") for u in urls)
    assert release.replica_urls("http://[::1]:8011") == ["http://[::1]:8011"]
    with pytest.raises(release.ReleaseError, match="not a URL"):
        release.replica_urls("ranker:8011")


def test_missing_settings_are_named(capsys: pytest.CaptureFixture[str]):
    assert _release().main({}) == 1
    assert "TANDEM_DATASET, TANDEM_NAMESPACE, TANDEM_REDIS_URL" in capsys.readouterr().err


@pytest.mark.integration
def test_the_job_publishes_features_to_redis(
    tmp_path: Path, published_env: dict[str, str], redis_url: str, namespace: str
):
    result = _run(published_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no adapter to load" in result.stdout
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get(f"tandem:{namespace}:current") is not None
    finally:
        client.close()


@pytest.mark.integration
def test_an_unreachable_ranker_fails_the_release_clearly(
    tmp_path: Path, published_env: dict[str, str]
):
    env = {
        **published_env,
        "JOB_ADAPTER_NAME": "rec-v2",
        "JOB_ADAPTER_PATH": "/adapters/rec-v2",
        "TANDEM_VLLM_URL": "http://127.0.0.1:9",
        "JOB_WAIT_SECONDS": "1",
    }
    result = _run(env, tmp_path)
    assert result.returncode == 1
    assert "not healthy" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_the_job_hot_loads_the_adapter_once(
    tmp_path: Path, published_env, vllm_server, vllm_models
):
    from ranker.adapters import ServerAdapters

    name = "rec-v90"  # far above the versions other tests load
    env = {
        **published_env,
        "JOB_ADAPTER_NAME": name,
        "JOB_ADAPTER_PATH": str(vllm_models.adapter_v2),
        "TANDEM_VLLM_URL": vllm_server.url,
    }
    try:
        first = _run(env, tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"loaded {name}" in first.stdout
        with ServerAdapters(vllm_server.url) as server:
            assert name in server.loaded()
        again = _run(env, tmp_path)  # a retried job changes nothing
        assert again.returncode == 0 and "already loaded" in again.stdout
    finally:
        with ServerAdapters(vllm_server.url) as server:
            if name in server.loaded():
                server.unload(name)
