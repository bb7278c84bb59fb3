"""Which network labels which image, in each pass of ``cpcx pseudo``.

Without ``pseudo.context_paste`` the run's network labels every image. With it, the run's network labels the images
with at most one object class, and a second network, trained with their objects pasted in
(``cpcx.pseudo.context_paste``), labels the others. With ``pseudo.self_training`` as well, that routing makes the
first pass (``labels_first/``) and the final one (``labels/``, the heads mixed into both networks' maps): the second
network is trained once, on the first pass's single-class labels, and labels the multi-class images in both passes.
``pseudo.saliency`` acts in every pass, whichever network labels the image; the pasted network's donors are
labelled without it (``donor_folder``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cpcx.metrics import ConfusionMatrix
from cpcx.pseudo.labelling import Labeller, label_images, with_progress


class LabellingPasses:
    """The labelling of one stage: ``run`` labels a pass into a folder, routing each image to its network; the
    second network (``second``, with what ``metrics.json`` records of it in ``paste_info``) is made by the first
    pass that needs it and reused by the next."""

    def __init__(self, recipe, ranks, dataset, first: Labeller, console, saliency=None):
        from cpcx.pseudo.context_paste import multi_class

        self.recipe, self.ranks, self.dataset, self.first, self.console = recipe, ranks, dataset, first, console
        self.saliency = saliency  # pseudo.saliency's SaliencyMix, in every pass, or None
        self.multi = multi_class(dataset.labels) if recipe.pseudo.context_paste.enabled else None
        self.second: Labeller | None = None
        self.paste_info: dict = {}

    def run(self, folder: Path, todo: Sequence[int], crf, no_crf=None, heads=None) -> ConfusionMatrix:
        """Label the images ``todo`` (every rank's list; each labels its shard) into ``folder`` → their confusion.
        With ``pseudo.context_paste`` the single-class images go first: the second network learns from their
        labels in ``folder`` (or reads itself back) before it labels the others, even when none is left to do."""
        from cpcx.pseudo.context_paste import second_network

        confusion = ConfusionMatrix(self.dataset.num_classes)
        self._label(self.first, self.first_todo(todo), folder, crf, no_crf, heads, confusion)
        if self.multi is None:
            return confusion
        if self.second is None:
            self.second, self.paste_info = second_network(self.recipe, self.ranks, self.dataset,
                                                          self.donor_folder(folder, crf), self.first.cache,
                                                          self.console, self.saliency)
        rest = [i for i in todo if self.multi[i]]
        mine = self.mine(rest)
        if rest:
            self.console.print(f"context paste: the second network labels the {len(rest)} images with several object "
                               "classes still to do" + (f", {len(mine)} of them here" if self.ranks.enabled else ""))
        self._label(self.second, rest, folder, crf, no_crf, heads, confusion)
        return confusion

    def donor_folder(self, folder: Path, crf) -> Path:
        """Where the pasted network reads its donors: the pass's own labels, or with ``pseudo.saliency`` the
        single-class images labelled again without it into ``pseudo/paste/donors/``: pasted objects at the
        saliency's larger extent gave a second network that lost 1.9 on seed 2's multi-class images (56.3 against
        56.9 on the 200 choose ids over seeds 0–2, docs/results.md 8n)."""
        from cpcx import atomic
        from cpcx.pseudo.context_paste import PASTE_DIR
        from cpcx.pseudo.labelling import remove_torn_files
        from cpcx.runs import output_written

        if self.saliency is None:
            return folder
        donors = self.recipe.run_dir("pseudo") / PASTE_DIR / "donors"
        atomic.ensure_dir(donors)
        if self.ranks.is_main:
            remove_torn_files(donors)
        single = [i for i in range(len(self.dataset)) if not self.multi[i]
                  and not output_written(donors / f"{self.dataset.ids[i]}.png")]
        if single:
            self.console.print(f"context paste: the donors, {len(single)} single-class images labelled again without "
                               f"the saliency → {donors}")
        self._label(self.first, single, donors, crf, None, None, ConfusionMatrix(self.dataset.num_classes),
                    saliency=False)
        return donors

    def first_todo(self, todo: Sequence[int]) -> list[int]:
        """The images of ``todo`` the run's network labels: all, or with the context paste the single-class ones."""
        return list(todo) if self.multi is None else [i for i in todo if not self.multi[i]]

    def mine(self, todo: Sequence[int]) -> list[int]:
        """This rank's share of ``todo`` (all of it in one process)."""
        from cpcx import shard

        return shard.shard_blocks(list(todo), self.ranks.rank, self.ranks.world_size, self.recipe.pseudo.batch_size)

    def first_pass(self, folder: Path, todo: Sequence[int], crf) -> None:
        """``pseudo.self_training``'s first pass: the same routing, no heads, no scores."""
        self.run(folder, todo, crf)

    def _label(self, labeller: Labeller, todo: list[int], folder: Path, crf, no_crf, heads,
               confusion: ConfusionMatrix, saliency: bool = True) -> None:
        cfg = self.recipe.pseudo
        mine = self.mine(todo)
        if mine:
            confusion.merge(with_progress(self.console, len(mine), lambda advance: label_images(
                labeller.predictor, self.dataset, mine, labeller.u, folder, crf, cfg.workers, cfg.batch_size, no_crf,
                advance, labeller.cache, labeller.probe, heads, self.saliency if saliency else None)))
