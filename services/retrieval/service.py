"""The retrieval work behind ``POST /retrieve``: the retriever on the event loop, timed.

The model call (~1 ms: one onnxruntime pass on one thread, one Faiss scan) runs on the loop,
not in a worker thread. This service's loop has no other work to keep free, and the thread hop
cost more than it bought on the 2-core host (ad hoc, same stack, no ranker, 300/800/1,500
requests at c=1/8/32): handing the call to ``asyncio.to_thread`` cost ~0.4 ms per request
when requests arrive 25-30 ms apart (3.20 vs 2.78 ms at the client: the worker's wake-up and
the GIL's hand-back run cold), and throughput at c=8 / 32 was 511 / 611 rps with the hop
against 631 / 662 inline: the worker threads only fought the loop for the GIL. Concurrency
beyond one core comes from replicas.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from services.common.errors import ServiceError
from services.common.metrics import RetrievalMetrics
from services.retrieval.schemas import Candidate, RetrieveRequest, RetrieveResponse
from tandem.data import UnknownItemsError

if TYPE_CHECKING:
    from retriever.core import Retriever


class RetrievalService:
    def __init__(self, retriever: Retriever, metrics: RetrievalMetrics):
        self.retriever = retriever
        self.metrics = metrics

    async def __call__(self, request: RetrieveRequest) -> RetrieveResponse:
        exclude = self.retriever.catalog.known(request.exclude)[0]
        if not request.history:
            popular = self.retriever.popular(request.k, exclude)
            return RetrieveResponse(candidates=_candidates(popular), source="popularity")
        start = time.perf_counter()
        try:
            found, vector = self.retriever.retrieve_with_user_vector(
                request.history, request.k, exclude
            )
        except UnknownItemsError as exc:
            raise ServiceError(422, f"history: {exc}") from None
        finally:
            self.metrics.retrieval_duration.observe(time.perf_counter() - start)
        embedding = [float(x) for x in vector] if request.include_user_embedding else None
        return RetrieveResponse(
            candidates=_candidates(found), user_embedding=embedding, source="retriever"
        )


def _candidates(pairs: list[tuple[str, float]]) -> list[Candidate]:
    return [Candidate(item_id=item_id, score=float(score)) for item_id, score in pairs]
