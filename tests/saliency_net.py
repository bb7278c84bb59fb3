"""A stand-in salient-object network in ONNX for the tests of ``pseudo.saliency`` and ``segment.saliency``:
foreground 1 on the left half of its input, 0 on the right (ISNet itself, 88 MB, is not built by make test)."""
from __future__ import annotations

import torch


class LeftHalf(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return (self.mask + 0 * x[:, :1]).clamp(0, 1)  # uses the input, so the graph keeps its shape


def left_half_onnx(path, size: int):
    torch.onnx.export(LeftHalf(size), torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False)
    return path
