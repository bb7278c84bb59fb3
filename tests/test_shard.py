"""Sharded labelling: `cpcx pseudo` and `cpcx predict` under torchrun (2 CPU processes, gloo) give the labels and
the metrics of one process, byte for byte; the pieces (shards, folding the no-CRF parts) on their own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpcx.metrics import ConfusionMatrix
from cpcx.pseudo.no_crf import NoCRFScores, fold_parts, part_path
from cpcx.shard import shard_blocks

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- pieces
def test_shards_are_disjoint_whole_batches_that_cover_everything():
    items = list(range(11))
    shards = [shard_blocks(items, rank, 3, block=2) for rank in range(3)]
    assert shards == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]  # batch k of one process is batch k // 3 of rank k % 3
    assert sorted(sum(shards, [])) == items
    assert shard_blocks(items, 0, 1, block=4) == items
    assert shard_blocks([1, 2], 2, 3) == []  # more ranks than items: the last ones idle
    with pytest.raises(ValueError):
        shard_blocks(items, 3, 3)


def test_fold_parts_counts_every_image_once(tmp_path):
    def scores(path, ids, value, **kw):
        s = NoCRFScores(path, 3, fresh=True, **kw)
        for image_id in ids:
            s.add(image_id, np.full((2, 2), value), np.full((2, 2), value))
        s.save()
        return s

    scores(tmp_path / "no_crf.json", ["a"], 0)
    # rank 1 skips "a", which the merged file already counts (its CRF label was never written before a kill)
    part = scores(part_path(tmp_path, 1), ["a", "b", "c"], 1, counted={"a"})
    assert part.ids == {"b", "c"}
    scores(part_path(tmp_path, 0), ["d"], 2)
    merged = fold_parts(tmp_path, 3)
    assert merged.ids == {"a", "b", "c", "d"} and not list(tmp_path.glob("no_crf.part-*"))
    assert np.diag(merged.confusion.matrix).tolist() == [4, 8, 4]
    # killed after the merged file was saved but before the parts went: folding again adds nothing
    scores(part_path(tmp_path, 0), ["d"], 2)
    assert np.diag(fold_parts(tmp_path, 3).confusion.matrix).tolist() == [4, 8, 4]
    again = NoCRFScores(tmp_path / "no_crf.json", 3)
    assert again.ids == merged.ids and np.array_equal(again.confusion.matrix, merged.confusion.matrix)


def test_sum_over_ranks_is_a_copy_on_one_process():
    from cpcx.distributed import DistInfo
    from cpcx.shard import sum_over_ranks

    matrix = ConfusionMatrix(3).matrix + 7
    summed = sum_over_ranks(matrix, DistInfo(0, 1, 0, torch.device("cpu")))
    assert np.array_equal(summed, matrix) and summed is not matrix and summed.dtype == np.int64


ABORTING_RANK = """
import os, sys
from cpcx.distributed import cleanup, init_from_env

def wait_for_the_others(info):
    if info.rank == 1:
        os.abort()  # what "terminate called without an active exception" does: SIGABRT from C++

info = init_from_env("cpu", "pseudo.device")
wait_for_the_others(info)
cleanup(info)
"""


def test_a_rank_that_dies_in_cpp_says_where_it_was(tmp_path):
    """A rank killed by SIGABRT (a C++ std::terminate in gloo's teardown, say) prints its Python stack, not only
    torchrun's "exitcode -6": the process group enables faulthandler when it is joined."""
    script = tmp_path / "abort.py"
    script.write_text(ABORTING_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "Fatal Python error: Aborted" in out and "wait_for_the_others" in out, out[-3000:]


LEAVING_RANKS = """
import sys, time, pathlib
from cpcx.distributed import joined

out, failing = pathlib.Path(sys.argv[1]), sys.argv[2] == "fail"
with joined("cpu", "pseudo.device") as info:
    if info.rank == 0:
        time.sleep(2)  # rank 0's last steps (scoring, figures) while rank 1 has nothing left to do
        (out / "rank0-done").write_text(repr(time.time()))
    elif failing:
        raise RuntimeError("rank 1 failed")
(out / f"left-{info.rank}").write_text(repr(time.time()))
"""


def _leave(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "leave.py"
    script.write_text(LEAVING_RANKS)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path), mode], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=300)


def test_ranks_that_finish_leave_the_group_together(tmp_path):
    """The rank with nothing left to do waits for rank 0 before tearing its connections down (a rank that left
    early aborted at exit in gloo's teardown, see ``distributed.cleanup``)."""
    done = _leave(tmp_path, "ok")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rank0_done = float((tmp_path / "rank0-done").read_text())
    assert float((tmp_path / "left-1").read_text()) >= rank0_done


def test_a_failed_rank_does_not_leave_the_others_waiting_forever(tmp_path):
    """After an error there is no barrier: the failing rank exits at once, torchrun stops the one that waits."""
    done = _leave(tmp_path, "fail")
    assert done.returncode != 0 and "rank 1 failed" in done.stdout + done.stderr
    assert not (tmp_path / "left-1").exists()


TEARDOWN_ABORTS = """
import atexit, os, sys
from cpcx.distributed import end_rank, joined

with joined("cpu", "pseudo.device") as info:
    pass
atexit.register(os.abort)  # stands for gloo's C++ teardown aborting after the work is done
print(f"rank {info.rank} done", end="")  # unflushed: end_rank must flush it
end_rank(None if sys.argv[1] == "none" else sys.argv[1])
"""


@pytest.mark.parametrize("code, status", [("none", 0), ("no labels written", 1)])
def test_a_rank_that_left_its_group_ends_without_the_teardown(tmp_path, code, status):
    """``end_rank`` (what ``cpcx``'s main calls after a command under torchrun) skips the interpreter's teardown,
    where gloo aborted on a loaded machine, and keeps what was printed and the exit status."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_ABORTS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    out = done.stdout + done.stderr
    assert "Aborted" not in out and "rank 0 done" in out and "rank 1 done" in out, out[-3000:]
    assert (done.returncode == 0) == (status == 0), out[-3000:]
    if status:
        assert "no labels written" in out


def test_end_rank_returns_in_a_process_that_joined_no_group():
    from cpcx.distributed import end_rank

    end_rank(0)  # one process, no torchrun: the normal exit follows (the test would end here otherwise)


# --------------------------------------------------------------------------------------- end to end
def _env() -> dict:
    # One thread per process, in the single-process reference too: the comparison is about sharding, not threads.
    env = {**os.environ}
    env.pop("PYTHONFAULTHANDLER", None)  # the ranks' own faulthandler is under test (cpcx.distributed enables it)
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _cpcx(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "cpcx"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "cpcx"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


def _files(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(pattern)) if p.is_file()}


@pytest.mark.slow
def test_pseudo_on_two_processes_equals_one(tmp_path, voc_root):
    """8 images in batches of 2 (each rank takes every other batch), the class probe trained by rank 0 alone, the
    CRF on: the labels are the same bytes, metrics.json the same dict; a resumed sharded run still agrees."""
    from test_pseudo import _checkpoint, _recipe

    from cpcx.recipe import load_recipe

    path = _recipe(tmp_path, voc_root, pseudo={
        "batch_size": 2, "workers": 1, "figures": 1, "device": "cpu",
        "class_probe": {"enabled": True, "min_images": 1, "object_threshold": 0.0, "epochs": 2}})
    recipe = load_recipe(path)
    _checkpoint(recipe)
    stage = recipe.run_dir("pseudo")

    single = _cpcx("pseudo", "-r", str(path))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    labels, metrics = _files(stage / "labels"), json.loads((stage / "metrics.json").read_text())
    probe = torch.load(stage / "class_probe.pt", weights_only=True)
    assert len(labels) == 8 and metrics["images"] == 8 and metrics["images_no_crf"] == 8
    # labels that say something (object classes, not all background), or their equality would prove little
    from cpcx.data import load_label_png

    assert sum(int((load_label_png(stage / "labels" / name) > 0).sum()) > 0 for name in labels) >= 4

    shutil.rmtree(stage)  # same run folder (metrics.json names the checkpoint's path), nothing left over
    sharded = _cpcx("pseudo", "-r", str(path), ranks=2)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-8000:]
    assert "2 processes, 4 of the 8 to do here" in sharded.stdout
    assert sharded.stdout.count("pseudo-labels for 8 train images") == 1  # rank 0 alone speaks
    assert _files(stage / "labels") == labels
    assert json.loads((stage / "metrics.json").read_text()) == metrics
    again = torch.load(stage / "class_probe.pt", weights_only=True)
    assert all(torch.equal(probe[k], again[k]) for k in ("weight", "bias", "known"))
    assert json.loads((stage / "stage.json").read_text())["status"] == "done"
    assert (stage / "confusion.csv").is_file() and len(list((stage / "figures" / "overlays").glob("*.png"))) == 1
    assert not list(stage.glob("no_crf.part-*")) and not list((stage / "labels").glob(".*"))

    # resumable: three labels gone (one rank's whole share of them, one of the other's), the rest kept untouched
    names = sorted(labels)
    kept = {n: (stage / "labels" / n).stat().st_mtime_ns for n in names[3:]}
    for name in names[:3]:
        (stage / "labels" / name).unlink()
    resumed = _cpcx("pseudo", "-r", str(path), ranks=2)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-8000:]
    assert "5 already done" in resumed.stdout
    assert _files(stage / "labels") == labels
    assert all((stage / "labels" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert json.loads((stage / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_saliency_on_two_processes_equals_one(tmp_path, voc_root):
    """``pseudo.saliency`` under torchrun: each rank computes the maps of its share, the labels are the bytes of one
    process's, and the maps folder holds each image's map once."""
    from saliency_net import left_half_onnx
    from test_pseudo import _checkpoint, _recipe

    from cpcx.recipe import load_recipe

    network = left_half_onnx(tmp_path / "half.onnx", 64)
    path = _recipe(tmp_path, voc_root, pseudo={
        "batch_size": 2, "workers": 1, "figures": 0, "device": "cpu",
        "saliency": {"enabled": True, "weights": str(network), "size": 64, "weight": 0.5, "weight_multi": 0.5}})
    recipe = load_recipe(path)
    _checkpoint(recipe)
    stage = recipe.run_dir("pseudo")
    single = _cpcx("pseudo", "-r", str(path))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    labels, maps = _files(stage / "labels"), _files(stage / "saliency", "*.png")
    assert len(labels) == 8 and len(maps) == 8

    shutil.rmtree(stage)
    sharded = _cpcx("pseudo", "-r", str(path), ranks=2)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-8000:]
    assert sharded.stdout.count("saliency: 4 maps") == 1  # rank 0 reports its share; rank 1 computes its own quietly
    assert _files(stage / "labels") == labels
    assert _files(stage / "saliency", "*.png") == maps


@pytest.mark.slow
def test_context_paste_on_two_processes(tmp_path, voc_root):
    """``pseudo.context_paste`` under torchrun: the ranks share the first pass, train the second network together
    (DDP, as `cpcx train`) and share the second pass. The single-class images' labels are the bytes one process
    writes (the same network); the multi-class ones come from a network trained on two processes, whose float sums
    need not be one process's, so they are only checked to be there."""
    from test_context_paste import _paste_recipe

    from cpcx.pseudo.context_paste import multi_class
    from cpcx.data import build_dataset

    path, recipe = _paste_recipe(tmp_path, voc_root)
    stage = recipe.run_dir("pseudo")
    single = _cpcx("pseudo", "-r", str(path), "pseudo.device=cpu", "train.device=cpu")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    labels = _files(stage / "labels")
    dataset = build_dataset(recipe.dataset, "train")
    one_class = {f"{image_id}.png" for i, image_id in enumerate(dataset.ids) if not multi_class(dataset.labels)[i]}

    shutil.rmtree(stage)
    sharded = _cpcx("pseudo", "-r", str(path), "pseudo.device=cpu", "train.device=cpu", ranks=2)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-8000:]
    assert "2 processes, " in sharded.stdout and "with at most one object class to do here" in sharded.stdout
    assert "cpu × 2" in sharded.stdout  # the second network trained on both processes
    again = _files(stage / "labels")
    assert sorted(again) == sorted(labels)
    assert {n: again[n] for n in one_class} == {n: labels[n] for n in one_class}
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["context_paste"] is True and metrics["images"] == 8
    assert (stage / "paste" / "weights" / "last.pt").is_file()
    assert json.loads((stage / "stage.json").read_text())["status"] == "done"


def _segment_checkpoint(path: Path) -> None:
    """An untrained smoke-recipe segmenter (EfficientNet-Lite0 DeepLabV3+, random init): predict only needs the
    format, and its labels are still a deterministic function of the image."""
    from cpcx import atomic
    from cpcx.data.classes import VOC_CLASSES
    from cpcx.recipe import load_recipe
    from cpcx.segment.networks import build_segnet, segnet_meta

    cfg = load_recipe(REPO / "recipes" / "smoke.yaml", check_inputs=False).segment
    torch.manual_seed(0)
    net = build_segnet(cfg, len(VOC_CLASSES), load_weights=False)
    atomic.save_torch(path, {"model": net.net.state_dict(), "meta": segnet_meta(cfg, VOC_CLASSES)})


@pytest.mark.slow
def test_predict_on_two_processes_equals_one(tmp_path, voc_root):
    """5 images and a file that is no image: the same label PNGs and overlays, and the exit code 1 of one failure
    (the bad file, sixth, is in rank 1's shard: rank 0 learns of it only through the failure count summed over
    the ranks)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for source in sorted((voc_root / "JPEGImages").glob("*.jpg"))[:5]:
        shutil.copy(source, inputs / source.name)
    (inputs / "zz-broken.jpg").write_text("not an image\n")
    weights = tmp_path / "seg.pt"
    _segment_checkpoint(weights)
    args = ["predict", "-r", str(REPO / "recipes" / "smoke.yaml"), str(inputs), "--weights", str(weights),
            f"runs_dir={tmp_path / 'runs'}", "segment.crf=true", "segment.device=cpu"]

    single = _cpcx(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 1, single.stdout[-2000:] + single.stderr[-2000:]
    assert "5 done, 1 failed" in single.stdout
    sharded = _cpcx(*args, "--out", str(tmp_path / "two"), ranks=2)
    assert sharded.returncode == 1, sharded.stdout[-2000:] + sharded.stderr[-8000:]
    assert "5 done, 1 failed" in sharded.stdout and sharded.stdout.count("predict: 6 images") == 1
    assert "zz-broken.jpg" in sharded.stdout + sharded.stderr
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two) and len([n for n in one if n.startswith("labels/")]) == 5
    assert one == two

    # no failure anywhere: exit code 0 on every rank
    (inputs / "zz-broken.jpg").unlink()
    clean = _cpcx(*args, "--out", str(tmp_path / "three"), ranks=2)
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-8000:]
    assert "5 done, 0 failed" in clean.stdout
