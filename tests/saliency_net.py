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


class Brighter(torch.nn.Module):
    """Foreground where the input is brighter than its own mean: it follows the image, so a pass on an image with
    its bright part painted over finds the next brightest part (``cpcx.saliency.erase``)."""

    def forward(self, x):
        grey = x.mean(1, keepdim=True)
        return (grey > grey.mean((2, 3), keepdim=True)).float()


def brighter_onnx(path, size: int):
    torch.onnx.export(Brighter(), torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False)
    return path


class TinyUNet(torch.nn.Module):
    """ISNet's shape in miniature: pooled with ceil_mode, upsampled back with ``F.interpolate(size=skip.shape[2:])``,
    which the exporter traces as a constant target size, so the graph's input size is fixed as ISNet's is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.inner = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 1, 1)

    def forward(self, x):
        skip = torch.relu(self.down(x))
        inner = torch.relu(self.inner(torch.nn.functional.max_pool2d(skip, 2, ceil_mode=True)))
        up = torch.nn.functional.interpolate(inner, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(torch.cat([up, skip], 1)))


def tiny_unet_onnx(path, size: int):
    torch.onnx.export(TinyUNet(), torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False)
    return path
