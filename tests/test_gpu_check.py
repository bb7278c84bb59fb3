"""benchmarks/gpu_check.sh, the check meant for a GPU machine, run here on the CPU at tiny sizes (so that it cannot
rot unnoticed): every part, DDP with 2 gloo processes included, and the JSON it writes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

TINY = ["--device", "cpu", "--precision", "fp32", "--backbone", "test_vit", "--img-size", "64", "--batch-size", "2",
        "--steps", "1", "--warmup", "1", "--seg-steps", "1", "--seg-crop", "65", "--seg-batch", "2",
        "--infer-images", "2", "--infer-size", "96", "--crf-workers", "1"]
EXPECTED = {
    "train": {"images_per_s", "seconds_per_step", "peak_memory_mib", "loss", "img_size", "batch_per_process"},
    "train_ddp": {"images_per_s", "seconds_per_step", "peak_memory_mib", "loss", "processes"},
    "segment": {"images_per_s", "seconds_per_step", "peak_memory_mib", "loss", "crop_size", "batch_size"},
    "infer": {"network_images_per_s", "with_crf_images_per_s", "peak_memory_mib", "images", "img_size"},
}


@pytest.mark.slow
def test_the_script_runs_every_part_on_the_cpu_and_writes_finite_numbers(tmp_path, voc_root):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_NPROC": "2", "GPU_CHECK_OUT": str(out),
           "CPCX_DATA": str(voc_root.parents[1]), "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), *TINY], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"]["type"] == "cpu" and results["device"]["name"]
    for part, keys in EXPECTED.items():
        assert keys <= set(results[part]), (part, sorted(results[part]))
        for key, value in results[part].items():
            if isinstance(value, float):
                assert math.isfinite(value) and value >= 0, (part, key, value)
        assert results[part]["peak_memory_mib"] > 0
    assert results["train"]["backbone"] == "test_vit" and results["train_ddp"]["processes"] == 2
    assert results["train_ddp"]["batch_per_process"] == 1  # the global batch of 2 split over the 2 processes
    assert results["segment"]["arch"] == "deeplabv2" and results["segment"]["encoder"] == "resnet101"  # the paper's
    assert results["infer"]["images"] == 2 and results["infer"]["img_size"] == 96
    for part in ("train", "train_ddp", "segment", "infer"):  # one printed line per part, with its rate
        assert f"  {part} " in done.stdout


def test_bad_options_end_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--parts", "train,warp", "--out", str(tmp_path / "x.json")]) == 2
    assert "--parts: warp unknown" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--parts", "train_ddp", "--out", str(tmp_path / "x.json")]) == 2
    assert "run under torchrun" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--parts", "infer", "--data", str(tmp_path)]) == 2
    assert "holds no JPEGImages" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_ddp_rank_of_the_check_ends_without_the_teardown(tmp_path, processes):
    """The check's DDP part leaves its group and ends as cpcx's commands do (``distributed.end_rank``): gloo's C++
    teardown aborted a finished rank on a loaded machine ("terminate called without an active exception", seen in
    this very script in a clean-clone test run). A teardown that aborts stands in for it here; without the early
    end, torchrun reports the ranks failed. One process (a one-GPU machine) still joins a group: DDP needs one."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\nif 'LOCAL_RANK' in os.environ:  # torchrun's workers, not its launcher\n"
        "    atexit.register(os.abort)\n")
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                           str(REPO / "benchmarks" / "gpu_check.py"), *TINY, "--parts", "train_ddp",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Aborted" not in done.stderr and "  train_ddp " in done.stdout
    assert json.loads(out.read_text())["train_ddp"]["processes"] == processes
