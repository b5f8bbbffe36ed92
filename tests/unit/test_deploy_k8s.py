"""The Kustomize overlays render, validate against the Kubernetes schema, and hold together:
selectors, ports, ConfigMap/Secret keys, probes, volumes and settings all point at real things."""

from __future__ import annotations

import pytest
import yaml

from tests.fixtures.deploy import (
    GPU_LAUNCH,
    OVERLAYS,
    REPO,
    assemble_overlay,
    job_env_names,
    kustomize_command,
    launcher,
    settings_env_names,
)

K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported, newest schema shipped
SERVICES = ("gateway", "retrieval", "ranker")
# Secrets a real cluster creates out of band (never committed), with the keys they must hold.
EXTERNAL_SECRETS = {"gpu-prod": {"tandem-api-keys": {"api-keys", "internal-api-key"}}}
VLLM_ROUTES = {"/health", "/metrics"}  # vLLM's OpenAI server
RANKER_STARTUP_BUDGET_S = 600  # vLLM loads weights (and compiles on GPU) for minutes

overlay_names = pytest.mark.parametrize("overlay", list(OVERLAYS))


def _index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "Job"}]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict) -> list[dict]:
    pod = _pod(workload)
    return pod.get("initContainers", []) + pod["containers"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _env_of(container: dict, docs: dict) -> dict[str, str]:
    """What the container's environment holds (ConfigMap values; secret refs as '<secret>')."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(docs[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<secret>")
    return env


def _app_routes(role: str) -> set[str]:
    """Paths the service's FastAPI app really serves (the app is built, not started)."""
    from services.common.settings import GatewaySettings, RetrievalSettings

    if role == "gateway":
        from services.gateway.app import create_app

        app = create_app(GatewaySettings(_env_file=None))
    else:
        from services.retrieval.app import create_app

        app = create_app(RetrievalSettings(_env_file=None))
    return {route.path for route in app.routes}


@overlay_names
def test_python_assembly_matches_kustomize(overlay: str, rendered_overlays: dict):
    if kustomize_command() is None:
        pytest.skip("no kubectl/kustomize to compare the Python assembly with")

    def key(doc: dict) -> tuple:
        return (doc["kind"], doc["metadata"]["name"])

    assembled = sorted(assemble_overlay(OVERLAYS[overlay]), key=key)
    assert assembled == sorted(rendered_overlays[overlay], key=key)


@overlay_names
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schema(
    overlay: str, version: str, rendered_overlays: dict
):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in rendered_overlays[overlay]:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay} {name} invalid for Kubernetes {version}: {exc.message}")


@overlay_names
def test_every_component_is_deployed_with_its_companions(overlay: str, rendered_overlays: dict):
    docs = _index(rendered_overlays[overlay])
    for name in SERVICES:
        assert ("Deployment", name) in docs and ("Service", name) in docs
        assert ("PodDisruptionBudget", name) in docs
    assert ("StatefulSet", "redis") in docs and ("Service", "redis") in docs
    assert ("Job", "tandem-publish") in docs
    for name in ("gateway", "retrieval"):
        metric = docs[("HorizontalPodAutoscaler", name)]["spec"]["metrics"][0]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    namespace = yaml.safe_load((OVERLAYS[overlay] / "kustomization.yaml").read_text())["namespace"]
    assert ("Namespace", namespace) in docs
    for doc in docs.values():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


def test_gpu_ranker_has_a_gpu_and_scales_on_the_vllm_queue(rendered_overlays: dict):
    docs = _index(rendered_overlays["gpu-prod"])
    vllm = _pod(docs[("Deployment", "ranker")])["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["image"] == "vllm/vllm-openai:v0.32.0"
    hpa = docs[("HorizontalPodAutoscaler", "ranker")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ranker"
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    adapter = yaml.safe_load((REPO / "deploy" / "prometheus" / "adapter-values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting")
    assert rule["name"]["as"].replace("${1}", "num_requests_waiting") == "vllm_num_requests_waiting"
    dev = _index(rendered_overlays["cpu-dev"])
    assert "nvidia.com/gpu" not in str(dev[("Deployment", "ranker")])


def test_gpu_ranker_runs_the_same_vllm_flags_as_compose(rendered_overlays: dict):
    docs = _index(rendered_overlays["gpu-prod"])
    vllm = _pod(docs[("Deployment", "ranker")])["containers"][0]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["ranker-gpu"]
    assert vllm["command"] == compose["entrypoint"]
    assert vllm["args"] == compose["command"]


@overlay_names
def test_selectors_match_pod_labels(overlay: str, rendered_overlays: dict):
    docs = rendered_overlays[overlay]
    workloads = _workloads(docs)
    for workload in workloads:
        selector = workload["spec"].get("selector", {}).get("matchLabels")
        if selector:
            assert _selects(selector, workload["spec"]["template"]["metadata"]["labels"])
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        matches = [
            w for w in workloads if _selects(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matches) == 1, f"{doc['kind']}/{doc['metadata']['name']} selects {matches}"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in names


@overlay_names
def test_service_ports_and_probes_reach_container_ports(overlay: str, rendered_overlays: dict):
    docs = rendered_overlays[overlay]
    for service in (d for d in docs if d["kind"] == "Service"):
        workload = next(
            w
            for w in _workloads(docs)
            if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        )
        ports = {
            p.get("name"): p["containerPort"] for c in _containers(workload) for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            number = ports.get(target) if isinstance(target, str) else target
            assert number in ports.values(), f"{service['metadata']['name']}: {target}"
            assert number == port["port"], "keep service and container ports equal"
    for workload in _workloads(docs):
        for container in _containers(workload):
            names = {p.get("name") for p in container.get("ports", [])}
            numbers = {p["containerPort"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {}).get("httpGet")
                if probe:
                    assert probe["port"] in names | numbers, f"{container['name']} {kind}"
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            declared = {p["containerPort"] for c in _containers(workload) for p in c["ports"]}
            assert int(annotations["prometheus.io/port"]) in declared


@overlay_names
def test_config_and_secret_references_exist(overlay: str, rendered_overlays: dict):
    docs = _index(rendered_overlays[overlay])
    external = EXTERNAL_SECRETS.get(overlay, {})
    for workload in _workloads(list(docs.values())):
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in docs
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = docs[("ConfigMap", ref["configMapKeyRef"]["name"])]
                    assert ref["configMapKeyRef"]["key"] in cm["data"]
                if "secretKeyRef" in ref:
                    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    if ("Secret", name) in docs:
                        secret = docs[("Secret", name)]
                        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
                    else:
                        assert name in external, f"Secret {name} is neither rendered nor documented"
                        keys = external[name]
                    assert key in keys, f"Secret {name} has no key {key}"
        pod = _pod(workload)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, mount["name"]
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in docs


@overlay_names
def test_probes_hit_routes_the_apps_serve(overlay: str, rendered_overlays: dict):
    docs = _index(rendered_overlays[overlay])
    routes = {"gateway": _app_routes("gateway"), "retrieval": _app_routes("retrieval")}
    routes["ranker"] = VLLM_ROUTES
    for name in SERVICES:
        container = _pod(docs[("Deployment", name)])["containers"][0]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind in container, f"{name} has no {kind}"
            path = container[kind]["httpGet"]["path"]
            assert path in routes[name], f"{name} {kind} probes {path}, not served"
        annotations = _pod_annotations(docs[("Deployment", name)])
        assert annotations["prometheus.io/path"] in routes[name]
    gateway = _pod(docs[("Deployment", "gateway")])["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ranker = _pod(docs[("Deployment", "ranker")])["containers"][0]
    startup = ranker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= RANKER_STARTUP_BUDGET_S


def _pod_annotations(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("annotations", {})


@overlay_names
def test_pods_run_non_root_with_read_only_roots_and_bounded_resources(
    overlay: str, rendered_overlays: dict
):
    for workload in _workloads(rendered_overlays[overlay]):
        pod = _pod(workload)
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in _containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), container["name"]
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        if name in SERVICES or name == "tandem-publish":
            mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: no writable /tmp under a read-only root"


@overlay_names
def test_environment_names_are_settings_the_services_read(
    overlay: str, rendered_overlays: dict, monkeypatch: pytest.MonkeyPatch
):
    from services.common import settings

    names = settings_env_names()
    docs = _index(rendered_overlays[overlay])
    allowed = {
        "gateway": names["gateway"],
        "retrieval": names["retrieval"],
        "tandem-publish": names["gateway"] | names["retrieval"] | job_env_names(),
    }
    for workload_name, known in allowed.items():
        kind = "Job" if workload_name == "tandem-publish" else "Deployment"
        container = _pod(docs[(kind, workload_name)])["containers"][0]
        env = _env_of(container, docs)
        unknown = {k for k in env if k.startswith(("TANDEM_", "JOB_"))} - known
        assert not unknown, f"{workload_name}: no Settings field reads {sorted(unknown)}"
    for role, cls in (
        ("gateway", settings.GatewaySettings),
        ("retrieval", settings.RetrievalSettings),
    ):
        container = _pod(docs[("Deployment", role)])["containers"][0]
        with monkeypatch.context() as patch:
            for key, value in _env_of(container, docs).items():
                patch.setenv(key, "k1" if value == "<secret>" else value)
            parsed = cls(_env_file=None)
        assert str(parsed.artifacts_dir) == "/artifacts"


def test_ranker_argv_is_what_the_launcher_builds(rendered_overlays: dict):
    launch = launcher()
    gpu = _pod(_index(rendered_overlays["gpu-prod"])[("Deployment", "ranker")])["containers"][0]
    expected = launch.build_command(launch.LaunchConfig(**GPU_LAUNCH))
    assert gpu["command"] + gpu["args"] == expected
    cpu = _pod(_index(rendered_overlays["cpu-dev"])[("Deployment", "ranker")])["containers"][0]
    assert cpu["image"] == "tandem-ranker-cpu:dev" and "command" not in cpu  # image entrypoint
    _, config = launch.parse_args(cpu["args"])
    assert config.profile == "cpu" and config.host == "0.0.0.0" and not config.extra_args
    port = next(p["containerPort"] for p in cpu["ports"] if p["name"] == "http")
    assert config.port == port
    mounts = {m["mountPath"] for m in cpu["volumeMounts"]}
    for spec in config.lora_modules:
        path = launch.parse_lora_module(spec)[1]
        assert any(path.startswith(mount + "/") for mount in mounts), path
