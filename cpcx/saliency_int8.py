"""The saliency network quantized to 8-bit integers (``pseudo.saliency.precision: int8``).

ISNet at 1024² costs about 3.4 s an image on one CPU core; quantized (static, per output channel, activations
calibrated on a few of the images it will map) it runs in about 1.1 s where the CPU has 8-bit dot products (AVX-512
VNNI), and its maps differ from the float network's by 0.003 on average (docs/results.md 8q). Two choices keep them
that close:

- the activations' ranges come from a high percentile of what the calibration images give (99.99 %), not from their
  extremes: with min/max ranges a few outliers spread the 256 levels so thin that half the foreground flips;
- the convolutions that produce one channel (ISNet's saliency heads) stay in floating point: their output is the map.

The quantized graph depends on the calibration images, so it is built once per data set and size, kept as an ONNX file
beside that data set's maps (``quantized_network``), and named into the maps' folder (``-int8``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cpcx.errors import CpcxError

#: Images the activations' ranges are calibrated on, the data set's first (8 gave the float labels within 0.1; fewer
#: and more were not tried).
CALIBRATION_IMAGES = 8
#: Percentile of the activations that bounds each tensor's range.
CALIBRATION_PERCENTILE = 99.99


def float_graph(graph: bytes) -> bytes:
    """The graph with every float16 tensor, constant and cast made float32 (ISNet ships in float16, which the
    quantizer cannot calibrate; onnxruntime runs it in float32 on a CPU all the same, at the same speed)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load_from_string(graph)
    nodes = model.graph

    def widened(tensor):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for tensor in nodes.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(widened(tensor))
    for node in nodes.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
            if node.op_type == "Constant" and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(widened(attribute.t))
    for value in [*nodes.value_info, *nodes.input, *nodes.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model.SerializeToString()


def single_channel_convs(graph: bytes) -> list[str]:
    """Names of the Conv nodes with one output channel: the saliency heads, kept in floating point."""
    import onnx

    model = onnx.load_from_string(graph)
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 1 and shapes.get(node.input[1], (0,))[0] == 1]


def quantize(graph: bytes, inputs: Sequence[np.ndarray], out: Path, advance: Callable[[int], None] = lambda n: None
             ) -> None:
    """Write to ``out`` (atomically) the float ``graph`` quantized to int8: QDQ, weights per output channel,
    activations uint8 with ranges from ``inputs`` (network inputs, 1×3×size×size) at ``CALIBRATION_PERCENTILE``;
    ``advance(1)`` as each input is done (about 14 s each for ISNet at 1024² on one core)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cpcx import atomic

    class Reader(CalibrationDataReader):
        """The inputs, served one range at a time (``CalibStridedMinMax``: the calibrator keeps every intermediate
        tensor of the images of one range, over 20 GB for 8 images of ISNet at 1024², so it sees one image at a
        time and merges their histograms)."""

        def __init__(self, name: str):
            self.name, self.items = name, iter(())

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            if start_index:
                advance(1)
            self.items = iter([{self.name: x} for x in inputs[start_index:end_index]])

        def get_next(self):
            return next(self.items, None)

    import onnx

    name = onnx.load_from_string(graph).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="cpcx-int8-") as tmp:
        source, prepared, quantized = Path(tmp) / "float.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=single_channel_convs(graph),
                        extra_options={"CalibPercentile": CALIBRATION_PERCENTILE, "CalibStridedMinMax": 1})
        atomic.write_bytes(out, quantized.read_bytes())
    advance(1)


def quantized_network(graph: Callable[[], bytes], inputs: Callable[[], Sequence[np.ndarray]], out: Path,
                      console=None) -> Path:
    """``out``, quantized from ``graph()`` (the network at its size) on ``inputs()`` when it is not there yet."""
    if not out.is_file():
        from rich.console import Console

        from cpcx.pseudo.labelling import with_progress

        console = console or Console(quiet=True)
        images = inputs()
        console.print(f"saliency: quantizing the network to int8, calibrated on {len(images)} images → {out}")
        try:
            with_progress(console, len(images), lambda advance: quantize(float_graph(graph()), images, out, advance),
                          label="int8 calibration")
        except CpcxError:
            raise
        except Exception as exc:  # onnx / onnxruntime raise their own types for a graph they cannot take
            raise CpcxError(f"{out.name}: the saliency network could not be quantized to int8 ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); set "
                            "pseudo.saliency.precision: float") from None
    return out
