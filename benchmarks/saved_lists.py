"""Rendered training and validation lists as safetensors, to train where the GPU is.

``benchmarks/ranker_over_head.py --save-lists DIR`` writes them where the data and retrievers
are; ``--lists DIR`` trains on them anywhere with only the LLM folder beside them (no dataset,
retriever, Faiss or feature store). Each file holds flat token ids, soft slots and soft rows
(fp16, per kind), the letters, the true candidate and the head's base score per list; the
display text is not kept (training never reads it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ranker.prompts import PromptLayout
from ranker.train_data import ValidationSet

LIST_FILES = {
    "train": "train_lists.safetensors",
    "valid": "valid_lists.safetensors",
    "test": "test_lists.safetensors",  # the test item among the served retriever's top-20
}


def save_lists(path: Path, layouts, labels, bases, ranks=None, users: int = 0) -> None:
    """Rendered lists as flat arrays (token ids, soft slots, soft inputs in fp16 per kind) plus
    their labels and bases (``ranks``: the retriever's rank of the true item; ``users``: how
    many users the lists were drawn from, those whose item was not retrieved included)."""
    from safetensors.numpy import save_file

    kinds = sorted({k for layout in layouts for k in layout.soft_kinds})
    flat = {
        "token_ids": [i for lo in layouts for i in lo.token_ids],
        "soft_positions": [p for lo in layouts for p in lo.soft_positions],
        "soft_slots": [s for lo in layouts for s in lo.soft_slots],
        "soft_kinds": [kinds.index(k) for lo in layouts for k in lo.soft_kinds],
    }
    tensors = {name: np.asarray(values, dtype=np.int32) for name, values in flat.items()}
    if tensors["token_ids"].max(initial=0) < 2**16:  # half the bytes to carry
        tensors["token_ids"] = tensors["token_ids"].astype(np.uint16)
    tensors["token_offsets"] = np.cumsum([0] + [len(lo.token_ids) for lo in layouts])
    tensors["soft_offsets"] = np.cumsum([0] + [len(lo.soft_positions) for lo in layouts])
    tensors["letter_ids"] = np.asarray([lo.letter_token_ids for lo in layouts], dtype=np.int32)
    tensors["history_used"] = np.asarray([lo.history_used for lo in layouts], dtype=np.int32)
    for n, kind in enumerate(kinds):
        pairs = [zip(lo.soft_inputs, lo.soft_kinds, strict=True) for lo in layouts]
        rows = [r for pair in pairs for r, k in pair if k == kind]
        tensors[f"soft_inputs.{n}"] = np.stack(rows).astype(np.float16)
    tensors["labels"] = np.asarray(labels, dtype=np.int64)
    tensors["bases"] = np.asarray(bases, dtype=np.float32)
    if ranks is not None:
        tensors["retriever_ranks"] = np.asarray(ranks, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"kinds": json.dumps(kinds), "users": str(users)})


def load_lists(path: Path, text_only: bool = False) -> tuple[list[PromptLayout], dict]:
    """``save_lists``' layouts (with ``text_only``: their soft tokens cut out) and the arrays
    (``users`` among them)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata()
    kinds = json.loads(meta["kinds"])
    t = load_file(str(path))
    t["users"] = int(meta.get("users", 0))
    tokens, soft = t["token_offsets"], t["soft_offsets"]
    taken = dict.fromkeys(range(len(kinds)), 0)
    layouts = []
    for n in range(len(t["labels"])):
        ids = t["token_ids"][tokens[n] : tokens[n + 1]].tolist()
        positions = t["soft_positions"][soft[n] : soft[n + 1]].tolist()
        codes = t["soft_kinds"][soft[n] : soft[n + 1]].tolist()
        inputs = []
        for code in codes:
            inputs.append(t[f"soft_inputs.{code}"][taken[code]].astype(np.float32))
            taken[code] += 1
        if text_only:
            cut = set(positions)
            ids = [i for k, i in enumerate(ids) if k not in cut]
            positions, codes, inputs = [], [], []
        layouts.append(
            PromptLayout(
                token_ids=tuple(ids),
                letter_token_ids=tuple(t["letter_ids"][n].tolist()),
                text="",
                soft_positions=tuple(positions),
                soft_kinds=tuple(kinds[c] for c in codes),
                soft_inputs=tuple(inputs),
                soft_slots=() if text_only else tuple(t["soft_slots"][soft[n] : soft[n + 1]]),
                history_used=int(t["history_used"][n]),
            )
        )
    return layouts, t


def write_lists(folder: Path, train, valid: ValidationSet, test: ValidationSet, users: int):
    """``train`` = (layouts, labels, bases); ``valid``/``test`` carry bases as their scores."""
    save_lists(folder / LIST_FILES["train"], *train)
    for name, lists in (("valid", valid), ("test", test)):
        save_lists(folder / LIST_FILES[name], lists.layouts, lists.labels,
                   lists.retriever_scores, lists.retriever_ranks, users)  # fmt: skip


def read_lists(folder: Path, text_only: bool):
    """``write_lists``' train tuple, and the validation and test sets (test None if absent)
    with the number of users they were drawn from."""
    layouts, arrays = load_lists(folder / LIST_FILES["train"], text_only)
    train = (layouts, arrays["labels"].tolist(), list(arrays["bases"]))
    sets = {}
    for name in ("valid", "test"):
        if not (folder / LIST_FILES[name]).is_file():
            sets[name] = None
            continue
        layouts, arrays = load_lists(folder / LIST_FILES[name], text_only)
        bases = arrays["bases"].astype(np.float64)
        sets[name] = ValidationSet(layouts, arrays["labels"], arrays["retriever_ranks"], bases)
        sets[name + "_users"] = arrays["users"]
    return train, sets
