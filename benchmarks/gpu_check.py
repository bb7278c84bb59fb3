"""The GPU check: the paper recipe's heavy steps on this machine's accelerator, timed, with peak memory and the card.

    benchmarks/gpu_check.sh                                           # everything, DDP on all GPUs (≤ 8 min)
    .venv/bin/python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu-check.json
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_check.py --parts train_ddp --merge

Parts, on ``recipes/voc.yaml`` (the paper's settings) with random weights: nothing is downloaded
(HF_HUB_OFFLINE=1; the paper's ImageNet ViT-B/16 and ResNet-101 are not offline, and speed does not depend on
the weights).

- ``train``: CPC training steps (``cpcx.train.forward_loss``, Adam) of ViT-B/16 at 384 with the last
  ``train.unfreeze_blocks`` blocks trained (the fine-tuning phase, the heavier one), bf16 autocast, a batch of
  ``train.batch_size`` random images (data loading is not measured);
- ``train_ddp``: the same under torchrun with DistributedDataParallel, the batch split over the processes
  (the .sh starts one per visible GPU);
- ``segment``: DeepLab v2 ResNet-101 SGD steps on ``segment.crop_size`` crops, ``segment.batch_size`` a step;
- ``infer``: the pseudo stage on the first N images of the VOC slice: the network at ``pseudo.img_size``
  (960) with flip, then the dense CRF in worker processes (``cpcx.pseudo.label_images``, as ``cpcx pseudo``):
  images/s of the network alone and of the whole stage (which includes starting the CRF workers, as a run does).

Every timed span starts and ends with a device synchronize (CUDA runs asynchronously) and follows untimed
warm-up steps (cuDNN autotuning, allocator growth). Peak memory is ``torch.cuda.max_memory_allocated`` since the
part began; on a CPU the process's peak RSS so far. The JSON is rewritten after every part, so a run stopped by
the .sh's time limit keeps what finished.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the cpcx of this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cpcx import atomic, distributed  # noqa: E402
from cpcx.errors import CpcxError  # noqa: E402

PARTS = ("train", "segment", "infer", "train_ddp")
NUM_CLASSES = 21  # VOC: background + 20
NUM_CLUSTERS = 4  # a fixed partition stands in for the LLM's clusters: the cost is the same


# ------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since ``reset_peak``; on a CPU the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "host_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "peak_memory_is": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), count=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step over ``steps`` timed steps after ``warmup`` untimed ones, the last step's loss)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    loss = float(loss)  # one host sync, after the clock stopped
    if not math.isfinite(loss):
        raise CpcxError(f"the loss is {loss}: the {device} step diverged; try --precision fp32")
    return seconds, loss


# ----------------------------------------------------------------------------------------------- parts
def cluster_matrix() -> np.ndarray:
    """Foreground class c goes to cluster c mod NUM_CLUSTERS."""
    return np.eye(NUM_CLUSTERS, dtype=np.float32)[np.arange(NUM_CLASSES - 1) % NUM_CLUSTERS]


def cpc_train(recipe, device: torch.device, args, batch: int, ddp: bool = False) -> dict:
    """CPC training steps on random images: the model of ``recipe.model``, its fine-tuning phase."""
    from torch.nn.parallel import DistributedDataParallel

    from cpcx.model import build_model, cluster_vectors
    from cpcx.train import forward_loss

    torch.manual_seed(0)
    net = build_model(recipe.model, NUM_CLASSES, NUM_CLUSTERS, load_weights=False).to(device)
    blocks = recipe.train.unfreeze_blocks
    net.backbone.set_trainable_blocks(blocks)
    optimizer = torch.optim.Adam([{"params": net.head_parameters()},
                                  {"params": net.backbone.trainable_parameters(blocks)}],
                                 lr=recipe.train.lr_after_warmup, weight_decay=recipe.train.weight_decay)
    model = net
    if ddp:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    net.train()
    size = recipe.model.img_size
    generator = torch.Generator().manual_seed(dist.get_rank() if ddp else 0)
    labels = torch.zeros(batch, NUM_CLASSES)
    labels[:, 0] = 1  # background, always present
    labels[torch.arange(batch), 1 + torch.randint(0, NUM_CLASSES - 1, (batch,), generator=generator)] = 1
    data = {"x": torch.randn(batch, 3, size, size, generator=generator), "label": labels,
            "u": torch.from_numpy(cluster_vectors(labels.numpy(), cluster_matrix())), "index": torch.arange(batch)}
    data = {k: v.to(device) for k, v in data.items()}

    def step() -> torch.Tensor:
        losses = forward_loss(model, net, data, recipe.loss, device, args.precision, cached=False)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return losses["loss"].detach()

    reset_peak(device)
    seconds, loss = timed_steps(step, device, args.warmup, args.steps)
    return {"backbone": recipe.model.backbone, "img_size": size, "batch_per_process": batch,
            "trainable_blocks": blocks, "precision": args.precision, "steps": args.steps,
            "seconds_per_step": seconds, "images_per_s": batch / seconds, "peak_memory_mib": peak_memory_mib(device),
            "loss": loss}


def segment_steps(recipe, device: torch.device, args) -> dict:
    """DeepLab training steps (``segment.arch`` / ``segment.encoder``, random init) on random crops."""
    import torch.nn.functional as F

    from cpcx.segment.networks import build_segnet
    from cpcx.segment.stage import make_optimizer

    cfg = recipe.segment
    torch.manual_seed(0)
    model = build_segnet(cfg, NUM_CLASSES, load_weights=False).to(device).train()
    optimizer = make_optimizer(cfg, model.parameters())
    crop, batch = cfg.crop_size, cfg.batch_size
    images = torch.rand(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, crop, crop), device=device)

    def step() -> torch.Tensor:
        from cpcx.device import autocast

        with autocast(device, args.precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    reset_peak(device)
    seconds, loss = timed_steps(step, device, args.warmup, args.seg_steps)
    return {"arch": cfg.arch, "encoder": cfg.encoder, "crop_size": crop, "batch_size": batch,
            "precision": args.precision, "steps": args.seg_steps, "seconds_per_step": seconds,
            "images_per_s": batch / seconds, "peak_memory_mib": peak_memory_mib(device), "loss": loss}


def inference(recipe, device: torch.device, args) -> dict:
    """The pseudo stage on real images: network alone, then network + dense CRF (workers), as `cpcx pseudo`."""
    from cpcx.crf import CRFParams
    from cpcx.data import build_dataset
    from cpcx.model import build_model, cluster_vectors
    from cpcx.pseudo import label_images
    from cpcx.pseudo.infer import PatchPredictor

    cfg = recipe.pseudo
    dataset = build_dataset(recipe.dataset, "train")
    torch.manual_seed(0)
    net = build_model(recipe.model, NUM_CLASSES, NUM_CLUSTERS, load_weights=False)
    predictor = PatchPredictor(net, device, args.precision, cfg.img_size, cfg.flip, cfg.class_max_norm, cfg.scales)
    u = cluster_vectors(dataset.labels, cluster_matrix())
    indices = list(range(len(dataset)))
    images = [dataset.load_image(i) for i in indices]
    batches = [indices[k:k + cfg.batch_size] for k in range(0, len(indices), cfg.batch_size)]

    def network() -> None:
        for chunk in batches:
            predictor([images[i] for i in chunk], dataset.labels[chunk], u[chunk])

    network()  # warm-up: cuDNN / oneDNN kernels for this size
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    network()
    sync(device)
    network_s = time.perf_counter() - start
    crf = CRFParams.from_config(recipe.crf)
    with tempfile.TemporaryDirectory(prefix="gpu-check-labels-") as folder:
        start = time.perf_counter()
        label_images(predictor, dataset, indices, u, Path(folder), crf, args.crf_workers, cfg.batch_size, None)
        stage_s = time.perf_counter() - start  # label_images waits for every CRF, so no device sync is needed
        written = len(list(Path(folder).glob("*.png")))
    if written != len(dataset):
        raise CpcxError(f"the pseudo stage wrote {written} of {len(dataset)} labels")
    return {"images": len(dataset), "img_size": predictor.size, "flip": cfg.flip, "precision": args.precision,
            "batch_size": cfg.batch_size, "network_images_per_s": len(dataset) / network_s,
            "with_crf_images_per_s": len(dataset) / stage_s, "crf_workers": args.crf_workers,
            "crf_iterations": crf.iterations, "peak_memory_mib": peak_memory_mib(device)}


# ------------------------------------------------------------------------------------------ the check
def paper_recipe(args):
    """``--recipe`` (the paper's) with random weights, this check's sizes and the VOC slice as data."""
    from cpcx.recipe import load_recipe

    overrides = [
        "model.pretrained=false", "model.weights=null", f"model.backbone={args.backbone}",
        f"dataset.root={args.data}", "dataset.train_split=train", f"dataset.limit={args.infer_images}",
        "segment.encoder_weights=null", "segment.encoder_file=null",
    ]
    for key, value in (("model.img_size", args.img_size), ("train.batch_size", args.batch_size),
                       ("segment.crop_size", args.seg_crop), ("segment.batch_size", args.seg_batch),
                       ("segment.encoder", args.seg_encoder), ("pseudo.img_size", args.infer_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_recipe(args.recipe, overrides, check_inputs=False)


def _reduce_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def run(args) -> dict:
    from cpcx.device import resolve_device

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CpcxError(f"--parts: {', '.join(unknown)} unknown; use some of {', '.join(PARTS)}")
    if "train_ddp" in parts and len(parts) > 1:
        raise CpcxError("--parts: train_ddp runs alone, under torchrun (the .sh runs it after the others)")
    if "infer" in parts and not (Path(args.data) / "JPEGImages").is_dir():
        raise CpcxError(f"--data: {args.data} holds no JPEGImages/; point it at the VOC slice's VOC2012 folder "
                        "(or set CPCX_DATA to the folder holding voc2012-mini/)")
    recipe = paper_recipe(args)
    out = Path(args.out)
    results = {}
    if args.merge and out.is_file():
        results = json.loads(out.read_text())
    with contextlib.ExitStack() as group:
        main = True
        if parts == ["train_ddp"]:
            if "LOCAL_RANK" not in os.environ:
                raise CpcxError("--parts train_ddp: run under torchrun (benchmarks/gpu_check.sh does)")
            # joined even as torchrun's only process (DDP needs a group) and left together with the other ranks;
            # main() then ends the rank as cpcx's does (distributed.end_rank: gloo's teardown aborted finished ranks)
            ranks = group.enter_context(distributed.joined(args.device, "--device", join_alone=True))
            device, world, main = ranks.device, ranks.world_size, ranks.is_main
            batch = recipe.train.batch_size // world
            if batch < 1 or batch * world != recipe.train.batch_size:
                raise CpcxError(f"--batch-size: {recipe.train.batch_size} does not split over {world} processes")
        else:
            device = resolve_device(args.device, "--device")
        from cpcx.runs import git_sha

        results.update(when=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), git_sha=git_sha(),
                       device=device_info(device))
        say = print if main else (lambda *_: None)
        say(f"gpu check on {results['device']['name']} ({device}), torch {torch.__version__}: {', '.join(parts)}")
        for part in parts:
            if part == "train":
                result = cpc_train(recipe, device, args, recipe.train.batch_size)
            elif part == "train_ddp":
                result = cpc_train(recipe, device, args, batch, ddp=True)
                # the slowest process sets the pace; every GPU's peak is its own, the largest is reported
                result["seconds_per_step"] = _reduce_max(result["seconds_per_step"], device)
                result["peak_memory_mib"] = _reduce_max(result["peak_memory_mib"], device)
                result.update(processes=world, images_per_s=recipe.train.batch_size / result["seconds_per_step"])
            elif part == "segment":
                result = segment_steps(recipe, device, args)
            else:
                result = inference(recipe, device, args)
            results[part] = result
            if main:
                atomic.write_json(out, results)
            rate = result["images_per_s" if "images_per_s" in result else "with_crf_images_per_s"]
            say(f"  {part:<9} {rate:8.2f} images/s · peak {result['peak_memory_mib'] / 1024:.2f} GiB · "
                f"{_describe(part, result)}")
    say(f"→ {out}")
    return results


def _describe(part: str, r: dict) -> str:
    if part.startswith("train"):
        return (f"{r['backbone']} at {r['img_size']}², {r.get('processes', 1)} process(es) × {r['batch_per_process']}"
                f" images, last {r['trainable_blocks']} blocks trained, {r['seconds_per_step']:.3f} s/step")
    if part == "segment":
        return (f"{r['arch']} {r['encoder']}, {r['batch_size']} × {r['crop_size']}² crops, "
                f"{r['seconds_per_step']:.3f} s/step")
    return (f"{r['images']} VOC images at {r['img_size']}² (flip {r['flip']}), network alone "
            f"{r['network_images_per_s']:.2f} images/s, CRF ({r['crf_iterations']} iterations) in "
            f"{r['crf_workers']} worker(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data = Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data")) / "voc2012-mini" / "VOC2012"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    parser.add_argument("--parts", default="train,segment,infer",
                        help=f"comma-separated, of {', '.join(PARTS)} (train_ddp alone, under torchrun)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--steps", type=int, default=20, help="timed CPC training steps")
    parser.add_argument("--seg-steps", type=int, default=10, help="timed DeepLab training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed span")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "voc.yaml")
    parser.add_argument("--backbone", default="vit_base_patch16_384", help="timm name (random init)")
    parser.add_argument("--img-size", type=int, default=None, help="training input size (the recipe's: 384)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch over all processes (16)")
    parser.add_argument("--seg-encoder", default=None, help="DeepLab encoder (the recipe's: resnet101)")
    parser.add_argument("--seg-crop", type=int, default=None, help="DeepLab crop size (321)")
    parser.add_argument("--seg-batch", type=int, default=None, help="DeepLab batch (16)")
    parser.add_argument("--infer-images", type=int, default=20, help="VOC slice images for inference + CRF")
    parser.add_argument("--infer-size", type=int, default=None, help="inference size (the recipe's: 960)")
    parser.add_argument("--crf-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--data", type=Path, default=data, help="the VOC slice's VOC2012 folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu-check.json")
    parser.add_argument("--merge", action="store_true", help="add to --out's JSON instead of replacing it")
    args = parser.parse_args(argv)
    for name in ("steps", "seg_steps", "infer_images", "crf_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except CpcxError as exc:
        print(f"✘ {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    status = main()
    distributed.end_rank(status)  # a torchrun rank that left its group skips the teardown, as cpcx's commands do
    sys.exit(status)
