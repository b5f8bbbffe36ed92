"""The served ranker's stage cost per ``/recommend``: render + one forward, in-process, c=1.

What the gateway's ``prompt`` and ``ranker`` stages do for one request, on real MovieLens-100K
test users: the retriever's top-20 with scores and the user vector, the ranker run's prompt
(soft tokens projected), one forward pass of the in-process transformers backend at batch 1
(a head ranker: its signal rows and one matrix-vector product).
The ranker is the one ``make run`` serves (``--run``, default ``models/ranker``) on the LLM it
was trained on. The result is merged into ``benchmarks/results/ranker_speed.json`` as
``served_ranker_ms_p50`` (and a ``served_ranker`` block), so it sits beside the one-pass vs
generation ratio of the base LLM measured by ``ranker_speed.py``.

    python benchmarks/ranker_served_speed.py [--run models/ranker] [--llm artifacts/llm-2]
        [--requests 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ranker.core import Ranker  # noqa: E402
from ranker.head import HeadRanker  # noqa: E402
from ranker.inputs import load_inputs, resolve_inputs  # noqa: E402
from ranker.two_stage import retrieve, user_input  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "models" / "ranker")
    parser.add_argument("--llm", type=Path, default=artifacts_root() / "llm-2")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = Dataset.load(dataset_dir("ml-100k"))
    none = "none"  # the shipped ranker reads no enrichment run
    sources = load_inputs(
        data,
        resolve_inputs(artifacts_root(), "ml-100k", items=none, captions=none, preferences=none),
    )
    ranker = Ranker.load(args.run, args.llm, precision="fp32", max_batch=1)
    picked = np.random.default_rng(0).choice(data.split().num_users, args.requests, replace=False)
    users = retrieve(sources, picked, "test")  # what evaluation and serving build prompts from
    inputs = [user_input(sources, users, r, users.top[r]) for r in range(len(picked))]
    for inp in inputs[:5]:  # warm-up
        prompts, _ = ranker.render_all(inp)
        ranker.backend.score_sync(prompts)
    render_ms, forward_ms, total_ms = [], [], []
    for inp in inputs:
        t0 = time.perf_counter()
        prompts, _ = ranker.render_all(inp)
        t1 = time.perf_counter()
        ranker.backend.score_sync(prompts)
        t2 = time.perf_counter()
        render_ms.append((t1 - t0) * 1000)
        forward_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    head = isinstance(ranker, HeadRanker)  # a linear head on signal rows: no LLM
    block = {
        "run": str(args.run),
        "kind": "head" if head else "llm",
        "llm": None if head else str(args.llm),
        "llm_layers": None
        if head
        else json.loads((args.llm / "config.json").read_text())["num_hidden_layers"],
        "prompt_tokens": len(ranker.render_all(inputs[0])[0][0].token_ids),  # head: 1 per item
        "requests": args.requests,
        "threads": args.threads,
        "render_ms_p50": round(statistics.median(render_ms), 2),
        "forward_ms_p50": round(statistics.median(forward_ms), 2),
        "ms_p50": round(statistics.median(total_ms), 2),
        "ms_p99": round(float(np.percentile(total_ms, 99)), 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    path = RESULTS / "ranker_speed.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["served_ranker"] = block
    report["served_ranker_ms_p50"] = block["ms_p50"]
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(block, indent=2))


if __name__ == "__main__":
    main()
