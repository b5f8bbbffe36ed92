"""Run folders and manifests: every artifact says what made it and hashes its files.

A run lives in ``artifacts/<dataset>/<kind>/<run-id>/`` with a ``manifest.json``; the file
``artifacts/<dataset>/<kind>/latest`` holds the id of the newest finished run. Serving loads a
manifest by path, never by guessing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tandem

MANIFEST = "manifest.json"
LATEST = "latest"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


@dataclass
class Manifest:
    """What a run was (kind, config, data fingerprint), what it measured, and its files."""

    kind: str
    run_id: str
    dataset: str
    config: dict[str, Any]
    data_fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    versions: dict[str, str] = field(
        default_factory=lambda: {"tandem": tandem.__version__, "python": platform.python_version()}
    )

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)

    @classmethod
    def read(cls, run_dir: Path) -> Manifest:
        path = run_dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a finished Tandem run?")
        return cls(**json.loads(path.read_text()))

    def write(self, run_dir: Path) -> None:
        """Hash every file in ``run_dir`` (except the manifest) and write the manifest last."""
        self.files = {
            str(p.relative_to(run_dir)): sha256_file(p)
            for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        tmp = run_dir / (MANIFEST + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(run_dir / MANIFEST)

    def verify(self, run_dir: Path) -> list[str]:
        """Files whose hash no longer matches (or that are gone)."""
        bad = []
        for name, expected in self.files.items():
            path = run_dir / name
            if not path.is_file() or sha256_file(path) != expected:
                bad.append(name)
        return bad

    def check_files(self, run_dir: Path) -> None:
        """ValueError naming the files ``verify`` finds changed or gone: a run is served only
        as it was written."""
        changed = self.verify(run_dir)
        if changed:
            raise ValueError(f"run {run_dir} has missing or modified files: {changed}")


def runs_dir(root: Path, dataset: str, kind: str) -> Path:
    return root / dataset / kind


def mark_latest(run_dir: Path) -> None:
    """Point ``<kind>/latest`` at ``run_dir`` (atomic replace of a small text file)."""
    pointer = run_dir.parent / LATEST
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(run_dir.name)
    tmp.replace(pointer)


def resolve_run(path: Path) -> Path:
    """A run folder from either the folder itself or its kind folder (following ``latest``)."""
    if (path / MANIFEST).is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        run = path / pointer.read_text().strip()
        if (run / MANIFEST).is_file():
            return run
    raise FileNotFoundError(f"no finished run at {path} (no {MANIFEST} and no valid {LATEST})")
