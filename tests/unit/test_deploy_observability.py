"""Prometheus rules and the Grafana dashboard are valid and use metric names the code exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.deploy import (
    REPO,
    find_tool,
    metrics_in_registries,
    metrics_in_source,
    promql_metric_names,
    run_tool,
)

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "tandem.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "tandem.rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tandem.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
CODE_PACKAGES = ("tandem", "services", "feature_store", "ranker", "retriever", "enrichment")
# Exported by other programs: Prometheus itself and redis_exporter (oliver006/redis_exporter).
THIRD_PARTY = {"up", "redis_up"}


def _rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _vllm_sources() -> list[Path]:
    try:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted((root / "v1" / "metrics").glob("*.py")) + sorted(
        (root / "entrypoints").rglob("*.py")
    )


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Series names the code exports: source scan of our packages and vLLM, plus registries."""
    ours = [path for package in CODE_PACKAGES for path in (REPO / package).rglob("*.py")]
    names = metrics_in_source(ours) | metrics_in_registries()
    vllm = _vllm_sources()
    if vllm:
        names |= metrics_in_source(vllm)
    return names


def _check_names(exprs: list[str], exported: set[str], where: str) -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = set().union(*(promql_metric_names(expr) for expr in exprs)) - recorded - THIRD_PARTY
    if not _vllm_sources():
        used = {name for name in used if not name.startswith("vllm:")}  # checked where installed
    missing = sorted(used - exported)
    assert not missing, f"{where} use metrics nothing exports: {missing}"


def test_promql_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (le, stage) (rate(tandem_stage_duration_seconds_bucket"
        '{stage!="total",route="/x"}[$__rate_interval]))) / on (job) group_left '
        "max(vllm:kv_cache_usage_perc offset 5m) > 0.5 and up == 1"
    )
    assert promql_metric_names(expr) == {
        "tandem_stage_duration_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "up",
    }


def test_exported_names_include_the_metric_contract(exported: set[str]):
    contract = {
        "tandem_http_requests_total",
        "tandem_http_request_duration_seconds_bucket",
        "tandem_stage_duration_seconds_bucket",
        "tandem_fallbacks_total",
        "tandem_retrieval_duration_seconds_bucket",
        "tandem_build_info",
    }
    assert exported >= contract


def test_a_metric_nothing_exports_is_caught(exported: set[str]):
    with pytest.raises(AssertionError, match="tandem_made_up_total"):
        _check_names(["sum(rate(tandem_made_up_total[5m]))"], exported, "this test")


def test_alert_rules_use_exported_metrics(exported: set[str]):
    _check_names([rule["expr"] for rule in _rules()], exported, "alert rules")


def test_dashboard_uses_exported_metrics(exported: set[str]):
    _check_names(_dashboard_exprs(), exported, "the dashboard")


def test_autoscaler_metric_is_exported(exported: set[str]):
    if not _vllm_sources():
        pytest.skip("vLLM not installed: its metric names cannot be read")
    adapter = yaml.safe_load((PROMETHEUS / "adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        assert promql_metric_names(rule["seriesQuery"]) <= exported


def test_alerts_cover_the_slos_and_failure_modes():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    exprs = " ".join(rule["expr"] for rule in _rules())
    for needle in (
        "tandem_http_request_duration_seconds_bucket",  # p99 latency SLO
        "tandem_fallbacks_total",
        'status=~"5.."',
        "vllm:num_requests_waiting",
        "redis_up",
    ):
        assert needle in exprs, needle
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_promtool_accepts_the_rules_and_their_unit_tests(tmp_path: Path):
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    check = run_tool([promtool, "check", "rules", str(RULES)])
    assert check.returncode == 0, check.stdout + check.stderr
    tests = run_tool([promtool, "test", "rules", str(RULE_TESTS)])
    assert tests.returncode == 0, tests.stdout + tests.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "kubernetes-scrape.yml"])
def test_promtool_accepts_the_scrape_configs(config: str, tmp_path: Path):
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    parsed = yaml.safe_load((PROMETHEUS / config).read_text())
    if "rule_files" in parsed:  # the container path, pointed at the repository's rules
        parsed["rule_files"] = [str(RULES)]
    path = tmp_path / config
    path.write_text(yaml.safe_dump(parsed))
    result = run_tool([promtool, "check", "config", str(path)])
    if "kubernetes_sd_configs not found" in result.stderr + result.stdout:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_files_parse_without_promtool():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and rule["expr"].strip()
            if "record" in rule:
                assert rule["record"].startswith("tandem:"), "level:metric:operation naming"


def test_dashboard_shows_the_required_views():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(_dashboard_exprs())
    for needle in (
        "tandem_http_requests_total",  # QPS
        "tandem_stage_duration_seconds_bucket",  # stage latencies
        "sum by (reason) (rate(tandem_fallbacks_total",  # fallbacks by reason
        "vllm:generation_tokens_total",  # vLLM throughput
        "vllm:kv_cache_usage_perc",  # KV-cache use
    ):
        assert needle in exprs, needle
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["grafana"]["volumes"])
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "tandem.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose
    env = (REPO / "deploy" / "env" / "grafana.env").read_text()
    assert f"{path}/tandem.json" in env  # home dashboard
