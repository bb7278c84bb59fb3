"""Progress lines for plain logs (not a terminal): a CPU stage takes minutes on the slice and hours at COCO
scale, and a log that stays silent that long looks like a hang. On a terminal the stages draw rich bars instead.

``PlainProgress(label, total, log)`` is called with the number of items just finished; it prints
``<label>: done/total <unit>, rate/s, eta N s`` at least every ``seconds`` (30 by default) and every
``fraction`` of the total (10 %), and once at the end — whichever comes first, never more than one line per call.
"""
from __future__ import annotations

import time
from typing import Callable


class PlainProgress:
    def __init__(self, label: str, total: int, log: Callable[[str], None], seconds: float = 30.0,
                 fraction: float = 0.1, unit: str = "images", clock: Callable[[], float] = time.perf_counter):
        self.label, self.total, self.log, self.seconds, self.unit, self.clock = label, int(total), log, seconds, unit, clock
        self.step = max(1, int(self.total * fraction)) if fraction > 0 else self.total or 1
        self.t0 = self.last = clock()
        self.done = 0
        self._next_step = self.step

    def __call__(self, count: int = 1, info: Callable[[], str] | None = None) -> None:
        """``info``: extra status text (e.g. the loss), computed only when a line is printed."""
        self.done += count
        now = self.clock()
        due = now - self.last >= self.seconds or self.done >= self._next_step or self.done >= self.total
        if not due:
            return
        while self._next_step <= self.done:
            self._next_step += self.step
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.log(f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.2f}/s, eta {eta:.0f} s"
                 + (f" · {info()}" if info is not None else ""))
