"""``pseudo.saliency.precision: int8``: the float16 graph ISNet ships in is widened to float32 exactly, the network is
quantized once per data set and size on the data set's first images (its one-channel heads left in floating point),
kept beside the maps and reused, and its maps follow the float network's."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from cpcx.saliency import SaliencyMaps, saliency_folder
from cpcx.saliency_int8 import float_graph, single_channel_convs
from saliency_net import tiny_unet_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


def _half_graph() -> bytes:
    """y = float(float16(x) · 0.5 + 1), in float16 inside as ISNet is: an initializer, a Constant and two Casts."""
    from onnx import TensorProto, helper, numpy_helper

    half = numpy_helper.from_array(np.array([0.5], np.float16), "half")
    one = helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1.0], np.float16)))
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16), one,
             helper.make_node("Mul", ["x16", "half"], ["m"]), helper.make_node("Add", ["m", "one"], ["a"]),
             helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [half],
                              value_info=[helper.make_tensor_value_info("x16", TensorProto.FLOAT16, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_float_graph_widens_every_float16_tensor_and_computes_the_same():
    from onnx import TensorProto

    widened = float_graph(_half_graph())
    model = onnx.load_from_string(widened)
    types = [t.data_type for t in model.graph.initializer]
    types += [a.t.data_type for n in model.graph.node for a in n.attribute if n.op_type == "Constant"]
    types += [a.i for n in model.graph.node for a in n.attribute if n.op_type == "Cast"]
    types += [v.type.tensor_type.elem_type for v in model.graph.value_info]
    assert TensorProto.FLOAT16 not in types and TensorProto.FLOAT in types
    x = np.array([[0.1, 2.0, -3.3, 1e-3]], np.float32)  # not exact in float16: the widened graph is exact
    out = ort.InferenceSession(widened, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x * 0.5 + 1, rtol=1e-6)


def _images() -> list[np.ndarray]:
    """Four images with a bright square on a darker, textured ground, at different places."""
    rng = np.random.default_rng(0)
    images = []
    for k in range(4):
        image = rng.integers(0, 90, (48, 64, 3), dtype=np.uint8)
        image[6 + 4 * k: 30 + 4 * k, 8 + 6 * k: 36 + 6 * k] = 230
        images.append(image)
    return images


def test_int8_maps_are_quantized_once_kept_beside_the_maps_and_follow_the_float_network(tmp_path):
    network = tiny_unet_onnx(tmp_path / "tiny.onnx", 64)
    images = _images()
    dataset = SimpleNamespace(ids=list("abcd"), source="x", load_image=lambda i: images[i])
    float_cfg = SimpleNamespace(weights=network, size=64, cache_dir=tmp_path)
    int8_cfg = SimpleNamespace(weights=network, size=64, cache_dir=tmp_path, precision="int8")
    folder = saliency_folder(int8_cfg, tmp_path, dataset)
    assert folder.name.split("-")[1:3] == ["64", "int8"] and folder != saliency_folder(float_cfg, tmp_path, dataset)
    plain = SaliencyMaps(float_cfg, dataset, saliency_folder(float_cfg, tmp_path, dataset))
    quantized = SaliencyMaps(int8_cfg, dataset, folder)
    plain.ensure(range(4), 1, _quiet())
    quantized.ensure(range(4), 1, _quiet())
    built = quantized.network(64)
    assert built.parent == folder.parent and built.name.endswith("-64-int8-" + folder.name.split("-")[-1] + ".onnx")

    model = onnx.load(built)  # quantized: convolutions fed by dequantized int8 weights, the one-channel head kept float
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    produced_by = {out: n for n in model.graph.node for out in n.output}
    heads = single_channel_convs(tiny_unet_onnx(tmp_path / "again.onnx", 64).read_bytes())
    assert len(heads) == 1
    head = next(n for n in model.graph.node if n.name == heads[0])
    assert head.input[1] not in produced_by  # its weights an initializer, not a DequantizeLinear output
    others = [n for n in model.graph.node if n.op_type == "Conv" and n.name != heads[0]]
    assert others and all(produced_by[n.input[1]].op_type == "DequantizeLinear" for n in others)

    for i in range(4):  # the int8 maps follow the float network's
        difference = np.abs(quantized.map(i) - plain.map(i))
        assert difference.mean() < 0.02, (i, difference.mean())

    mtime = built.stat().st_mtime_ns  # a new stage over the same data set reuses the file
    again = SaliencyMaps(int8_cfg, dataset, folder)
    assert again.network(64) == built and built.stat().st_mtime_ns == mtime


def test_the_later_passes_get_their_own_network_quantized_at_their_size(tmp_path):
    network = tiny_unet_onnx(tmp_path / "tiny.onnx", 64)
    images = _images()
    dataset = SimpleNamespace(ids=list("abcd"), source="x", load_image=lambda i: images[i])
    cfg = SimpleNamespace(weights=network, size=64, cache_dir=tmp_path, precision="int8")
    one = SaliencyMaps(cfg, dataset, saliency_folder(cfg, tmp_path, dataset))
    two = SaliencyMaps(cfg, dataset, saliency_folder(cfg, tmp_path, dataset, 2, 128), passes=2, first=one,
                       later_size=128)
    two.ensure([0, 1], 1, _quiet())
    assert two.folder.name.split("-")[1:4] == ["64", "int8", "p2x128"]
    for size in (64, 128):
        built = onnx.load(two.network(size))
        assert [d.dim_value for d in built.graph.input[0].type.tensor_type.shape.dim] == [1, 3, size, size]
        assert any(n.op_type == "QuantizeLinear" for n in built.graph.node)
    assert two.map(0).shape == (48, 64) and two.map(0).max() >= one.map(0).max()


def test_a_network_that_cannot_be_quantized_fails_with_one_line_naming_the_setting(tmp_path):
    from cpcx.errors import CpcxError
    from cpcx.saliency_int8 import quantized_network

    out = tmp_path / "net-64-int8-x.onnx"
    with pytest.raises(CpcxError, match=r"could not be quantized to int8 .*set pseudo\.saliency\.precision: float"):
        quantized_network(lambda: b"not a graph", lambda: [np.zeros((1, 3, 64, 64), np.float32)], out)
    assert not out.exists() and not list(tmp_path.iterdir())
