"""LoRA adapters for the vLLM server: check, export as immutable versions, hot-load, roll back.

Training writes peft format (``adapter_config.json`` + ``adapter_model.safetensors``) with LoRA on
``q_proj``/``k_proj``/``v_proj``; vLLM loads that format as is and packs the three into its fused
``qkv_proj`` (the server runs with ``--lora-target-modules qkv_proj``). ``inspect_adapter`` checks
every tensor before a server ever sees it: only q/k/v LoRA pairs, rank within the server's
``--max-lora-rank``, no DoRA, no extra trained modules.

Exported adapters are immutable directories ``{prefix}-v{n}`` in a store (default
``artifacts/adapters``, mounted read-only as ``/adapters`` in the containers). Versions only go
up: vLLM's prefix cache is keyed by adapter name and path, so a name is never reused for other
weights. Hot loading goes through ``/v1/load_lora_adapter`` (the server needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); rollback unloads the newest version and keeps the
previous one serving. Clients with ``model="auto"`` follow the newest loaded version.
``merge_adapter`` folds an adapter into the base weights for the fastest CPU serving (the
merged checkpoint is served under the adapter's version name, e.g. ``--served-model-name
rec-v3``, and changes by restart instead of hot load).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tandem.artifacts import sha256_file

TARGET_MODULES = ("q_proj", "k_proj", "v_proj")  # packed into qkv_proj by vLLM
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METADATA_FILE = "tandem_adapter.json"
_TENSOR = re.compile(r"\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.lora_(A|B)\.weight$")
_SMOKE_PROMPT = "Adapter smoke test: the ranker reads a prompt and answers with one letter. " * 2


class AdapterError(ValueError):
    """The adapter cannot be served (wrong format or modules) or the server refused it."""


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: int
    sha256: str  # of adapter_model.safetensors: the identity of the weights
    base_model: str


def find_adapter_dir(path: Path) -> Path:
    """``path`` itself, or the one folder below it (a ranker run) that holds a peft adapter."""
    from tandem.artifacts import resolve_run

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    with contextlib.suppress(FileNotFoundError):  # a run, or a kind folder with `latest`
        path = resolve_run(path)
    found = sorted(p.parent for p in path.glob("*/adapter_config.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise AdapterError(f"no peft adapter (adapter_config.json) in {path} or its subfolders")
    raise AdapterError(f"several adapters under {path}: {[str(p) for p in found]}; pass one")


def inspect_adapter(path: Path, max_rank: int = 8) -> AdapterInfo:
    """Check a peft LoRA adapter fits the server's LoRA settings; raise AdapterError if not."""
    from safetensors import safe_open

    path = Path(path)
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise AdapterError(f"{path} has no {name}: save the adapter with peft save_pretrained")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')} adapter; vLLM serves LORA")
    rank = int(config.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"LoRA rank {rank} is outside 1..{max_rank} (--max-lora-rank)")
    for key, why in (
        ("use_dora", "DoRA is not served by vLLM"),
        ("modules_to_save", "extra trained modules (modules_to_save) are not served"),
        ("rank_pattern", "per-module ranks are not supported by this export"),
        ("alpha_pattern", "per-module alphas are not supported by this export"),
    ):
        if config.get(key):
            raise AdapterError(f"{path}: {why} ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: LoRA bias {config['bias']!r} is not served; train bias=none")
    targets: set[str] = set()
    layers: set[int] = set()
    with safe_open(path / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            match = _TENSOR.search(key)
            if match is None:
                raise AdapterError(
                    f"{path}: tensor {key!r} is not a q/k/v LoRA weight; the server packs only "
                    f"{TARGET_MODULES} into qkv_proj (--lora-target-modules qkv_proj)"
                )
            layer, module, side = match.groups()
            shape = tuple(handle.get_slice(key).get_shape())
            if len(shape) != 2 or (shape[0] if side == "A" else shape[1]) != rank:
                raise AdapterError(f"{path}: {key} has shape {shape}, expected rank {rank}")
            targets.add(module)
            layers.add(int(layer))
    if not keys:
        raise AdapterError(f"{path}: the adapter has no tensors")
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        targets=tuple(t for t in TARGET_MODULES if t in targets),
        layers=len(layers),
        sha256=sha256_file(path / "adapter_model.safetensors"),
        base_model=str(config.get("base_model_name_or_path") or ""),
    )


def version_of(name: str, prefix: str = "rec") -> int | None:
    """``n`` of an adapter version name ``{prefix}-v{n}``; None for any other name."""
    match = re.fullmatch(rf"{re.escape(prefix)}-v(\d+)", name)
    return int(match.group(1)) if match else None


def versioned(names: Iterable[str], prefix: str = "rec") -> list[str]:
    """The adapter versions among ``names``, oldest first (the newest is the last)."""
    found = [(v, name) for name in names if (v := version_of(name, prefix)) is not None]
    return [name for _, name in sorted(found)]


class AdapterStore:
    """A folder of immutable exported adapters ``{prefix}-v{n}`` (the server mounts it)."""

    def __init__(self, root: Path, prefix: str = "rec"):
        self.root = Path(root)
        self.prefix = prefix

    def versions(self) -> dict[str, Path]:
        """Exported adapters by name, oldest first."""
        if not self.root.is_dir():
            return {}
        folders = {p.name: p for p in self.root.iterdir() if p.is_dir()}
        return {name: folders[name] for name in versioned(folders, self.prefix)}

    def metadata(self, name: str) -> dict:
        return json.loads((self.root / name / METADATA_FILE).read_text())

    def export(self, source: Path, max_rank: int = 8, at_least: int = 1) -> tuple[str, Path, bool]:
        """Copy a checked adapter into the next version; returns (name, path, created).

        The same weights exported twice return the existing version (``created`` False).
        ``at_least`` lifts the version number above what a server already serves.
        """
        source = find_adapter_dir(source)
        info = inspect_adapter(source, max_rank)
        existing = self.versions()
        for name, path in existing.items():
            meta = path / METADATA_FILE
            if meta.is_file() and json.loads(meta.read_text()).get("sha256") == info.sha256:
                return name, path, False
        numbers = [version_of(n, self.prefix) or 0 for n in existing]
        name = f"{self.prefix}-v{max([at_least - 1, *numbers]) + 1}"
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            for file in ADAPTER_FILES:
                shutil.copy2(source / file, staging / file)
            metadata = {
                "name": name,
                "source": str(source.resolve()),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **asdict(info),
            }
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            staging.rename(self.root / name)  # atomic: a half-written version never shows
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return name, self.root / name, True


def merge_adapter(llm_dir: Path, source: Path, out_dir: Path, max_rank: int = 8) -> Path:
    """Fold a checked adapter into the base weights and save a plain checkpoint to ``out_dir``.

    On CPU, vLLM's LoRA kernels cost ~1.8x per request (measured interleaved on SmolLM2-135M,
    benchmarks/results/ranker_serving.md); serving the merged checkpoint removes that cost, at
    the price of a restart (not a hot load) per adapter version. The embedding table is not
    touched by a q/k/v LoRA, so clients' prompt embeddings stay valid.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = find_adapter_dir(source)
    info = inspect_adapter(source, max_rank)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise AdapterError(f"{out_dir} exists: merged checkpoints are never overwritten")
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, source).merge_and_unload()
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(llm_dir).save_pretrained(staging)
        metadata = {"merged_from": str(source.resolve()), "base": str(Path(llm_dir).resolve())}
        (staging / METADATA_FILE).write_text(json.dumps({**metadata, **asdict(info)}, indent=2))
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


class ServerAdapters:
    """Hot loading and rollback of adapters on one running vLLM server (synchronous: CLI/jobs)."""

    def __init__(
        self,
        base_url: str,
        prefix: str = "rec",
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.prefix = prefix
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, trust_env=False, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServerAdapters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            return self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise AdapterError(f"vLLM at {self.base_url} unreachable: {exc}") from None

    def loaded(self) -> list[str]:
        """Versioned adapters the server serves now, oldest first."""
        response = self._call("GET", "/v1/models")
        if response.status_code != 200:
            raise AdapterError(f"/v1/models answered {response.status_code}: {response.text[:200]}")
        names = [str(m.get("id")) for m in response.json().get("data", []) if m.get("parent")]
        return versioned(names, self.prefix)

    def base_model(self) -> str:
        response = self._call("GET", "/v1/models")
        return next(str(m["id"]) for m in response.json()["data"] if not m.get("parent"))

    def load(self, name: str, server_path: str, smoke_test: bool = True) -> None:
        """Load ``server_path`` (as the server sees it) under ``name``; prove it scores."""
        if version_of(name, self.prefix) is None:
            raise AdapterError(f"adapter name {name!r} must be versioned like {self.prefix}-v1")
        if name in self.loaded():
            raise AdapterError(f"{name} is already loaded; versions are never reused")
        response = self._call(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": server_path}
        )
        if response.status_code != 200:
            raise AdapterError(
                f"vLLM refused {name} from {server_path}: {response.status_code} "
                f"{_message(response)} (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server, "
                "and is the path visible inside the server?)"
            )
        if smoke_test:
            body = {"model": name, "prompt": _SMOKE_PROMPT, "max_tokens": 1, "temperature": 0}
            answer = self._call("POST", "/v1/completions", body)
            if answer.status_code != 200:
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
                raise AdapterError(
                    f"{name} loaded but cannot score ({answer.status_code} {_message(answer)}); "
                    "unloaded it again"
                )

    def unload(self, name: str) -> None:
        response = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code != 200:
            raise AdapterError(f"cannot unload {name}: {response.status_code} {_message(response)}")

    def rollback(self) -> tuple[str, str]:
        """Unload the newest version, keep the previous one; returns (removed, now serving)."""
        loaded = self.loaded()
        if len(loaded) < 2:
            raise AdapterError(
                f"nothing to roll back to: the server serves {loaded or 'no versioned adapter'}"
            )
        self.unload(loaded[-1])
        return loaded[-1], loaded[-2]


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
