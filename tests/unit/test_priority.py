"""Lowering one worker thread's priority: that thread only, by the amount asked, never raised."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.priority import lower_thread_priority, thread_niceness

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's"
)


def niceness_in_pool(nice: int) -> tuple[int, int]:
    """(niceness of the pool's thread, of a thread that thread starts)."""

    def probe() -> tuple[int, int]:
        with ThreadPoolExecutor(1) as inner:  # e.g. torch's workers, started by that thread
            return thread_niceness(), inner.submit(thread_niceness).result()

    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(nice,)) as pool:
        return pool.submit(probe).result()


def test_a_pool_thread_is_lowered_by_the_amount_asked_and_its_own_threads_inherit_it():
    base = thread_niceness()
    assert niceness_in_pool(5) == (min(base + 5, 19),) * 2
    assert thread_niceness() == base  # the calling thread keeps its priority


def test_zero_or_less_leaves_the_thread_alone():
    base = thread_niceness()
    assert niceness_in_pool(0) == (base, base)
    assert niceness_in_pool(-5) == (base, base)  # never raises a priority
