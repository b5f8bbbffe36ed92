"""Loading the served retriever, the same way in the retrieval service and the gateway.

One place decides what the retriever serves: the configured run, plus (``TANDEM_COLD_SLOTS``)
exploration slots for cold items from an items run made for that run. Start-up says which.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.common.settings import ServiceSettings

if TYPE_CHECKING:
    from retriever.core import Retriever

log = logging.getLogger(__name__)


def load_retriever(settings: ServiceSettings) -> Retriever:
    """The configured run, with cold-item slots when asked for; FileNotFoundError or
    ValueError say what is missing or mismatched."""
    from retriever.core import Retriever

    retriever = Retriever.load(settings.retriever_run_dir(), engine=settings.retriever_engine)
    if settings.cold_slots == 0:
        log.info("cold-start slots: off (TANDEM_COLD_SLOTS=0)")
        return retriever
    from enrichment.runs import load_cold_slots

    items_run = settings.items_run_dir()
    cold = load_cold_slots(items_run, retriever.manifest.run_id, settings.cold_slots)
    log.info(
        "cold-start slots: the last %d candidates go to %d cold items (items run %s)",
        cold.slots, len(cold.indices), items_run.name,
    )  # fmt: skip
    return retriever.with_cold_slots(cold)
