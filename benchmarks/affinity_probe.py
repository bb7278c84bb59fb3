"""Does an affinity learned from the confident regions fix the object-vs-background call? (issue 20, AffinityNet idea)

    .venv/bin/python benchmarks/affinity_probe.py --seeds 0 1 2           # screen on seed 0's first 200 ids, confirm
    .venv/bin/python benchmarks/affinity_probe.py --seeds 0 --limit 24 --out /tmp/aff   # a smoke run

AffinityNet (Ahn & Kwak, CVPR 2018) and IRN (Ahn et al., CVPR 2019) learn, from image labels alone, which
neighbouring pixels belong together: the class maps' confident regions (an object class or the background above a
threshold) give pairs of the same label (affinity 1) and of different labels (affinity 0), the rest is ignored; a
network trained on those pairs predicts an affinity for every pair, and a random walk with it spreads the maps
inside regions and stops at boundaries. Here the same, on voc-mini's frozen patch grid:

* the maps: the run's label-conditioned maps, exactly as ``cpcx pseudo`` decodes them (class probe included);
* confident patches: argmax over the image's classes with a share of at least ``fg`` (an object) or ``bg`` (the
  background); pairs within ``RADIUS`` patches;
* the affinity head: per-channel standardised tokens (the fused 24 × 24 × 816 grid, the original view) → 1 × 1
  convolution to 256, GELU, 3 × 3 convolution to 64; affinity ``exp(-mean |g_i - g_j|)``; AffinityNet's loss
  (a quarter each to background pairs and object pairs of one label, half to pairs of two labels), Adam;
* the walk: ``T = D⁻¹ A^β`` over the pairs within ``radius`` (self included), the maps ``t`` times through it,
  blended with the maps (weight ``alpha``), decoded as ``cpcx pseudo`` (bilinear to the image, argmax; with the
  CRF, voc-mini's).

Settings are screened without CRF on the first 200 train ids of the first seed (``CHOOSE``); the best is then
scored with and without voc-mini's CRF on all 311, split into those 200 and the other 111, on every seed.
Reads the finished runs ``runs-bench/var-bf16-crf5-sN`` (voc-mini as it ships; ``benchmarks/variants.py --only
bf16-crf5``) and their token cache; writes ``benchmarks/results/affinity.{json,md}`` (``--out``).
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
from backbones import CHOOSE  # noqa: E402
from diagnose_pseudo import miou_and_fg  # noqa: E402
from results_rows import VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402
from variants import VARIANTS  # noqa: E402

RUN = "var-bf16-crf5-s{seed}"
RADIUS = 4  # training pairs: patches at most this far apart (on the 24 × 24 grid: a sixth of the image)


# ----------------------------------------------------------------------------------------------- the pairs
def offsets(radius: int) -> list[tuple[int, int]]:
    """Half of the neighbourhood (each unordered pair once): (dy, dx) with dy > 0, or dy = 0 and dx > 0."""
    return [(dy, dx) for dy in range(0, radius + 1) for dx in range(-radius, radius + 1)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius]


def pair_slices(h: int, w: int, dy: int, dx: int):
    """Slices (a, b) of an h × w grid such that x[..., a] and x[..., b] are the pairs at offset (dy, dx)."""
    ys, ye = 0, h - dy
    xs, xe = max(0, -dx), w - max(0, dx)
    return (slice(ys, ye), slice(xs, xe)), (slice(ys + dy, ye + dy), slice(xs + dx, xe + dx))


def confident_labels(maps, fg: float, bg: float):
    """(N, h, w) int64: the argmax class where its share reaches ``fg`` (objects) or ``bg`` (background), else -1."""
    import torch

    share, best = maps.max(1)
    keep = torch.where(best > 0, share >= fg, share >= bg)
    return torch.where(keep, best, torch.full_like(best, -1))


# ------------------------------------------------------------------------------------------ the network
def affinity_head(channels: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(channels, 256, 1), nn.GELU(), nn.Conv2d(256, 64, 3, padding=1))


def pair_affinity(g, a, b):
    """exp(-mean_c |g_i - g_j|) of the pairs (a, b) of embeddings ``g`` (B, d, h, w) → (B, h', w')."""
    import torch

    return torch.exp(-(g[:, :, a[0], a[1]] - g[:, :, b[0], b[1]]).abs().mean(1))


def train_affinity(tokens, labels, epochs: int = 12, batch: int = 16, seed: int = 0, log=print):
    """The head trained on the confident pairs. ``tokens`` (N, e, h, w) standardised, ``labels`` (N, h, w)."""
    import torch

    torch.manual_seed(seed)
    head = affinity_head(tokens.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    h, w = labels.shape[1:]
    pairs = [pair_slices(h, w, dy, dx) for dy, dx in offsets(RADIUS)]
    steps = epochs * ((len(tokens) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order, total = torch.randperm(len(tokens), generator=generator), 0.0
        for start in range(0, len(tokens), batch):
            index = order[start:start + batch]
            g, y = head(tokens[index]), labels[index]
            terms = {"bg": [], "fg": [], "neg": []}
            for a, b in pairs:
                ya, yb, aff = y[:, a[0], a[1]], y[:, b[0], b[1]], pair_affinity(g, a, b)
                valid = (ya >= 0) & (yb >= 0)
                same = valid & (ya == yb)
                terms["bg"].append(-torch.log(aff[same & (ya == 0)] + 1e-5))
                terms["fg"].append(-torch.log(aff[same & (ya > 0)] + 1e-5))
                terms["neg"].append(-torch.log(1 - aff[valid & (ya != yb)] + 1e-5))
            parts = {k: torch.cat(v) for k, v in terms.items()}
            loss = sum(weight * parts[k].mean() for k, weight in (("bg", .25), ("fg", .25), ("neg", .5))
                       if parts[k].numel())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss) * len(index)
        log(f"  affinity epoch {epoch + 1}/{epochs}: loss {total / len(tokens):.4f}")
    return head.eval()


def embed(head, tokens, batch: int = 32):
    import torch

    with torch.inference_mode():
        return torch.cat([head(tokens[s:s + batch]) for s in range(0, len(tokens), batch)])


def walks(maps, g, settings):
    """{(beta, steps, radius, alpha): walked maps (C, h, w)} for one image's maps (C, h, w) and embeddings ``g``
    (d, h, w): ``steps`` steps of T = D⁻¹ A^β over the pairs within ``radius`` patches (self included), blended
    with the maps, (1 - alpha) maps + alpha walked, and renormalised over the classes. The pairwise distances
    are computed once, and each (beta, radius) walk once up to its largest ``steps``."""
    import torch

    c, h, w = maps.shape
    flat = g.flatten(1).T  # (hw, d)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    distance = torch.cdist(pos, pos)
    base = torch.exp(-torch.cdist(flat, flat, p=1) / flat.shape[1])
    m = maps.flatten(1).T  # (hw, C)
    out = {}
    for beta, radius in {(s[0], s[2]) for s in settings}:
        affinity = base.pow(beta) * (distance <= radius)
        transition = affinity / affinity.sum(1, keepdim=True)
        wanted = sorted({s[1] for s in settings if (s[0], s[2]) == (beta, radius)})
        walked, done = m, 0
        for steps in wanted:
            for _ in range(steps - done):
                walked = transition @ walked
            done = steps
            for alpha in {s[3] for s in settings if (s[0], s[1], s[2]) == (beta, steps, radius)}:
                blend = (1 - alpha) * m + alpha * walked
                blend = blend / blend.sum(1, keepdim=True).clamp_min(1e-12)
                out[(beta, steps, radius, alpha)] = blend.T.reshape(c, h, w)
    return out


# ------------------------------------------------------------------------------------------- the scoring
def score(dataset, maps, settings, embeddings, indices, crf=None):
    """{setting: {part: [no-CRF confusion, CRF confusion or None]}}; setting ("base",) is the run's own decoding."""
    from cpcx.pseudo.infer import upsample
    from diagnose_pseudo import score_decodings

    def decode(i, mask, classes):
        walked = {th: walks(maps[i], embeddings[th][i], [s[1:] for s in settings if s[0] == th])
                  for th in {s[0] for s in settings if s[0] != "base"}}
        return {s: upsample(maps[i] if s[0] == "base" else walked[s[0]][s[1:]], classes, mask.shape).numpy()
                for s in settings}

    return score_decodings(dataset, indices, settings, decode, crf, CHOOSE)


def confident_errors(maps, masks, levels=(0.7, 0.8, 0.9)) -> dict:
    """How sure the maps are where their object-vs-background call is wrong, on the patch grid: a patch is object
    in the truth when more than half of its area is (``truth_on_grid``), object in the maps when an object class
    wins; → the share of the wrong patches whose winning share reaches each level, and of all patches. Propagation
    from the confident patches (this walk, AffinityNet, IRN) can only fix errors outside them."""
    from diagnose_pseudo import truth_on_grid

    truth = truth_on_grid(masks, maps.shape[1], tuple(maps.shape[2:]))
    valid = truth.sum(1) > 0.5
    wrong = ((truth[:, 1:].sum(1) > 0.5) != (maps.argmax(1) > 0)) & valid
    share = maps.max(1).values
    out = {"wrong_patches": 100 * float(wrong.sum() / valid.sum())}
    for level in levels:
        out[f"wrong_at_{level}"] = 100 * float((wrong & (share >= level)).sum() / wrong.sum().clamp_min(1))
        out[f"all_at_{level}"] = 100 * float(((share >= level) & valid).sum() / valid.sum())
    return out


def screen_grid(thresholds) -> list[tuple]:
    walks = [(beta, steps, radius, alpha) for beta, steps, radius, alpha
             in itertools.product((2, 4, 8), (2, 8, 32), (2, 4), (0.5, 1.0))]
    return [(th, *wk) for th in thresholds for wk in walks]


def render(doc: dict) -> str:
    """The md of the json: the screen's best rows, base against the chosen walk per seed, the confident errors."""
    lines = ["# Affinity learned from the confident patches, random walk on the grid (issue 20)", "",
             f"Generated by `{doc.get('command', 'benchmarks/affinity_probe.py')}`"
             + (f" and `{doc['errors_command']}`" if doc.get("errors_command") else "") + "; see the script's docstring.",
             "", "Screen (seed 0, first 200 train ids, no CRF), best 10 of "
             f"{len(doc.get('screen', []))} and the run's own decoding; setting = ((object, background) thresholds, "
             "beta, steps, radius, alpha):", "", "| setting | mIoU | object/background IoU |", "|---|---:|---:|"]
    screen = doc.get("screen", [])
    for row in screen[:10] + [r for r in screen[10:] if r["setting"] == ["base"]]:
        lines.append(f"| {row['setting']} | {row['miou']:.1f} | {row['fg_iou']:.1f} |")
    lines += ["", "Per seed, all 311 train ids (choose 200 / report 111), mIoU (object/background IoU):", "",
              "| seed | decoding | CRF | CRF choose / report | no CRF |", "|---|---|---:|---|---:|"]
    for seed, rows in doc.get("seeds", {}).items():
        for setting, f in rows.items():
            if setting == "score_seconds":
                continue
            lines.append(f"| {seed} | {setting} | {f['all_crf']['miou']:.1f} ({f['all_crf']['fg_iou']:.1f}) | "
                         f"{f['choose_crf']['miou']:.1f} / {f['report_crf']['miou']:.1f} | "
                         f"{f['all_no_crf']['miou']:.1f} ({f['all_no_crf']['fg_iou']:.1f}) |")
    if doc.get("confident_errors"):
        lines += ["", "Where the maps' object/background call is wrong (patch grid, truth: more than half of the patch):",
                  "", "| seed | wrong patches % | of them with share ≥ 0.7 / 0.8 / 0.9 | all patches ≥ 0.7 / 0.8 / 0.9 |",
                  "|---|---:|---|---|"]
        for seed, e in doc["confident_errors"].items():
            lines.append(f"| {seed} | {e['wrong_patches']:.1f} | {e['wrong_at_0.7']:.1f} / {e['wrong_at_0.8']:.1f} / "
                         f"{e['wrong_at_0.9']:.1f} | {e['all_at_0.7']:.1f} / {e['all_at_0.8']:.1f} / {e['all_at_0.9']:.1f} |")
    return "\n".join(lines) + "\n"


def load_seed(seed: int, runs: Path, overrides: tuple[str, ...] | list[str] = ()):
    """(recipe, dataset, label-conditioned maps as ``cpcx pseudo`` decodes them, original-view tokens) of a run;
    ``overrides`` change how it is decoded (``pseudo.*``)."""
    from cpcx.recipe import load_recipe
    from diagnose_pseudo import decode_as_pseudo, load_run

    recipe = load_recipe(ROOT / VOC_RECIPE, [f"name={RUN.format(seed=seed)}", f"seed={seed}", f"runs_dir={runs}",
                                             f"train.feature_cache_dir={runs}/features-bb", *VOC_MINI_BEFORE_TRIM,
                                             *VARIANTS["bf16-crf5"][1], *overrides])
    dataset, probs, feats = load_run(recipe)
    return recipe, dataset, decode_as_pseudo(probs, feats, dataset.labels, recipe), feats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is screened on")
    parser.add_argument("--thresholds", default="0.7:0.7,0.8:0.8,0.9:0.9,0.7:0.9",
                        help="object:background share thresholds of the confident patches, screened")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--errors-only", action="store_true",
                        help="only the confident-error figures of each seed (added to the json at --out)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "affinity")
    args = parser.parse_args(argv)

    import torch

    from cpcx import atomic
    from cpcx.crf import CRFParams

    torch.set_num_threads(1)
    thresholds = [tuple(float(v) for v in t.split(":")) for t in args.thresholds.split(",")]
    command = " ".join(["benchmarks/affinity_probe.py", *(argv or sys.argv[1:])])
    if args.errors_only:  # added to the json of an earlier run
        doc = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
        doc["errors_command"] = command
    else:
        doc = {"command": command, "seeds": {}}
    chosen = None
    for n, seed in enumerate(args.seeds):
        recipe, dataset, maps, feats = load_seed(seed, args.runs_dir.resolve())
        indices = list(range(len(dataset) if args.limit is None else min(args.limit, len(dataset))))
        tokens = feats.permute(0, 3, 1, 2)
        tokens = (tokens - tokens.mean((0, 2, 3), keepdim=True)) / tokens.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        doc.setdefault("confident_errors", {})[str(seed)] = confident_errors(
            maps[indices], [dataset.load_mask(i) for i in indices])
        print(f"seed {seed}: {doc['confident_errors'][str(seed)]}", flush=True)
        if args.errors_only:
            continue
        embeddings, seconds = {}, {}
        for th in (thresholds if n == 0 else [chosen[0]]):
            start = time.perf_counter()
            labels = confident_labels(maps, *th)
            print(f"seed {seed} thresholds {th}: {100 * float((labels >= 0).float().mean()):.1f} % of patches confident",
                  flush=True)
            head = train_affinity(tokens, labels, args.epochs, seed=seed)
            embeddings[th] = embed(head, tokens)
            seconds[str(th)] = time.perf_counter() - start
        doc.setdefault("train_seconds", {})[seed] = seconds
        if n == 0:
            settings = [("base",)] + screen_grid(thresholds)
            screen = score(dataset, maps, settings, embeddings, [i for i in indices if i < CHOOSE])
            rows = sorted(((s, miou_and_fg(screen[s]["choose"][0].matrix, dataset.classes)) for s in settings),
                          key=lambda r: -r[1]["miou"])
            doc["screen"] = [{"setting": list(s), **f} for s, f in rows]
            for s, f in rows[:10]:
                print("screen", s, f, flush=True)
            chosen = next(s for s, _ in rows if s[0] != "base")
        start = time.perf_counter()
        scored = score(dataset, maps, [("base",), chosen], embeddings, indices, CRFParams.from_config(recipe.crf))
        doc["seeds"][seed] = {json.dumps(s): {f"{part}_{'crf' if c else 'no_crf'}": miou_and_fg(m[c].matrix, dataset.classes)
                                              for part, m in parts.items() for c in (0, 1)}
                              for s, parts in scored.items()}
        doc["seeds"][seed]["score_seconds"] = time.perf_counter() - start
        print(json.dumps(doc["seeds"][seed], indent=1), flush=True)
        atomic.write_json(args.out.with_suffix(".json"), doc)
    atomic.write_json(args.out.with_suffix(".json"), doc)
    atomic.write_text(args.out.with_suffix(".md"), render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
