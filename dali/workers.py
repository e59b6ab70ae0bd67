"""Worker processes that die with the process that started them.

A ``kill -9`` of a stage leaves a ``ProcessPoolExecutor``'s workers running until they notice the broken pipe,
which takes minutes while they finish their chunk. On Linux each worker asks the kernel to kill it when its
parent dies (``prctl(PR_SET_PDEATHSIG)``; neither the standard library nor the executor offers it, hence ctypes).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Worker initializer: SIGKILL this process when its parent dies (and now, if it already has)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def worker_pool(workers: int, start_method: str | None = None) -> ProcessPoolExecutor:
    """A process pool whose workers are killed with this process."""
    context = multiprocessing.get_context(start_method) if start_method else None
    return ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))


def ordered_map(pool: ProcessPoolExecutor, function, items, ahead: int):
    """``pool.map(function, items)`` with at most ``ahead`` items submitted and not yet consumed: ``Executor.map``
    submits every item at once, which for an AudioSet-size list is millions of futures held in memory."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
