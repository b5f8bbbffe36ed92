"""Lower one worker thread's CPU priority, so background work yields the cores to served work.

A shadow ranker scores every request a second time; on a small host its forward passes and
prompt rendering compete with the served path for the same cores. Linux schedules threads one
by one: ``setpriority(PRIO_PROCESS, <thread id>, n)`` re-nices only that thread, and threads it
starts later (torch's OpenMP workers) inherit the value. Raising niceness needs no privilege.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

BACKGROUND_NICE = 19  # the lowest priority: runs on cores the served path leaves idle


def lower_thread_priority(nice: int) -> None:
    """Thread initializer: add ``nice`` to the calling thread's niceness (0: leave it).

    Linux only: elsewhere ``PRIO_PROCESS`` with a thread id would name a process, so the
    thread keeps its priority there.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):  # a sandbox without setpriority: priority unchanged
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + nice)


def thread_niceness() -> int:
    """The calling thread's niceness (0 where it cannot be read)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return 0
