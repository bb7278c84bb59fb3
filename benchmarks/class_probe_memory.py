"""Peak memory of the class probe's training rows at the demo grid's width (issue 21: memory flat in N).

    .venv/bin/python benchmarks/class_probe_memory.py            # → benchmarks/results/class-probe-memory.json

``cpcx pseudo`` trains ``pseudo.class_probe`` on the object patches of the single-class images, at most
``pseudo.class_probe.max_patches`` rows (200,000). At the demo's fused grid (24 × 24 × 816) the cap is 623 MiB of
float32 rows, so what matters at scale is how many copies of them are alive at once. This feeds
``fit_from_batches`` 1,024 synthetic single-class images in batches of 32 (random tokens, one object class each,
every patch object: 589,824 candidate rows, so the cap binds) in one thread and reports the process's peak RSS
above what it held before; the probe trains one epoch.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGES, BATCH, GRID, WIDTH, CLASSES = 1024, 32, 24, 816, 21


def batches(labels):
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(labels), BATCH):
        rows = labels[start:start + BATCH]
        maps = torch.zeros(len(rows), CLASSES, GRID, GRID)
        for i, row in enumerate(rows):
            maps[i, np.flatnonzero(row)[1]] = 1.0  # every patch: the image's one object class
        yield maps, torch.randn(len(rows), GRID, GRID, WIDTH, generator=generator), rows


def main() -> None:
    from cpcx import atomic
    from cpcx.pseudo.class_probe import fit_from_batches
    from cpcx.recipe import ClassProbeConfig

    torch.set_num_threads(1)
    labels = np.zeros((IMAGES, CLASSES), dtype=np.int64)
    labels[:, 0] = 1
    labels[np.arange(IMAGES), 1 + np.random.default_rng(0).integers(0, CLASSES - 1, IMAGES)] = 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    cfg = ClassProbeConfig(enabled=True, epochs=1)
    _, rows = fit_from_batches(batches(labels), labels, cfg, seed=0)
    result = {"rows": rows, "max_patches": cfg.max_patches, "width": WIDTH,
              "cap_mib": cfg.max_patches * WIDTH * 4 / 2**20,
              "peak_rss_above_start_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
              "seconds": time.perf_counter() - start}
    print(json.dumps(result, indent=1))
    atomic.write_json(ROOT / "benchmarks" / "results" / "class-probe-memory.json", result)


if __name__ == "__main__":
    main()
