"""Plain progress lines (cpcx.progress): at least every 30 s and every 10 %, with rate and ETA, and at the end."""
from __future__ import annotations

from cpcx.progress import PlainProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_tenth_and_at_least_every_30_seconds():
    clock, lines = Clock(), []
    progress = PlainProgress("pseudo", 1000, lines.append, clock=clock)
    for _ in range(50):  # 5 % in 50 s: no tenth reached, but 30 s passed once
        clock.now += 1.0
        progress(1)
    assert lines == ["pseudo: 30/1000 images, 1.00/s, eta 970 s"]
    clock.now += 1.0
    progress(50)  # 100 items: the first tenth
    assert lines[-1] == "pseudo: 100/1000 images, 1.96/s, eta 459 s"
    clock.now += 1.0
    progress(900)  # the end: one line, not one per tenth skipped
    assert len(lines) == 3 and lines[-1].startswith("pseudo: 1000/1000 images") and lines[-1].endswith("eta 0 s")


def test_info_is_computed_only_for_printed_lines():
    calls, lines = [], []
    progress = PlainProgress("epoch 1/2", 4, lines.append, fraction=0.5, unit="steps", clock=Clock())

    def info() -> str:
        calls.append(1)
        return "loss 0.5"

    for _ in range(4):
        progress(1, info)
    assert len(lines) == 2 and len(calls) == 2 and lines[0].startswith("epoch 1/2: 2/4 steps") and "· loss 0.5" in lines[0]
