"""Resumable JSONL output: append records in checkpoints, pick up where a killed job stopped.

The output file is the checkpoint: each flush appends whole lines and fsyncs, and a small
``progress.json`` beside it records the job's config. On restart the finished keys are read
back (a torn last line from a crash is cut off), and a job started with a different config is
refused instead of silently mixing outputs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"


class CheckpointMismatch(ValueError):
    """The folder holds a job with another config; resume with the same options or a new run."""


class JsonlCheckpoint:
    def __init__(self, path: Path, key: str, config: dict[str, Any]):
        self.path = Path(path)
        self.key = key
        self.config = json.loads(json.dumps(config, default=str))
        self.done: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        progress = self.path.parent / PROGRESS_FILE
        if progress.is_file():
            saved = json.loads(progress.read_text()).get("config")
            if saved != self.config:
                raise CheckpointMismatch(
                    f"{self.path.parent} holds a job with a different config; "
                    "resume with the same options or start a new run"
                )
        if self.path.is_file():
            self._recover()
        self._write_progress()

    def _recover(self) -> None:
        """Read finished records; truncate a torn trailing line left by a crash."""
        good_bytes = 0
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                self.done[str(record[self.key])] = record
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)

    def _write_progress(self) -> None:
        progress = self.path.parent / PROGRESS_FILE
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"config": self.config, "done": len(self.done), "updated_at": time.time()},
                indent=2,
            )
        )
        tmp.replace(progress)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.done

    def write(self, records: Iterable[dict[str, Any]]) -> int:
        """Append ``records`` durably; returns how many were new."""
        lines = []
        for record in records:
            key = str(record[self.key])
            if key in self.done:
                continue
            self.done[key] = record
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
            self._write_progress()
        return len(lines)

    def finish(self) -> None:
        """The job is complete: the progress file is no longer needed."""
        (self.path.parent / PROGRESS_FILE).unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL file, with the line number in the error when one is malformed."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
    return records
