"""Pillow's bicubic ``Image.resize`` redone with integer torch operations, bit for bit.

sam2 resizes each frame with PIL before the model sees it, so a server that wants Meta's masks
to the pixel must feed the model PIL's very bytes. PIL does this on the host: about 20 ms of CPU
per 1080p frame at the model's 1024 input, host work that a GPU can end up waiting for. Pillow's resampling is
integer arithmetic once its filter weights are known: per output sample, a sum of 8-bit inputs
times 22-bit fixed-point weights, shifted and clipped, first along x and then along y (with the
intermediate rounded to 8 bits). The weights are computed here in Python floats with Pillow's
formulas and order of operations (IEEE doubles, as Pillow's C); the sums are then exact on any
device, so the result is PIL's, pixel for pixel (``tests/test_frame_resize.py`` checks it
against the installed Pillow on random images and sizes).
"""

from __future__ import annotations

import functools
import math

import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
BICUBIC_SUPPORT = 2.0


def _bicubic(x: float) -> float:
    # Pillow's cubic convolution kernel with a = -0.5, written in its order of operations.
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def axis_weights(in_size: int, out_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """For each output sample along one axis: the input indices it reads and their fixed-point
    weights (Pillow's ``precompute_coeffs`` then ``normalize_coeffs_8bpc``), padded to one
    length with weight 0 on the last index."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    indices, weights = [], []
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int(): C's truncation toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_bicubic((x + xmin - center + 0.5) * inv) for x in range(xmax)]
        total = 0.0
        for v in w:  # summed in order, as Pillow does (not pairwise)
            total += v
        if total != 0.0:
            w = [v / total for v in w]
        fixed = [int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0
                 else int(0.5 + v * (1 << PRECISION_BITS)) for v in w]
        pad = ksize - len(fixed)
        indices.append([xmin + x for x in range(len(fixed))] + [min(xmin, in_size - 1)] * pad)
        weights.append(fixed + [0] * pad)
    return indices, weights


@functools.lru_cache(maxsize=32)
def _axis_tensors(in_size: int, out_size: int, device: torch.device):
    indices, weights = axis_weights(in_size, out_size)
    idx = torch.tensor(indices, dtype=torch.long, device=device)
    w = torch.tensor(weights, dtype=torch.int32, device=device)
    return idx.t().contiguous(), w.t().contiguous()  # (taps, out)


def _resample_last_axis(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass along the last axis of an int32 tensor of 8-bit values; 8-bit values out."""
    idx, w = _axis_tensors(x.shape[-1], out_size, x.device)
    acc = torch.full((*x.shape[:-1], out_size), 1 << (PRECISION_BITS - 1), dtype=torch.int32,
                     device=x.device)
    for tap in range(idx.shape[0]):  # a tap at a time: memory stays one image, not ksize
        acc += x[..., idx[tap]] * w[tap]
    # Pillow's clip8: an arithmetic shift (floor for negative sums), then clamp to 0..255.
    return torch.bitwise_right_shift(acc, PRECISION_BITS).clamp_(0, 255)


def resize_like_pil(hwc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``Image.fromarray(hwc).resize(size)`` (bicubic) for an HxWx3 uint8 tensor, on its device.

    Returns CxH'xW' int32 holding the 8-bit values (``size`` is (width, height) as in PIL).
    A pass whose size does not change is skipped, as Pillow skips it.
    """
    out_w, out_h = size
    x = hwc.permute(2, 0, 1).to(torch.int32)  # C, H, W
    if out_w != x.shape[2]:
        x = _resample_last_axis(x, out_w)
    if out_h != x.shape[1]:
        x = _resample_last_axis(x.transpose(1, 2), out_h).transpose(1, 2)
    return x
