"""An older revision of this repository, run beside the current one in a benchmark.

``export_revision`` unpacks the revision's tree (``git archive``: no worktree bookkeeping);
servers started with that tree as their working directory import its code. An older revision
reads only the formats it wrote, so its artifacts are prepared by its own code
(``prepare_artifacts``: the dataset; ``prepare_in``: features in Redis, the tiny ranker),
while the retriever run is shared so both arms retrieve identically.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "ff35a7e"  # the request path the issue-17 review measured (overhead p99 23.7 ms)

PREPARE_SCRIPT = """
import json, sys
from pathlib import Path
from tandem.data import Dataset
# Chosen by what the tree has, not by trying the import: the editable install of the current
# checkout would lend an older tree its own tandem.testing, written for the newer code.
if Path("tandem/testing/stack.py").is_file():
    from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run, publish_dataset
    from tandem.testing.tiny_llm import make_tiny_llm, make_tiny_lora
else:  # revisions before tandem.testing kept these under tests/fixtures
    from tests.fixtures.services import ITEM_DIM, make_tiny_ranker_run, publish_dataset
    from tests.fixtures.tiny_llm import make_tiny_llm, make_tiny_lora
args = json.loads(sys.argv[1])
if "redis_url" in args:
    dataset = Dataset.load(Path(args["data"]))
    publish_dataset(args["redis_url"], args["namespace"], dataset, manifest_id="bench")
if "tiny" in args:
    from retriever.core import Retriever
    work = Path(args["tiny"])
    llm = make_tiny_llm(work / "tiny_llm")
    lora = make_tiny_lora(llm, work / "tiny_lora")
    retriever = Retriever.load(Path(args["retriever_run"]))
    make_tiny_ranker_run(
        work / "ranker" / "tiny-ranker", llm, lora,
        item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=retriever.manifest.dataset,
    )
"""


def export_revision(rev: str, work: Path) -> tuple[Path, str]:
    """The tree of ``rev`` under ``work`` and its full commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tree = work / f"baseline-{commit[:12]}"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, commit


def prepare_artifacts(
    tree: Path, artifacts: Path, dataset: str, retriever_run: Path
) -> tuple[Path, Path]:
    """An artifacts root beside ``tree``: ``dataset`` prepared by the tree's code, a copy of
    ``retriever_run`` and a link to the base LLM (plain safetensors, any revision reads it).
    Returns (root, the copied run)."""
    root = tree.with_name(tree.name + "-artifacts")
    subprocess.run(
        [sys.executable, "-m", "tandem.cli", "data", "prepare", "--dataset", dataset],
        cwd=tree, check=True, capture_output=True,
        env={**os.environ, "TANDEM_ARTIFACTS_DIR": str(root)},
    )  # fmt: skip
    run = root / dataset / "retriever" / retriever_run.name
    shutil.copytree(retriever_run, run)
    if (artifacts / "llm").is_dir():
        (root / "llm").symlink_to(artifacts / "llm")
    return root, run


def prepare_in(source: Path, args: dict) -> None:
    """Publish features / build the tiny ranker with ``source``'s own code (its formats)."""
    subprocess.run(
        [sys.executable, "-c", PREPARE_SCRIPT, json.dumps(args)],
        cwd=source, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
