"""Who else liked it: each candidate's popularity among users like this one.

A sequential ID retriever never sees who the user is. MovieLens says it (gender, age,
occupation), and what people of one group watch differs from what everyone watches. For each
of the three attributes the ranker gets one column per candidate: the log lift of the item's
share of the user's group's training interactions over its share of all of them (add-one
smoothed; 0 when the group is unknown). These are the "features the ID retriever never sees"
of issue 13.

The requesting user's own interactions are always taken out of the counts ("other people",
as ``ranker.covisit`` does): a training list would otherwise see its own target, and the items
its user consumed later, counted in its group. Training leaves out the user's whole training
sequence; serving and evaluation leave out the request's history, whose items are never
candidates, so every path computes the same quantity.

Built from training interactions only; saved as safetensors with the run, so serving reads
exactly what training counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ATTRIBUTES = ("gender", "age", "occupation")
AGE_BANDS = (18, 25, 35, 45, 50, 56)  # ages are grouped at these bounds (MovieLens-1M's)
DEMOGRAPHICS_FILE = "demographics.safetensors"
WIDTH = len(ATTRIBUTES)

Attributes = Mapping[str, object]  # e.g. {"gender": "F", "age": 24, "occupation": "writer"}


def attributes_of(record: object | None) -> dict[str, object] | None:
    """The attributes of anything with ``age``/``gender``/``occupation`` (a dataset's user
    profile, a feature-store user record); None for an unknown user."""
    if record is None:
        return None
    return {attribute: getattr(record, attribute, None) for attribute in ATTRIBUTES}


def group_of(attribute: str, value: object) -> str | None:
    """The group name of one attribute value (ages by band); None when unknown."""
    if value is None or value == "":
        return None
    if attribute == "age":
        return f"band{int(np.digitize(int(value), AGE_BANDS))}"
    return str(value)


@dataclass(frozen=True)
class DemographicTable:
    total: np.ndarray  # [num_items + 1] training interactions per item
    names: dict[str, tuple[str, ...]]  # attribute -> its group names (row order of counts)
    counts: dict[str, np.ndarray]  # attribute -> [groups, num_items + 1]

    @classmethod
    def build(
        cls, attributes: Sequence[Attributes | None], train: Sequence[np.ndarray], num_items: int
    ) -> DemographicTable:
        """From each user's attributes and training sequence (item indices), in user order."""
        total = np.zeros(num_items + 1, dtype=np.float64)
        for seq in train:
            np.add.at(total, seq, 1)
        names, counts = {}, {}
        for attribute in ATTRIBUTES:
            groups = [group_of(attribute, (a or {}).get(attribute)) for a in attributes]
            known = tuple(sorted({g for g in groups if g is not None}))
            row = {g: k for k, g in enumerate(known)}
            table = np.zeros((len(known), num_items + 1), dtype=np.float64)
            for group, seq in zip(groups, train, strict=True):
                if group is not None:
                    np.add.at(table[row[group]], seq, 1)
            names[attribute], counts[attribute] = known, table
        return cls(total, names, counts)

    def features(
        self, attributes: Attributes | None, items: np.ndarray, own: np.ndarray
    ) -> np.ndarray:
        """``[n, 3]`` log lifts of ``items`` (indices) for a user of ``attributes``, with the
        user's own interactions ``own`` (indices) left out of every count."""
        items = np.asarray(items, dtype=np.int64)
        mine = np.isin(items, np.asarray(own, dtype=np.int64)).astype(np.float64)
        width = len(self.total)
        overall = np.log((self.total[items] - mine + 1) / (self.total.sum() + width))
        out = np.zeros((len(items), WIDTH), dtype=np.float32)
        for column, attribute in enumerate(ATTRIBUTES):
            group = group_of(attribute, (attributes or {}).get(attribute))
            if group not in self.names[attribute]:
                continue
            counts = self.counts[attribute][self.names[attribute].index(group)]
            share = np.log((counts[items] - mine + 1) / (counts.sum() + width))
            out[:, column] = share - overall
        return out

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        # counts are integers well below 2**24: float32 holds them exactly, in half the bytes
        tensors = {"total": self.total, **{f"counts.{a}": c for a, c in self.counts.items()}}
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: Path) -> DemographicTable:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            names = json.loads((handle.metadata() or {})["names"])
            counts = {a: handle.get_tensor(f"counts.{a}").astype(np.float64) for a in ATTRIBUTES}
            total = handle.get_tensor("total").astype(np.float64)
        return cls(total, {a: tuple(names[a]) for a in ATTRIBUTES}, counts)
