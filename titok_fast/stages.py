"""CPU time by stage of the encode pipeline, for benchmarks and the progress display.

``CLOCK`` sums the CPU time (``time.thread_time``, the calling thread's own) that each stage spends, from every
thread that reports into it; worker processes send their sums back with their clips (``add_all``). It is off by
default: then ``start()`` returns 0 and ``stop()`` returns at once, so the instrumented code pays two calls.

It also sums the wall time the decoding workers spend waiting, by what they wait for (:data:`WAITS`, counted as
``"wait_<what>"`` by :meth:`StageClock.waiting`): what keeps a worker from decoding when the cores are not all busy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator

STAGES = ("decode", "rgb", "resize", "upload", "write")
# what a decoding worker waits for: a file to read; the run to take its clips (a thread: room in its file's queue; a
# process: a credit); room for a source-size clip (HeldBytes; a process waits for the run's answer, which comes once
# the run has queued the clip before, so a full queue shows there); a free shared-memory segment (a process's)
WAITS = ("file", "taken", "room", "segment")


class StageClock:
    """Sums of CPU-seconds per stage name (see the module header)."""

    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._spent: dict[str, float] = {}

    def enable(self, on: bool = True) -> None:
        """Start (or stop) counting, from zero."""
        with self._lock:
            self.enabled, self._spent = on, {}

    def start(self) -> float:
        """The calling thread's CPU time now (0.0 when off): pass it to ``stop``."""
        return time.thread_time() if self.enabled else 0.0

    def stop(self, stage: str, started: float) -> None:
        """Count the calling thread's CPU time since ``started`` (from ``start``) for ``stage``."""
        if self.enabled:
            self.add_all({stage: time.thread_time() - started})

    def add_all(self, spent: dict[str, float]) -> None:
        """Count sums measured elsewhere (a worker process) or by ``stop`` and ``timed``."""
        if self.enabled and spent:
            with self._lock:
                for stage, seconds in spent.items():
                    self._spent[stage] = self._spent.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The sums so far, reset to zero."""
        with self._lock:
            spent, self._spent = self._spent, {}
        return spent

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Count the wall time (``time.perf_counter``) the block takes as a wait for ``what``, one of WAITS."""
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add_all({f"wait_{what}": time.perf_counter() - started})

    def timed(self, items: Iterable, stage: str) -> Iterator:
        """``items``, with the time spent producing each one counted for ``stage``."""
        if not self.enabled:
            yield from items
            return
        yield from each_timed(items, time.thread_time, lambda spent: self.add_all({stage: spent}))


def each_timed(items: Iterable, clock: Callable[[], float], count: Callable[[float], None]) -> Iterator:
    """``items``, passing ``count`` the ``clock`` time spent producing each one (the final, empty call too)."""
    items = iter(items)
    while True:
        started = clock()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            count(clock() - started)
        yield item


CLOCK = StageClock()
