"""Turning per-object mask logits into label maps, label maps into coloured overlays, and
client mask images into arrays (checked from their header before they are decoded)."""

from __future__ import annotations

import colorsys
import io
import warnings

import cv2
import numpy as np
import torch
from PIL import Image

OVERLAY_ALPHA = 0.5


def _make_palette() -> np.ndarray:
    # Distinct, stable colours: golden-ratio hue steps; id 0 (background) is black.
    palette = np.zeros((256, 3), dtype=np.uint8)
    for obj_id in range(1, 256):
        h = ((obj_id - 1) * 0.618033988749895 + 0.02) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
        palette[obj_id] = (int(r * 255), int(g * 255), int(b * 255))
    return palette


PALETTE = _make_palette()


def color_of(obj_id: int) -> str:
    r, g, b = PALETTE[obj_id]
    return f"#{r:02x}{g:02x}{b:02x}"


def label_map(video_res_masks: torch.Tensor, obj_ids: list[int]) -> np.ndarray:
    """Per-object logits (N,1,H,W) -> uint8 HxW, pixel = obj_id where its logit is > 0 and highest."""
    logits = video_res_masks[:, 0]
    if len(obj_ids) == 1:
        return ((logits[0] > 0).to(torch.uint8) * obj_ids[0]).cpu().numpy()
    best_val, best_idx = logits.max(dim=0)
    ids = torch.tensor(obj_ids, dtype=torch.uint8, device=logits.device)
    labels = torch.where(best_val > 0, ids[best_idx], torch.zeros((), dtype=torch.uint8,
                                                                  device=logits.device))
    return labels.cpu().numpy()


def areas(labels: np.ndarray, obj_ids: list[int] | None = None) -> dict[int, int]:
    """Pixels per obj_id. With one object a count of the non-zero pixels does (40x faster than
    a histogram); else OpenCV's histogram (3x faster than numpy's bincount)."""
    if obj_ids is not None and len(obj_ids) == 1:
        count = int(np.count_nonzero(labels))
        return {int(obj_ids[0]): count} if count else {}
    counts = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256]).ravel()
    return {int(i): int(counts[i]) for i in np.flatnonzero(counts[1:]) + 1}


_PALETTE_LUT = PALETTE.reshape(256, 1, 3)


def overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Blend each object's colour over the frame and outline it (OpenCV: ~5 ms at 1080p)."""
    if not labels.any():
        return rgb
    colours = cv2.LUT(cv2.merge([labels, labels, labels]), _PALETTE_LUT)
    blended = cv2.addWeighted(rgb, 1 - OVERLAY_ALPHA, colours, OVERLAY_ALPHA, 0)
    out = rgb.copy()
    cv2.copyTo(blended, (labels > 0).view(np.uint8), out)
    kernel = np.ones((3, 3), np.uint8)
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, kernel)
    edge_colours = cv2.LUT(cv2.merge([cv2.dilate(labels, kernel)] * 3), _PALETTE_LUT)
    cv2.copyTo(edge_colours, (edges > 0).view(np.uint8), out)
    return out


def decode_mask_image(raw: bytes, width: int, height: int) -> np.ndarray:
    """A client's mask image as grey pixels (non-zero = object).

    Its size is read from the header first and must be the video's: a small file that announces
    a huge picture is refused before any pixel is decoded. Raises ValueError with what is wrong.
    """
    if not raw:
        raise ValueError("the mask image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                size = img.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the mask image is far larger than the {width}x{height} video") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError("the mask is not a readable image (PNG, JPEG, BMP, WebP, TIFF)") from exc
    if size != (width, height):
        raise ValueError(f"the mask image is {size[0]}x{size[1]}; it must be the video's size, "
                         f"{width}x{height}")
    try:
        mask = cv2.imdecode(np.frombuffer(raw, np.uint8),
                            cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        mask = None
    if mask is None or mask.shape != (height, width):
        raise ValueError("the mask image cannot be decoded (PNG, JPEG, BMP, WebP, TIFF)")
    return mask
