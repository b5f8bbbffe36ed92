"""Adapter checks, immutable versioned export, and the hot-load/rollback client's decisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from ranker.adapters import (
    METADATA_FILE,
    AdapterError,
    AdapterStore,
    ServerAdapters,
    find_adapter_dir,
    inspect_adapter,
    merge_adapter,
)


def _lora(base: Path, out: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    options = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    get_peft_model(model, LoraConfig(**{**options, **config})).save_pretrained(out)
    return out


def _edit_config(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


def test_a_qkv_lora_passes_the_check(tiny_lora_dir: Path):
    info = inspect_adapter(tiny_lora_dir)
    assert info.rank == 8 and info.targets == ("q_proj", "k_proj", "v_proj") and info.layers == 2
    assert len(info.sha256) == 64


def test_loras_the_server_cannot_pack_into_qkv_are_refused(tiny_llm_dir: Path, tmp_path: Path):
    mlp = _lora(tiny_llm_dir, tmp_path / "mlp", target_modules=["q_proj", "down_proj"])
    with pytest.raises(AdapterError, match="not a q/k/v LoRA weight"):
        inspect_adapter(mlp)
    big = _lora(tiny_llm_dir, tmp_path / "big", r=16)
    with pytest.raises(AdapterError, match=r"rank 16 is outside 1\.\.8"):
        inspect_adapter(big)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "vLLM serves LORA"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 4}, "expected rank 4"),
    ],
)
def test_config_features_vllm_does_not_serve_are_refused(
    tiny_lora_dir: Path, tmp_path: Path, changes, message
):
    with pytest.raises(AdapterError, match=message):
        inspect_adapter(_edit_config(tiny_lora_dir, tmp_path / "edited", **changes))


def test_exports_are_immutable_versions_and_the_same_weights_keep_their_version(
    tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path: Path
):
    store = AdapterStore(tmp_path / "adapters")
    first = store.export(tiny_lora_dir)
    assert first[0] == "rec-v1" and first[2]
    assert sorted(p.name for p in first[1].iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", METADATA_FILE]
    )
    assert store.export(tiny_lora_dir)[:2] == (first[0], first[1])
    assert not store.export(tiny_lora_dir)[2]
    other = _lora(tiny_llm_dir, tmp_path / "other", r=4, init_lora_weights=False)
    name, _, created = store.export(other, at_least=5)  # the server already serves rec-v4
    assert (name, created) == ("rec-v5", True)
    assert store.metadata(name)["rank"] == 4
    assert list(store.versions()) == ["rec-v1", "rec-v5"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no staging left


def test_an_adapter_is_found_inside_a_run_folder(tiny_lora_dir: Path, tmp_path: Path):
    run = tmp_path / "runs" / "r1"
    shutil.copytree(tiny_lora_dir, run / "adapter")
    (run / "manifest.json").write_text("{}")
    (tmp_path / "runs" / "latest").write_text("r1")
    assert find_adapter_dir(tmp_path / "runs") == run / "adapter"
    with pytest.raises(AdapterError, match="no peft adapter"):
        find_adapter_dir(tmp_path)


def test_a_merged_checkpoint_scores_like_base_plus_adapter(
    tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path: Path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(tiny_llm_dir, tiny_lora_dir, tmp_path / "rec-v1-merged")
    ids = torch.arange(5, 45).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, tiny_lora_dir)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((merged_dir / METADATA_FILE).read_text())["rank"] == 8
    assert (merged_dir / "tokenizer.json").is_file()
    with pytest.raises(AdapterError, match="never overwritten"):
        merge_adapter(tiny_llm_dir, tiny_lora_dir, merged_dir)


class FakeAdmin:
    """The adapter endpoints of a vLLM server."""

    def __init__(self, loaded=("rec-v1",), completions_status: int = 200):
        self.loaded = list(loaded)
        self.completions_status = completions_status
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.url.path, body))
        if request.url.path == "/v1/models":
            data = [{"id": "base", "parent": None}]
            data += [{"id": n, "parent": "base"} for n in self.loaded]
            return httpx.Response(200, json={"data": data})
        if request.url.path == "/v1/load_lora_adapter":
            if body["lora_path"].startswith("/missing"):
                return httpx.Response(404, json={"error": {"message": "No adapter found"}})
            self.loaded.append(body["lora_name"])
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.remove(body["lora_name"])
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/completions":
            return httpx.Response(self.completions_status, json={"error": {"message": "boom"}})
        return httpx.Response(404)


def _admin(fake: FakeAdmin) -> ServerAdapters:
    return ServerAdapters("http://vllm.test", transport=httpx.MockTransport(fake))


def test_load_smoke_tests_the_new_version_and_rollback_keeps_the_previous():
    fake = FakeAdmin()
    with _admin(fake) as admin:
        admin.load("rec-v2", "/adapters/rec-v2")
        assert admin.loaded() == ["rec-v1", "rec-v2"]
        assert any(path == "/v1/completions" and b["model"] == "rec-v2" for path, b in fake.calls)
        assert admin.rollback() == ("rec-v2", "rec-v1")
        assert admin.loaded() == ["rec-v1"]
        with pytest.raises(AdapterError, match="nothing to roll back to"):
            admin.rollback()


def test_load_refuses_reused_or_unversioned_names_and_explains_server_refusals():
    with _admin(FakeAdmin()) as admin:
        with pytest.raises(AdapterError, match="never reused"):
            admin.load("rec-v1", "/adapters/rec-v1")
        with pytest.raises(AdapterError, match="versioned"):
            admin.load("latest", "/adapters/x")
        with pytest.raises(AdapterError, match="path visible inside the server"):
            admin.load("rec-v2", "/missing/rec-v2")


def test_an_adapter_that_cannot_score_is_unloaded_again():
    fake = FakeAdmin(completions_status=500)
    with _admin(fake) as admin:
        with pytest.raises(AdapterError, match="cannot score"):
            admin.load("rec-v2", "/adapters/rec-v2")
        assert admin.loaded() == ["rec-v1"]


def test_an_unreachable_server_is_a_clear_error():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    admin = ServerAdapters("http://vllm.test", transport=httpx.MockTransport(refuse))
    with pytest.raises(AdapterError, match="unreachable"):
        admin.loaded()
