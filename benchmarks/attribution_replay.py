"""Click attribution replayed on MovieLens-100K: each test user asks ``/recommend`` once, and
their held-out test item, when the answer shows it, comes back as a click on that answer.

Protocol: the real gateway app (in-process ASGI, real Redis on a fresh namespace, deleted
after) serves two variants split 50/50 by the salted user hash: ``retriever`` (the control,
retriever order, no LLM) and ``zeroshot`` (the in-process LLM of ``--llm`` with no trained
adapter at fusion weight 0.5: a canary the decision should catch). Every one of the 943 users
sends its train + validation history with the request (so the feature store plays no part)
and asks for ``k = 10``. When the answer contains the user's test item, an event with the
answer's ``request_id`` is posted: the gateway attributes it inside the ingest script. The
figures are then read back exactly as ``tandem variants report`` reads them. A variant's
click-through rate is therefore its HitRate@10 on its own users, and the MRR of clicked items
is MRR@10 / HitRate@10: the replay checks the attribution path end to end against numbers the
offline evaluation can reproduce (``offline_check``).

    .venv/bin/python benchmarks/attribution_replay.py --retriever-run RUN --llm artifacts/llm-2

The result is the ``attribution`` key of ``benchmarks/results/variants.json`` (other keys kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


async def replay(args) -> dict:
    import httpx
    import redis

    from feature_store.attribution import read_counts
    from services.common.ids import MAX_LIST
    from services.common.settings import GatewaySettings
    from services.common.variants import VariantsConfig
    from services.gateway.app import create_app
    from services.gateway.attribution import figures
    from tandem.data import Dataset
    from tandem.paths import dataset_dir
    from tandem.testing.private_redis import delete_namespace

    namespace = f"replay-{uuid.uuid4().hex[:8]}"
    variants = VariantsConfig.model_validate(
        {
            "salt": "replay",
            "variants": [
                {"name": "retriever", "share": 0.5, "control": True, "backend": "none"},
                {"name": "zeroshot", "share": 0.5, "backend": "inprocess", "rank_weight": 0.5},
            ],
        }
    )
    settings = GatewaySettings(
        _env_file=None,
        redis_url=args.redis_url,
        namespace=namespace,
        retriever_run=args.retriever_run,
        llm_dir=args.llm,
        variants=variants,
        publish_if_empty=False,
        deadline_ms=60_000,
        ranker_deadline_ms=59_000,
    )
    dataset = Dataset.load(dataset_dir("ml-100k"))
    split = dataset.split()
    users = dataset.interactions.user_ids
    histories, targets = split.test_inputs(), split.test_target
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    served: dict[str, list[int]] = {}  # variant -> 1-based rank of the test item (0 = miss)
    started = time.perf_counter()
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=120) as c,
        ):
            for n, (user, history, target) in enumerate(
                zip(users, histories, targets, strict=True)
            ):
                recent = dataset.catalog.id_of(history[-MAX_LIST:])  # the API's bound
                body = {"user_id": user, "k": 10, "history": recent}
                response = await c.post("/recommend", json=body)
                response.raise_for_status()
                answer = response.json()
                items = [item["item_id"] for item in answer["items"]]
                (test_item,) = dataset.catalog.id_of([target])
                rank = items.index(test_item) + 1 if test_item in items else 0
                served.setdefault(answer["model"]["variant"], []).append(rank)
                if rank:
                    await _wait_recorded(args.redis_url, namespace, answer["request_id"])
                    event = {
                        "event_id": f"replay-{n}",
                        "user_id": user,
                        "item_id": test_item,
                        "type": "click",
                        "request_id": answer["request_id"],
                    }
                    response = await c.post("/events", json={"events": [event]})
                    response.raise_for_status()
        client = redis.Redis.from_url(args.redis_url)
        rows = figures(read_counts(client, namespace), control="retriever")
    finally:
        delete_namespace(args.redis_url, namespace)
    result = {
        "protocol": __doc__.split("    .venv")[0].strip(),
        "users": len(users),
        "seconds": round(time.perf_counter() - started, 1),
        "variants": {},
    }
    for row in rows:
        ranks = served[row.counts.variant]
        hits = [r for r in ranks if r]
        untested = math.isnan(row.p_value)  # the control is not tested against itself
        result["variants"][row.counts.variant] = {
            "requests": row.counts.requests,
            "clicks": row.counts.clicks,
            "ctr": round(row.ctr, 4),
            "ctr_95": [round(row.ctr_low, 4), round(row.ctr_high, 4)],
            "mrr_of_clicks": round(row.mrr, 4),
            "ctr_difference_vs_control": None if untested else round(row.ctr_difference, 4),
            "p_value_vs_control": None if untested else round(row.p_value, 4),
            # What the client saw, computed here without Redis: must equal the attributed figures.
            "offline_check": {
                "hit_rate@10": round(len(hits) / len(ranks), 4),
                "mrr_of_hits": round(sum(1 / r for r in hits) / len(hits), 4) if hits else 0.0,
            },
        }
    return result


async def _wait_recorded(url: str, namespace: str, request_id: str, timeout_s: float = 10) -> None:
    """The answer is recorded after the response is sent: wait for it before clicking."""
    import redis.asyncio

    from feature_store.attribution import AttributionKeys

    client = redis.asyncio.Redis.from_url(url)
    key = AttributionKeys(namespace).answer(request_id)
    deadline = time.monotonic() + timeout_s
    try:
        while not await client.exists(key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"answer {request_id} was never recorded")
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever-run", type=Path, required=True)
    parser.add_argument("--llm", type=Path, required=True, help="base LLM of the zeroshot arm")
    parser.add_argument(
        "--redis-url", default=os.environ.get("TANDEM_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "variants.json")
    args = parser.parse_args(argv)
    result = asyncio.run(replay(args))
    result["command"] = "python benchmarks/attribution_replay.py " + " ".join(argv)
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    existing["attribution"] = result
    args.out.write_text(json.dumps(existing, indent=2))
    (RESULTS / "attribution_replay.md").write_text(markdown(result))
    print(json.dumps(result["variants"], indent=2))


def markdown(result: dict) -> str:
    rows = [
        "| variant | answers | clicks | CTR [95%] | MRR of clicks | Δ CTR vs control | p | "
        "offline HR@10 / MRR of hits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        low, high = v["ctr_95"]
        diff, p = v["ctr_difference_vs_control"], v["p_value_vs_control"]
        rows.append(
            f"| {name} | {v['requests']} | {v['clicks']} | {v['ctr']:.4f} [{low:.4f}, {high:.4f}] "
            f"| {v['mrr_of_clicks']:.4f} | {'-' if diff is None else f'{diff:+.4f}'} | "
            f"{'-' if p is None else p} | {v['offline_check']['hit_rate@10']:.4f} / "
            f"{v['offline_check']['mrr_of_hits']:.4f} |"
        )
    return f"""# Click attribution, replayed on MovieLens-100K

{result["protocol"]}

{chr(10).join(rows)}

{result["users"]} users in {result["seconds"]} s. Command: `{result["command"]}`.
Raw numbers: the `attribution` key of `variants.json`.
"""


if __name__ == "__main__":
    main(sys.argv[1:])
