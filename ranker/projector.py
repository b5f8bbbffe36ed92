"""Projector: a 2-layer MLP that maps an outside embedding into the LLM's input space (RSLLM).

One projector per embedding source (item multimodal embeddings, the retriever's user vector,
candidate signals). Its output replaces the input embedding of a placeholder token, so the LLM
reads it as a "soft token". Saved as safetensors with its config in the file's metadata.

A candidate projector has ``anchors``: one learned row per candidate slot, added to its output
and initialised to the embedding of that slot's letter. The candidate's token then *is* its
letter plus its evidence, so answering means copying the letter of the best-evidenced token —
the pointing a small LLM learns quickly — instead of recovering which letter preceded it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file
from scipy.special import erf
from torch import nn


@dataclass(frozen=True)
class ProjectorConfig:
    in_dim: int = 64  # embedding size of the source (item tower or retriever)
    out_dim: int = 576  # the LLM's hidden size (SmolLM2-135M: 576)
    hidden_dim: int = 0  # MLP width; 0 means out_dim
    dropout: float = 0.0  # on the hidden layer, training only
    out_scale: float = 0.02  # initial output scale, about the size of token embeddings
    anchors: int = 0  # learned per-slot rows added to the output (candidate letters); 0 = none
    row_norm: bool = True  # layer-norm each input row (sources differ in scale); off for
    # inputs already scaled relative to their list (ranker.signals, relative)


class Projector(nn.Module):
    """Linear -> GELU -> dropout -> Linear, with a learnable output scale."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_dim or config.out_dim
        self.fc1 = nn.Linear(config.in_dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(hidden, config.out_dim)
        self.scale = nn.Parameter(torch.tensor(float(config.out_scale)))
        self.norm = nn.LayerNorm(config.in_dim, elementwise_affine=False)
        if config.anchors:
            self.anchor = nn.Parameter(torch.zeros(config.anchors, config.out_dim))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The projection alone, without slot anchors."""
        x = self.norm(x) if self.config.row_norm else x
        return self.scale * self.fc2(self.drop(self.act(self.fc1(x))))

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]``; inputs are layer-normed unless ``row_norm``
        is off.

        ``slots`` (``[...]`` long) picks the anchor row added to each output when the projector
        has anchors."""
        out = self.mlp(x)
        if self.config.anchors:
            if slots is None:
                raise ValueError("this projector has slot anchors: pass each row's slot")
            out = out + self.anchor[slots]
        return out

    def arrays(self) -> ProjectorArrays:
        """The same function as numpy arrays, for serving (see ``ProjectorArrays``)."""
        weights = {k: v.detach().float().numpy().copy() for k, v in self.state_dict().items()}
        return ProjectorArrays(
            self.config, weights["fc1.weight"].T.copy(), weights["fc1.bias"],
            weights["fc2.weight"].T.copy(), weights["fc2.bias"], float(weights["scale"]),
            weights.get("anchor"),
        )  # fmt: skip

    def save(self, path: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: Path) -> Projector:
        if not path.is_file():
            raise FileNotFoundError(f"projector file {path} not found")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path} has no projector config in its metadata")
        projector = cls(ProjectorConfig(**json.loads(metadata["config"])))
        projector.load_state_dict(load_file(str(path)))
        return projector.eval()


@dataclass(frozen=True)
class ProjectorArrays:
    """A trained projector in numpy: what serving runs per request.

    A request projects a few dozen rows through two small layers; torch spends more on
    dispatching its dozen operators than on the arithmetic (the tiny test ranker's 71 rows:
    0.39 ms through torch, 0.18 ms here on an idle core, and torch's intra-op threads fare far
    worse beside a busy ranker), so serving evaluates the same function (layer norm, exact
    GELU, scale, anchors) with numpy. Training keeps the ``Projector`` module and gradients.
    """

    config: ProjectorConfig
    w1: np.ndarray  # [in_dim, hidden]
    b1: np.ndarray
    w2: np.ndarray  # [hidden, out_dim]
    b2: np.ndarray
    scale: float
    anchor: np.ndarray | None  # [anchors, out_dim]

    def __call__(self, x: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.config.row_norm:
            centred = x - x.mean(axis=-1, keepdims=True)
            x = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + 1e-5)
        h = x @ self.w1 + self.b1
        h = 0.5 * h * (1.0 + erf(h / np.float32(np.sqrt(2.0))))
        out = self.scale * (h @ self.w2 + self.b2)
        if self.anchor is not None:
            if slots is None:
                raise ValueError("this projector has slot anchors: pass each row's slot")
            out = out + self.anchor[np.asarray(slots)]
        return out.astype(np.float32, copy=False)
