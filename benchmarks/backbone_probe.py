"""What a backbone's features know, before any CPC training: the two references of ``benchmarks/backbones.py``.

* **probe mAP**: the backbone as a classifier sees the image (a ViT's class token, a CNN's pooled last features,
  at its native size), the mean of an image and its mirror, standardised; a one-vs-rest logistic regression per
  class trained on the train split, its L2 strength chosen by 3-fold cross-validation *on the train split*, scored
  as multi-label mAP on the val split. The same probe on the mean of the patch grid the CPC network reads.
* **supervised segmentation reference**: a linear head on that patch grid (frozen, flip-averaged, standardised)
  trained on the true masks of the train images (each patch's class shares as soft targets), scored as val
  mIoU after bilinear upsampling. Fixed settings (Adam 1e-3, 30 epochs): nothing is tuned on val.

Nothing here writes files; ``backbones.py`` stores what these return.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cpcx.augment import normalize, resize_image

PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _flip_mean(x: torch.Tensor) -> torch.Tensor:
    return (x[0] + x[1].flip(-1)) / 2 if x.dim() == 4 else (x[0] + x[1]) / 2


@torch.inference_mode()
def pooled_features(model, dataset, size: int, mean, std, kind: str) -> torch.Tensor:
    """(N, D) classifier features of a timm model: ``vit`` → class token, ``cnn`` → pooled ``forward_features``."""
    rows = []
    for i in range(len(dataset)):
        x = normalize(resize_image(dataset.load_image(i), size), mean, std)[None]
        feats = model.forward_features(torch.cat([x, x.flip(-1)]))
        rows.append(_flip_mean(feats[:, 0] if kind == "vit" else feats.mean((2, 3))))
    return torch.stack(rows).float()


@torch.inference_mode()
def grid_features(backbone, dataset, size: int) -> torch.Tensor:
    """(N, e, h, w) float16: the patch grid the CPC network reads (``cpcx`` backbone), flip-averaged."""
    rows = []
    for i in range(len(dataset)):
        x = normalize(resize_image(dataset.load_image(i), size), backbone.mean, backbone.std)[None]
        grid = backbone(torch.cat([x, x.flip(-1)])).permute(0, 3, 1, 2)  # (2, e, h, w)
        rows.append(_flip_mean(grid).half())
    return torch.stack(rows)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = truth[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y) + l2 * head.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _mean_ap(head, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        scores = head(x).numpy()
    return float(np.nanmean([average_precision(scores[:, c], y[:, c]) for c in range(y.shape[1])]))


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor, val_y: np.ndarray) -> dict:
    """Multi-label mAP × 100 on val; labels without the background column. L2 chosen by 3-fold CV on train."""
    train_y_t = torch.from_numpy(np.array(train_y, dtype=np.float32))  # a copy: dataset labels are read-only
    folds = np.arange(len(train_x)) % 3
    cv = {}
    for l2 in PROBE_L2:
        scores = []
        for k in range(3):
            fit, held = folds != k, folds == k
            xf, xh = _standardise(train_x[fit], train_x[held])
            scores.append(_mean_ap(_fit_logistic(xf, train_y_t[fit], l2), xh, train_y[held]))
        cv[l2] = float(np.mean(scores))
    best = max(cv, key=cv.get)
    xt, xv = _standardise(train_x, val_x)
    return {"map": 100 * _mean_ap(_fit_logistic(xt, train_y_t, best), xv, val_y), "l2": best,
            "cv_map": 100 * cv[best]}


def _soft_targets(mask: np.ndarray, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    truth = torch.from_numpy(mask.astype(np.int64))
    valid = truth != 255
    onehot = F.one_hot(torch.where(valid, truth, 0), num_classes).permute(2, 0, 1).float() * valid
    return F.interpolate(onehot[None], size=grid, mode="area")[0]


def supervised_reference(train_grid: torch.Tensor, train_masks, val_grid: torch.Tensor, val_masks,
                         num_classes: int, epochs: int = 30, seed: int = 0) -> dict:
    """Val mIoU × 100 of a linear head on the frozen grid trained on the train masks (see the module doc)."""
    from cpcx.metrics import ConfusionMatrix

    torch.manual_seed(seed)
    grid = tuple(train_grid.shape[-2:])
    mean = train_grid.float().mean((0, 2, 3), keepdim=True)
    std = train_grid.float().std((0, 2, 3), keepdim=True) + 1e-6
    x = ((train_grid.float() - mean) / std).permute(0, 2, 3, 1).reshape(-1, train_grid.shape[1])
    t = torch.stack([_soft_targets(m, num_classes, grid) for m in train_masks]).permute(0, 2, 3, 1)
    t = t.reshape(-1, num_classes)
    keep = t.sum(1) > 0.5  # patches mostly of ignored pixels teach nothing
    x, t = x[keep], t[keep] / t[keep].sum(1, keepdim=True)
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(4096):
            opt.zero_grad()
            loss = -(t[batch] * head(x[batch]).log_softmax(1)).sum(1).mean()
            loss.backward()
            opt.step()
    matrix = ConfusionMatrix(num_classes)
    with torch.no_grad():
        for features, mask in zip(val_grid, val_masks):
            logits = head(((features.float()[None] - mean) / std)[0].permute(1, 2, 0)).permute(2, 0, 1)[None]
            logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
            matrix.update(mask, logits[0].argmax(0).numpy())
    return {"miou": 100 * float(matrix.result().miou), "grid": list(grid), "patches": int(keep.sum())}
