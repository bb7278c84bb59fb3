"""Ways of decoding a trained run's patch maps without retraining it, for ``diagnose_pseudo.py``.

Each takes the label-conditioned maps (N, C, h, w) as ``cpcx pseudo`` makes them (or the raw probabilities),
and where named the run's final DINOv2 tokens (N, h, w, e), and returns maps of the same shape that the
diagnosis scores the same way. None of them is part of the pipeline: they measure what a change of decoding
could gain before anyone builds it into ``cpcx pseudo``.
"""
from __future__ import annotations


def threshold_maps(probs, labels, background: float):
    """CAM-style decoding: present classes max-normalised per image, the background a fixed score."""
    maps = probs * labels[:, :, None, None]
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    maps[:, 0] = background
    return maps


def affinity_maps(maps, feats, tau: float, steps: int):
    """maps ← A^steps maps, A = row-softmax of the cosine similarity of the DINOv2 tokens / tau (per image)."""
    import torch
    import torch.nn.functional as F

    out = []
    for m, f in zip(maps, feats):
        x = F.normalize(f.flatten(0, 1), dim=-1)
        a = (x @ x.T / tau).softmax(-1)
        p = m.flatten(1).T
        for _ in range(steps):
            p = a @ p
        out.append(p.T.reshape(m.shape))
    return torch.stack(out)


def selftrain_maps(maps, feats, labels, confidence: float, epochs: int = 30, seed: int = 0):
    """A linear probe on the (normalised) tokens, trained on the patches whose label-conditioned probability
    exceeds ``confidence``, predicting over the image's classes only; its softmax is the new map."""
    import torch
    import torch.nn.functional as F

    from cpcx.pseudo.class_probe import train_linear_head

    c = maps.shape[1]
    x = F.normalize(feats.flatten(0, 2), dim=-1) * 10.0
    p = maps.permute(0, 2, 3, 1).reshape(-1, c)
    present = labels[:, None, None, :].expand(-1, *maps.shape[2:], -1).reshape(-1, c) > 0
    conf, target = p.max(1)
    keep = conf > confidence
    xk, yk, mk = x[keep], target[keep], present[keep]
    head = train_linear_head(
        xk, c, lambda logits, idx: F.cross_entropy(logits.masked_fill(~mk[idx], -1e4), yk[idx]), epochs, seed)
    with torch.no_grad():
        q = head(x).masked_fill(~present, -1e4).softmax(-1)
    return q.reshape(maps.shape[0], *maps.shape[2:], c).permute(0, 3, 1, 2), float(keep.float().mean())


def object_share(maps):
    """Per patch, the share of the label-conditioned score that goes to objects (N, h, w)."""
    return 1 - maps[:, 0] / maps.sum(1).clamp_min(1e-12)


def with_objectness(maps, objectness):
    """Maps whose object-vs-background call is ``objectness > 0.5`` and whose object class is the network's:
    the background scores 1 - o, the present object classes o × their score over the best object's."""
    out = maps.clone()
    objects = maps[:, 1:]
    out[:, 1:] = objectness[:, None] * objects / objects.amax(1, keepdim=True).clamp_min(1e-12)
    out[:, 0] = 1 - objectness
    return out


def pca_objectness(maps, feats):
    """Per image, the first principal component of its DINOv2 tokens (the DINOv2 paper's unsupervised
    foreground cue), standardised, signed to agree with the network's object share, squashed to (0, 1)."""
    import torch

    share = object_share(maps)
    out = []
    for f, s in zip(feats, share):
        x = f.flatten(0, 1).float()
        x = x - x.mean(0)
        _, _, v = torch.pca_lowrank(x, q=3, center=False)
        c = x @ v[:, 0]
        c = (c - c.mean()) / c.std().clamp_min(1e-6)
        if torch.corrcoef(torch.stack([c, s.flatten()]))[0, 1] < 0:
            c = -c
        out.append(torch.sigmoid(2 * c).reshape(s.shape))
    return torch.stack(out)


def probe_objectness(maps, feats, low: float = 0.2, high: float = 0.8, epochs: int = 30, seed: int = 0):
    """A class-agnostic linear probe on the tokens, trained on the patches the network calls object (share >
    ``high``) or background (< ``low``); its probability averaged with the network's object share."""
    import torch
    import torch.nn.functional as F

    from cpcx.pseudo.class_probe import train_linear_head

    share = object_share(maps)
    x = F.normalize(feats.flatten(0, 2).float(), dim=-1) * 10.0
    s = share.flatten()
    keep = (s < low) | (s > high)
    xk, yk = x[keep], (s[keep] > 0.5).float()
    head = train_linear_head(
        xk, 1, lambda logits, idx: F.binary_cross_entropy_with_logits(logits[:, 0], yk[idx]), epochs, seed)
    with torch.no_grad():
        probe = torch.sigmoid(head(x)[:, 0]).reshape(share.shape)
    return (probe + share) / 2


def prototype_maps(maps, feats, labels, confidence: float = 0.8, tau: float = 0.05):
    """The object class re-decided by dataset-level token prototypes: per class the mean normalised token of the
    patches where it wins with a score above ``confidence`` (over all images), then each present object class
    scores its map × the softmax over the present objects of cos(token, prototype) / ``tau``, rescaled to keep the
    network's strongest object score. Object-vs-background stays the network's; only the choice among the
    present objects can change (the confusion half of the error split)."""
    import torch
    import torch.nn.functional as F

    x = F.normalize(feats.float(), dim=-1)
    winner = maps.argmax(1)
    prototypes = torch.zeros(maps.shape[1], x.shape[-1])
    for c in range(1, maps.shape[1]):
        chosen = (winner == c) & (maps[:, c] > confidence)
        if chosen.any():
            prototypes[c] = x[chosen].mean(0)
    prototypes = F.normalize(prototypes, dim=-1)
    present = labels[:, 1:, None, None] > 0
    similarity = torch.einsum("nhwe,ce->nchw", x, prototypes)[:, 1:] / tau
    share = similarity.masked_fill(~present, -1e4).softmax(1) * present
    objects = maps[:, 1:] * share
    out = maps.clone()
    out[:, 1:] = objects / objects.amax(1, keepdim=True).clamp_min(1e-12) * maps[:, 1:].amax(1, keepdim=True)
    return out


def folds_of(n: int, folds: int, seed: int) -> list:
    """[(train indices, held-out indices)] of a ``folds``-fold split of ``n`` images drawn from ``seed``: every image
    held out exactly once; ``cpcx.pseudo.self_training``'s split (the bounds here and in ``supervised_bound.py`` use it)."""
    from cpcx.pseudo.self_training import folds_of as split

    return split(n, folds, seed)


def supervised_probe_probs(feats, truth, folds: int = 10, epochs: int = 10, seed: int = 0):
    """What full supervision gets out of the same frozen tokens and images: a linear head trained on the
    ground-truth class of each patch (``truth`` (N, C, h, w), class shares per patch; patches with no valid
    pixel left out), cross-validated so that each image is predicted by the head of the ``folds`` - 1 folds it
    is not in. Returns the heads' softmax (N, C, h, w), to be label-conditioned like the network's. Not a
    decoding of the run: the bound against which the weak supervision is measured (Adam at 1e-2, batches of
    4096 patches, ``epochs`` epochs; 10 were as good as 30 on voc-mini)."""
    import torch
    import torch.nn.functional as F

    from cpcx.pseudo.class_probe import train_linear_head

    n, c = truth.shape[:2]
    x = F.normalize(feats.float(), dim=-1) * 10.0
    target = truth.argmax(1)
    valid = truth.sum(1) > 0.5
    out = torch.zeros(n, *truth.shape[2:], c)
    for fold, (_, held_out) in enumerate(folds_of(n, folds, seed)):
        train = valid.clone()
        train[held_out] = False
        xk, yk = x[train], target[train]
        head = train_linear_head(xk, c, lambda logits, idx: F.cross_entropy(logits, yk[idx]), epochs, seed + fold)
        with torch.no_grad():
            out[held_out] = head(x[held_out]).softmax(-1)
    return out.permute(0, 3, 1, 2)
