"""The trainable ranker: LoRA-wrapped LLM + projectors, their set-up, optimizer and checkpoints.

Checkpoints are safetensors + JSON (no pickle): the adapter, the projectors, the optimizer's
tensors with its scalars in the file's metadata, and the loop's state.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ranker.core import ADAPTER_DIR, PROJECTOR_FILES
from ranker.forward import autocast, collate, letter_logits, project_soft_rows
from ranker.projector import Projector, ProjectorConfig
from ranker.prompts import PromptLayout, PromptTokenizer
from ranker.verbalizer import MAX_CANDIDATES

if TYPE_CHECKING:
    from ranker.train import TrainConfig
    from ranker.train_data import ExampleSource

CHECKPOINT_DIR = "checkpoint"


class RankerModel:
    """The LoRA-wrapped LLM and its projectors, trained together.

    With ``aux`` (training only, never shipped) each candidate's signal token is also scored
    directly by a linear probe: a dense per-candidate loss that teaches the candidate projector
    to write "how good" into its token before the LLM has learned to read it. Without it, a
    task that needs the projector to compute relevance (e.g. ``u . x``) sat at chance, since
    the projector gets no gradient until the LLM attends by relevance, and vice versa.
    """

    def __init__(
        self,
        llm,
        projectors: dict[str, Projector],
        pad_id: int,
        precision: str,
        aux: torch.nn.Linear | None = None,
        device: str = "cpu",
    ):
        self.llm = llm.to(device)
        self.projectors = {kind: p.to(device) for kind, p in projectors.items()}
        self.pad_id = pad_id
        self.precision = precision
        self.hidden = llm.get_input_embeddings().weight.shape[1]
        self.aux = aux.to(device) if aux is not None else None
        self.device = device

    def logits(self, layouts: list[PromptLayout]) -> torch.Tensor:
        return self.scores(layouts)[0]

    def scores(self, layouts: list[PromptLayout]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Letter logits ``[B, C]`` and, with the probe, per-candidate probe logits ``[B, C]``."""
        batch = collate(
            [layout.token_ids for layout in layouts],
            [layout.soft_positions for layout in layouts],
            [layout.letter_token_ids for layout in layouts],
            self.pad_id,
        ).to(self.device)
        with autocast(self.precision, self.device):
            soft = project_soft_rows(layouts, self.projectors, self.hidden, self.device)
            letters = letter_logits(self.llm, batch, soft)
        if self.aux is None or not soft.numel():
            return letters, None
        kinds = [k for layout in layouts for k in layout.soft_kinds]
        rows = torch.as_tensor([n for n, k in enumerate(kinds) if k == "candidate"])
        if not len(rows):
            return letters, None
        probe = self.aux(soft[rows.to(self.device)].float()).squeeze(-1)
        out = torch.full_like(letters, float("-inf"))
        cols = torch.as_tensor(
            [s for layout in layouts for s in layout.soft_slots if s >= 0], device=self.device
        )
        owners = torch.as_tensor(
            [b for b, layout in enumerate(layouts) for s in layout.soft_slots if s >= 0],
            device=self.device,
        )
        return letters, out.index_put((owners, cols), probe)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.llm.named_parameters() if "lora_" in n]

    def projector_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for proj in self.projectors.values() for p in proj.parameters()]
        return params + (list(self.aux.parameters()) if self.aux is not None else [])

    def train(self, mode: bool = True) -> None:
        self.llm.train(mode)
        for projector in self.projectors.values():
            projector.train(mode)


def calibrated_projector(
    llm,
    sample: np.ndarray,
    seed: int,
    anchor_ids: Sequence[int] = (),
    row_norm: bool = True,
    hidden_dim: int = 0,
) -> Projector:
    """A projector whose initial outputs have the size of the LLM's token embeddings.

    With ``anchor_ids`` (the letters' token ids) it gets one anchor per slot, initialised to
    those tokens' embeddings: a candidate's token starts out as its own letter. ``row_norm``
    and ``hidden_dim`` (0: the LLM's hidden size) go to the projector's config.
    """
    table = llm.get_input_embeddings().weight
    torch.manual_seed(seed)
    config = ProjectorConfig(
        in_dim=sample.shape[1],
        out_dim=table.shape[1],
        out_scale=1.0,
        anchors=len(anchor_ids),
        row_norm=row_norm,
        hidden_dim=hidden_dim,
    )
    projector = Projector(config)
    with torch.no_grad():
        out = projector.mlp(torch.from_numpy(sample.astype(np.float32)))
        target = table.float().pow(2).mean().sqrt()
        projector.scale.fill_(float(target / out.pow(2).mean().sqrt().clamp(min=1e-8)))
        if anchor_ids:
            projector.anchor.copy_(table[torch.as_tensor(list(anchor_ids))].float())
    return projector


def optimizer_for(model: RankerModel, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": model.lora_parameters(), "lr": config.lr, "base_lr": config.lr}]
    if model.projectors:
        lr = config.projector_lr
        groups.append({"params": model.projector_parameters(), "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def new_model(
    llm, source: ExampleSource, tokens: PromptTokenizer, config: TrainConfig
) -> RankerModel:
    """Fresh LoRA and projectors, each projector calibrated on a first batch's soft inputs."""
    prompt = config.prompt
    if prompt.candidate_signals and not prompt.candidate_letters and not config.letter_anchors:
        raise ValueError(
            "candidates without written letters need letter anchors: nothing would tell the "
            "model which letter names which candidate"
        )
    sample = source.batch(0, 32, MAX_CANDIDATES).layouts
    projectors = {}
    kinds = sorted({kind for layout in sample for kind in layout.soft_kinds})
    for n, kind in enumerate(kinds):
        rows = np.stack(
            [
                r
                for layout in sample
                for r, k in zip(layout.soft_inputs, layout.soft_kinds, strict=True)
                if k == kind
            ]
        )
        candidate = kind == "candidate"
        anchors = tokens.letter_ids if candidate and config.letter_anchors else ()
        row_norm = not (candidate and prompt.relative_signals)
        projectors[kind] = calibrated_projector(
            llm, rows, config.seed + n, anchors, row_norm, config.projector_hidden
        )
    return RankerModel(
        with_lora(llm, config, None),
        projectors,
        tokens.placeholder_id,
        config.precision,
        probe(llm, config),
        config.device,
    )


def probe(llm, config: TrainConfig) -> torch.nn.Linear | None:
    """The training-only per-candidate probe (``RankerModel``), when ``aux_weight`` asks."""
    if not config.aux_weight or not config.prompt.candidate_signals:
        return None
    torch.manual_seed(config.seed + 99)
    return torch.nn.Linear(llm.get_input_embeddings().weight.shape[1], 1)


def with_lora(llm, config, adapter: Path | None):
    """``llm`` with a new LoRA (``config``: r, alpha, dropout, target modules) or a saved one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(llm, adapter, is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, lora)


def load_projectors(folder: Path) -> dict[str, Projector]:
    """The projectors saved in ``folder``, in kind order (the optimizer's parameter order)."""
    return {
        kind: Projector.load(folder / PROJECTOR_FILES[kind]).train()
        for kind in sorted(PROJECTOR_FILES)
        if (folder / PROJECTOR_FILES[kind]).is_file()
    }


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    save_file(tensors, str(path), metadata={"optimizer": json.dumps(meta)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["optimizer"])
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(path)).items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_weights(model: RankerModel, folder: Path) -> None:
    model.llm.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    for kind, projector in model.projectors.items():
        projector.save(folder / PROJECTOR_FILES[kind])


def save_checkpoint(
    run_dir: Path, model: RankerModel, optimizer: torch.optim.Optimizer, state
) -> None:
    """Write the checkpoint next to the old one, then swap: a kill never leaves half of one."""
    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(model, tmp)
    save_optimizer(optimizer, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)
