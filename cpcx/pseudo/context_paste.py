"""``pseudo.context_paste``: context decoupling on the cached token grids (docs/results.md 8i).

voc-mini's pseudo-labels are far better in the images that hold one object class than in those that hold several
(VOC slice: 71 against 45 mIoU), where classes that appear together share each other's context. Context decoupling
augmentation (CDA, Su et al., ICCV 2021) pastes objects cut from other images into the training images, so that a
class is seen away from its usual companions. Here it is done where voc-mini trains, on the cached token grids:

1. the run's network labels the images with at most one object class (they are final: they are labelled well);
2. each of them whose label covers more than half of at least ``min_patches`` patches becomes a donor: the tokens of
   those patches, and its class;
3. a second network is trained with the run's recipe, where a share ``probability`` of the training samples get a
   donor's object patches (of a class the sample lacks), shifted by up to ``shift`` of the grid without wrapping,
   the donor's class joining the sample's labels and cluster vector (``pseudo/paste/weights``, resumable);
4. that network (with its own class probe when the recipe has one) labels the images with several object classes;
   with ``networks`` N > 1, N such networks (seeds seed, seed + 1000, …) are trained and their maps averaged.

Routing by scene is the point: the pasted network gains on the multi-class images and loses on the single-class
ones (results.md 8i), and the image labels say which kind an image is.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpcx.augment import apply_view, sample_generator
from cpcx.errors import CpcxError
from cpcx.model.network import cluster_vectors
from cpcx.train import TrainingItems

#: The second network's folder inside the pseudo stage: weights/, metrics.csv, class_probe.pt. With
#: ``pseudo.context_paste.networks`` N > 1 the others are ``paste-2`` … ``paste-N`` beside it.
PASTE_DIR = "paste"
#: The k-th pasted network (k ≥ 1) trains with the run's seed + k · SEED_STEP.
SEED_STEP = 1000
#: Offset of the pasting's random stream from the view draw of the same sample (seed + SALT, epoch, index).
SALT = 7919


def multi_class(labels) -> np.ndarray:
    """(N,) bool: the images whose labels hold two object classes or more (the second network's share)."""
    return np.asarray(labels)[:, 1:].astype(bool).sum(1) >= 2


def donor_masks(labels, ids, labels_dir: Path, grid: tuple[int, int], min_patches: int) -> dict:
    """{image index: (class, (h, w) bool patch mask)} of the images labelled with exactly one object class: the
    patches more than half of whose area is that class in ``labels_dir/<id>.png`` (squashed to the square grid,
    as the token cache squashes the image), when there are at least ``min_patches`` of them."""
    from cpcx.data.palette import load_label_png
    from cpcx.pseudo.class_probe import single_class_images

    labels = np.asarray(labels)
    out = {}
    for i in single_class_images(labels):
        c, image_id = int(np.flatnonzero(labels[i, 1:])[0]) + 1, ids[i]
        area = torch.from_numpy((load_label_png(labels_dir / f"{image_id}.png") == c).astype(np.float32))
        mask = F.adaptive_avg_pool2d(area[None, None], grid)[0, 0] > 0.5
        if int(mask.sum()) >= min_patches:
            out[i] = (c, mask)
    return out


def shifted(grid: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(h, w, ...) ``grid`` moved by (dy, dx) cells; cells moved past an edge are dropped, the vacated ones zero."""
    h, w = grid.shape[:2]
    out = torch.zeros_like(grid)
    ys, yd = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    xs, xd = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    out[yd, xd] = grid[ys, xs]
    return out


def paste(x: torch.Tensor, label: torch.Tensor, donor_x: torch.Tensor, donor_mask: torch.Tensor, donor_class: int,
          dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tokens ``x`` (h, w, e) and ``label`` (C,) with the donor's masked tokens shifted by (dy, dx) patches
    pasted over them (cells shifted past an edge are dropped, not wrapped) → (tokens, label with the donor's
    class), new tensors."""
    moved, moved_x = shifted(donor_mask, dy, dx), shifted(donor_x, dy, dx)
    out = x.clone()
    out[moved] = moved_x[moved]
    label = label.clone()
    label[donor_class] = 1
    return out, label


def saliency_targets(maps, labels, grid: tuple[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{image index: (target, mask)} for ``pseudo.saliency.paste_loss``: ``maps(i)`` (the saliency map of
    image i, H × W in [0, 1]) averaged over each cell of the square ``grid`` (squashed, as the token cache squashes
    the image), and which cells count: every cell of an image with at most one object class, where the saliency
    is above 0.5 on an image with several. On those a salient-object network finds the most salient objects and
    misses the others (docs/results.md 8n), so its low values are no evidence of background there."""
    multi = multi_class(labels)
    out = {}
    for i in range(len(multi)):
        target = F.adaptive_avg_pool2d(torch.as_tensor(maps(i), dtype=torch.float32)[None, None], grid)[0, 0]
        out[i] = (target, (target > 0.5).float() if multi[i] else torch.ones_like(target))
    return out


class PastedItems(TrainingItems):
    """The trainer's cached-token items, a share ``probability`` of them with a donor's object pasted in. Every
    draw comes from the sample's own generator (seed + SALT, epoch, index): a resumed or sharded run pastes the same.
    With ``saliency`` (``saliency_targets``) each item also carries its ``saliency`` target and ``saliency_mask`` in
    the item's view, the pasted cells counting as object."""

    def __init__(self, labels, u, seed: int, images=None, transform=None, cache=None, *, donors: dict,
                 matrix: np.ndarray | None, probability: float, shift: float, saliency: dict | None = None):
        super().__init__(labels, u, seed, images=images, transform=transform, cache=cache)
        self.donors, self.order = donors, sorted(donors)
        self.matrix, self.probability, self.shift = matrix, probability, shift
        self.saliency = saliency

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        item = self._with_saliency(super().__getitem__(key), key[1])
        epoch, i = key
        g = sample_generator(self.seed + SALT, epoch, i)
        if self.cache is None or float(torch.rand((), generator=g)) >= self.probability:
            return item
        pool = [j for j in self.order if j != i and self.labels[i, self.donors[j][0]] == 0]
        if not pool:
            return item
        j = pool[int(torch.randint(len(pool), (1,), generator=g))]
        c, mask = self.donors[j]
        view = int(torch.randint(len(self.cache.views), (1,), generator=g))
        mask = apply_view(mask, self.cache.views[view])  # the donor's tokens are in that view (a flip or the transpose)
        reach = int(self.shift * mask.shape[0])
        dy, dx = (int(v) for v in torch.randint(-reach, reach + 1, (2,), generator=g))
        x, label = paste(item["x"], item["label"], self.cache.get(j, view), mask, c, dy, dx)
        u = torch.from_numpy(cluster_vectors(label[None].numpy(), self.matrix)[0])
        pasted = {"x": x, "label": label, "u": u}
        if self.saliency is not None:  # the pasted object is object, whatever the host's saliency said there
            moved = shifted(mask, dy, dx)
            pasted["saliency"] = item["saliency"].masked_fill(moved, 1.0)
            pasted["saliency_mask"] = item["saliency_mask"].masked_fill(moved, 1.0)
        return {**item, **pasted}

    def _with_saliency(self, item: dict, i: int) -> dict:
        if self.saliency is None or self.cache is None:
            return item
        target, mask = self.saliency[i]
        view = self.cache.views[item["view"]]
        return {**item, "saliency": apply_view(target, view).clone(), "saliency_mask": apply_view(mask, view).clone()}


def paste_folder(recipe, k: int = 0) -> Path:
    """The folder of the k-th pasted network (k from 0): ``pseudo/paste/``, then ``pseudo/paste-2/`` …"""
    return recipe.run_dir("pseudo") / (PASTE_DIR if k == 0 else f"{PASTE_DIR}-{k + 1}")


def train_pasted(recipe, ranks, dataset, donors: dict, console, saliency=None, folder: Path | None = None,
                 backbone_from: Path | None = None) -> Path:
    """The second network, trained with the run's recipe on the pasted items into ``folder`` (``pseudo/paste/``;
    every rank under torchrun, as ``cpcx train``), from scratch or, with ``pseudo.context_paste.epochs``, from the
    run's network for that many epochs; a killed training resumes from its ``last.pt``, a finished one is kept. With
    ``pseudo.saliency.paste_loss`` it learns ``saliency``'s maps (the stage's ``SaliencyMix``) too.
    ``backbone_from``: a checkpoint whose backbone it starts from (``Trainer``'s; for a network of another seed).
    Returns its checkpoint (lowest epoch loss, as ``cpcx pseudo`` reads ``train/``)."""
    from cpcx.train import Trainer, run_cluster_matrix

    cfg = recipe.pseudo.context_paste
    if not donors:
        raise CpcxError("pseudo.context_paste: no image labelled with one object class covers "
                        f"{cfg.min_patches} patches, so there is nothing to paste; lower "
                        "pseudo.context_paste.min_patches or set pseudo.context_paste.enabled: false")
    matrix = run_cluster_matrix(recipe, dataset.classes) if recipe.model.cluster_token else None
    targets, weight = None, recipe.pseudo.saliency.paste_loss if saliency is not None else 0.0
    if weight > 0:
        grid = next(iter(donors.values()))[1].shape
        targets = saliency_targets(lambda i: (saliency.multi_maps if saliency.multi[i] else saliency.maps).map(i),
                                   dataset.labels, tuple(grid))
    items = functools.partial(PastedItems, donors=donors, matrix=matrix, probability=cfg.probability,
                              shift=cfg.shift, saliency=targets)
    folder = folder or paste_folder(recipe)
    init = None
    if cfg.epochs is not None:  # a short run from the run's network: all epochs after the warm-up, at its rate
        from cpcx.pseudo.stage import find_checkpoint

        init = find_checkpoint(recipe)
        t = recipe.train
        recipe = recipe.model_copy(update={"train": t.model_copy(update={
            "epochs": cfg.epochs, "warmup_epochs": 0, "lr": t.lr_after_warmup})})

    def trainer():
        return Trainer(recipe, ranks, console, folder=folder, items=items, name="context paste", init=init,
                       saliency_loss=weight, backbone_from=backbone_from)

    if (folder / "weights" / "last.pt").is_file():
        try:
            return trainer().fit(resume=True)
        except CpcxError as error:  # not this recipe's (the stage drops it when its fingerprint changes)
            console.print(f"[yellow]![/] {error}; the pasted network is trained again")
    return trainer().fit(resume=False)


class AveragedMaps:
    """The predictor of ``pseudo.context_paste.networks`` > 1: the label-conditioned maps of several pasted networks,
    each re-decided by its own class probe, averaged (a :class:`Labeller` with this predictor has no probe of its own).
    They read the same token cache and the same cluster vectors (one clusters.json)."""

    def __init__(self, members: list):
        self.members = members

    def __call__(self, images, labels, u, tokens=None, trunk=None, with_tokens=False):
        from cpcx.pseudo.labelling import class_maps

        if with_tokens:  # a class probe fits on one network's tokens, never on an average's
            raise ValueError("AveragedMaps gives maps only: fit a class probe on one member's predictor")
        maps = [class_maps(m.predictor, m.probe, images, labels, u, tokens, trunk) for m in self.members]
        return sum(maps) / len(maps)


def second_network(recipe, ranks, dataset, labels_dir: Path, cache, console, saliency=None):
    """Once every rank has labelled the images with at most one object class into ``labels_dir``: the donors, the
    pasted network(s) (trained or read back) with the token cache, cluster vectors and class probe of each when the
    recipe has one → (the :class:`Labeller` of the images with several, what ``metrics.json`` records of it). With
    ``pseudo.context_paste.networks`` N > 1 the Labeller averages the N networks' maps (:class:`AveragedMaps`): on the
    VOC slice two gave 60.0 and three 60.4 against 59.8 over seeds 0–2 (docs/results.md 8s)."""
    from cpcx import distributed
    from cpcx.pseudo.class_probe import single_class_images
    from cpcx.pseudo.labelling import Labeller
    from cpcx.pseudo.stage import find_checkpoint

    cfg = recipe.pseudo
    distributed.barrier()  # the donors are read from every rank's labels
    donors = donor_masks(dataset.labels, dataset.ids, labels_dir, tuple(cache.tokens.shape[2:4]),
                         cfg.context_paste.min_patches)
    count = cfg.context_paste.networks
    learners = "a second network learns" if count == 1 else f"{count} networks learn"
    console.print(f"context paste: {len(donors)} donors among the {len(single_class_images(dataset.labels))} "
                  f"images with one object class; {learners} with their objects pasted in")
    members, checkpoints = [], []
    for k in range(count):
        member_recipe = recipe if k == 0 else recipe.model_copy(update={"seed": recipe.seed + k * SEED_STEP})
        member, checkpoint = _pasted_member(member_recipe, ranks, dataset, donors, console, saliency,
                                            paste_folder(recipe, k), None if k == 0 else find_checkpoint(recipe))
        members.append(member)
        checkpoints.append(str(checkpoint))
    info = {"donors": len(donors), "checkpoint": checkpoints[0]}
    if count == 1:
        return members[0], info
    return Labeller(AveragedMaps(members), None, members[0].cache, members[0].u), {**info, "checkpoints": checkpoints}


def _pasted_member(recipe, ranks, dataset, donors: dict, console, saliency, folder: Path,
                   backbone_from: Path | None):
    """One pasted network, trained (or read back) into ``folder`` → (its Labeller, its checkpoint). The networks
    after the first start from the run's backbone (``backbone_from``): with another seed, a backbone the recipe does
    not load from weights files would initialise otherwise, and the cached tokens would not be its own."""
    from cpcx import shard
    from cpcx.feature_cache import autocast_tag
    from cpcx.model import load_checkpoint
    from cpcx.pseudo.class_probe import ClassProbe
    from cpcx.pseudo.infer import PatchPredictor, open_token_cache, require_token_cache
    from cpcx.pseudo.labelling import Labeller, load_or_fit_class_probe

    cfg = recipe.pseudo
    checkpoint = train_pasted(recipe, ranks, dataset, donors, console, saliency, folder, backbone_from)
    net, meta = load_checkpoint(checkpoint, map_location="cpu")
    # its own cluster vectors: the same clusters.json as the run's network, unless that one was trained on another
    u = cluster_vectors(dataset.labels, meta.get("cluster_matrix")) if meta.get("num_clusters") else None
    predictor = PatchPredictor(net, ranks.device, cfg.precision, cfg.img_size, cfg.flip, cfg.class_max_norm,
                               cfg.scales)
    # The backbone stayed frozen (the recipe says so), so the first network's token cache is also this one's; asked
    # again all the same, against this network's backbone digest, so that it can never read tokens that are not its own.
    cache = open_token_cache(recipe, net, dataset, predictor.size, cfg.flip,
                             autocast=autocast_tag(ranks.device, cfg.precision))
    require_token_cache(cache, "pseudo.context_paste")
    probe = None
    if cfg.class_probe.enabled:
        path = folder / "class_probe.pt"
        probe = shard.main_first(ranks, lambda: load_or_fit_class_probe(predictor, dataset, u, cache, cfg, recipe.seed,
                                                                        path, console))
        if not ranks.is_main:
            probe = ClassProbe.load(path)
    return Labeller(predictor, probe, cache, u), checkpoint
