"""``cpcx evaluate``: mIoU of a stage's label PNGs against the ground-truth masks.

``evaluate_label_folder`` scores a folder of ``<id>.png`` class-index maps (pseudo-labels or segmentation
predictions) on one split; ``write_evaluation`` prints the per-class table and writes ``metrics.json``,
``confusion.csv`` and the per-class IoU bar chart into the stage folder. Both are reused by the pseudo and
segmentation stages, so every mIoU in a run folder comes from the same code.

mIoU follows the VOC protocol: one confusion matrix accumulated over all pixels of all images (not a mean
of per-image IoUs), 255 in the mask ignored, classes absent from both ground truth and prediction left out.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from cpcx import atomic
from cpcx.errors import CpcxError
from cpcx.metrics import ConfusionMatrix, SegmentationScores, scores_from_confusion

#: Where each stage keeps the label maps that ``cpcx evaluate --stage`` scores.
STAGE_FOLDERS = {"pseudo": "labels", "segment": "predictions"}


def stage_split(recipe, stage: str) -> str:
    """The split a stage labels: pseudo-labels are made for ``pseudo.split``, predictions for val."""
    return recipe.pseudo.split if stage == "pseudo" else "val"


# ------------------------------------------------------------------------------------------- scoring
def bounded_map(pool, fn, items: Iterable, window: int):
    """``pool.map(fn, items)`` in order, with at most ``window`` calls submitted ahead of the consumer.

    ``Executor.map`` submits every item at once, so its threads run as far ahead of the loop as they can and the
    finished results wait in memory: scoring 1,369 val images held ~200 MiB of label maps and masks (the scale
    benchmark's N = 10,000), and VOC's or COCO's full val split would hold gigabytes."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def evaluate_label_folder(
    dataset,
    folder: str | Path,
    ids: Iterable[str] | None = None,
    threads: int = 4,
) -> tuple[SegmentationScores, ConfusionMatrix]:
    """Score ``folder/<id>.png`` against the masks of ``dataset`` (all its ids, or ``ids``).

    Raises ``CpcxError`` when the data set has no masks, a label file is missing, or a label map and its
    mask differ in size: a score over a silently partial folder would be a wrong number.
    """
    from cpcx.data.palette import load_label_png

    folder = Path(folder)
    if not dataset.has_masks:
        raise CpcxError(
            f"{dataset.source}: split '{dataset.split}' of '{dataset.name}' has no ground-truth masks, so there is "
            "nothing to score against; evaluate on a data set with masks"
        )
    ids = list(dataset.ids if ids is None else ids)
    missing = [i for i in ids if not (folder / f"{i}.png").is_file()]
    if missing:
        raise CpcxError(
            f"{folder}: {len(missing)} of {len(ids)} label PNGs missing (first: {missing[0]}.png); "
            "finish the stage that writes them (re-running it resumes) before evaluating"
        )
    confusion = ConfusionMatrix(dataset.num_classes)

    def load(image_id: str) -> tuple[str, np.ndarray, np.ndarray]:
        # PNG decoding releases the GIL: a few threads read label/mask pairs in parallel.
        return image_id, load_label_png(folder / f"{image_id}.png"), dataset.load_mask(dataset.index_of(image_id))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for image_id, prediction, mask in bounded_map(pool, load, ids, 2 * max(1, threads)):
            if prediction.shape != mask.shape:
                raise CpcxError(
                    f"{folder / (image_id + '.png')}: label map is {prediction.shape[1]}×{prediction.shape[0]} but "
                    f"the image is {mask.shape[1]}×{mask.shape[0]}; delete the file and re-run the stage"
                )
            if prediction.size and int(prediction.max()) >= dataset.num_classes:
                raise CpcxError(
                    f"{folder / (image_id + '.png')}: holds class {int(prediction.max())} but the data set has "
                    f"{dataset.num_classes} classes; the labels come from another data set, delete them and re-run"
                )
            confusion.update(mask, prediction)
    return confusion.result(), confusion


# ------------------------------------------------------------------------------------------- reports
def confusion_csv(matrix: np.ndarray, classes: Sequence[str]) -> str:
    """Confusion matrix as CSV: one row per ground-truth class, one column per predicted class (pixels)."""
    lines = [",".join(["truth\\prediction", *classes])]
    for name, row in zip(classes, np.asarray(matrix, dtype=np.int64)):
        lines.append(",".join([name, *(str(int(v)) for v in row)]))
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}"


def iou_table(classes: Sequence[str], columns: Mapping[str, SegmentationScores], title: str) -> Table:
    """Rich table: per-class IoU (%) in one column per scored variant, mIoU in the last row."""
    table = Table(title=title, show_footer=True)
    table.add_column("class", footer="mIoU")
    for name, scores in columns.items():
        table.add_column(f"IoU {name}" if name else "IoU", justify="right", footer=_pct(scores.miou))
    for c, class_name in enumerate(classes):
        table.add_row(class_name, *(_pct(float(s.iou[c])) for s in columns.values()))
    return table


def _read_json(path: Path) -> dict:
    """An object from a JSON file; {} when it is missing, torn, or JSON of another shape (a list, a number)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_evaluation(
    stage_dir: str | Path,
    classes: Sequence[str],
    confusion: ConfusionMatrix,
    *,
    split: str,
    images: int,
    extra: Mapping[str, Any] | None = None,
    extra_columns: Mapping[str, SegmentationScores] | None = None,
    label: str = "",
    console: Console | None = None,
) -> dict:
    """Print the table; write ``metrics.json`` (updated, other keys kept), ``confusion.csv`` and the bar chart.

    ``extra`` adds keys to metrics.json (e.g. the pre-CRF score); ``extra_columns`` adds table columns and
    bars. Keys written by the stage itself (best epoch, timings, ...) survive a later ``cpcx evaluate``.
    """
    from cpcx import viz

    stage_dir = Path(stage_dir)
    scores = confusion.result()
    metrics = _read_json(stage_dir / "metrics.json")
    metrics.update(scores.as_dict(classes))
    metrics.update({"split": split, "images": images, "classes": list(classes)})
    metrics.update(extra or {})
    atomic.write_json(stage_dir / "metrics.json", metrics)
    atomic.write_text(stage_dir / "confusion.csv", confusion_csv(confusion.matrix, classes))
    columns = {label: scores, **(extra_columns or {})}
    viz.iou_bar_chart(stage_dir / "figures" / "iou_per_class.png", classes, columns,
                      title=f"{stage_dir.parent.name} · {stage_dir.name} · {split} ({images} images)")
    if console is not None:
        console.print(iou_table(classes, columns, title=f"{stage_dir.name}: {images} {split} images"))
        console.print(f"[green]✔[/] mIoU {_pct(scores.miou)} · metrics in {stage_dir / 'metrics.json'}")
    return metrics


# ------------------------------------------------------------------------------------------- the stage
def run_evaluate(recipe, stage: str, console: Console | None = None) -> dict:
    """Score ``runs/<name>/<stage>/{labels|predictions}`` against the masks; write the reports; return metrics."""
    from cpcx.data import build_dataset
    from cpcx.runs import fingerprint, read_stage_state

    if stage not in STAGE_FOLDERS:
        raise CpcxError(f"--stage: '{stage}' is not a stage; use {' or '.join(STAGE_FOLDERS)}", code=2)
    console = console or Console()
    stage_dir = recipe.run_dir(stage)
    folder = stage_dir / STAGE_FOLDERS[stage]
    if not folder.is_dir():
        raise CpcxError(f"{folder}: no {stage} outputs yet; run `cpcx {stage} -r <recipe>` first")
    state = read_stage_state(recipe, stage)
    if state and state.get("fingerprint") != fingerprint(recipe, stage):
        console.print(f"[yellow]![/] {stage_dir}: these outputs were made with a different recipe than the one "
                      "given; scoring them anyway")
    split = stage_split(recipe, stage)
    dataset = build_dataset(recipe.dataset, split)
    _, confusion = evaluate_label_folder(dataset, folder)
    columns, label = {}, ""
    no_crf = _read_json(stage_dir / "no_crf.json")  # the pseudo stage's score before the CRF, if it made one
    if stage == "pseudo" and recipe.crf.enabled and no_crf.get("matrix"):
        columns, label = {"no CRF": scores_from_confusion(np.asarray(no_crf["matrix"]))}, "CRF"
    return write_evaluation(stage_dir, dataset.classes, confusion, split=split, images=len(dataset),
                            extra_columns=columns, label=label, console=console)
