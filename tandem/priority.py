"""Lower one worker thread's CPU priority, so bulk model work yields the cores to request work.

On a small host a ranker's forward passes compete with the event loop and the other stages for
the same cores: the served ranker's forward thread runs a little lower (``ranker_nice``), and a
shadow ranker, which scores every request a second time, lowest of all. Linux schedules threads one
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
