"""torch's thread count for one block of work, restored after it.

Tiny models (test fixtures, the enrichment MLPs) run faster on one thread than on two on a
shared 2-core host; the setting is process-wide, so it is always restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
