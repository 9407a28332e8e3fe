"""Export formats: overlay/mask videos, alpha cut-outs, PNG mask ZIPs (grey and DAVIS palette)
and COCO JSON with compressed RLE."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

import masks as mask_ops
from video_io import atomic_write_bytes, encode_mp4, encode_video


@dataclass(frozen=True)
class ExportFormat:
    name: str
    extension: str
    media_type: str
    description: str


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("overlay_mp4", "mp4", "video/mp4",
                 "The video with every object's mask in its colour (H.264, plays in browsers)"),
    ExportFormat("mask_mp4", "mp4", "video/mp4",
                 "Masks only, each object in its colour on black (H.264)"),
    ExportFormat("mask_bw_mp4", "mp4", "video/mp4",
                 "Masks only, white (any object) on black (H.264)"),
    ExportFormat("cutout_webm", "webm", "video/webm",
                 "The objects cut out, background transparent (VP9 with alpha, lossless)"),
    ExportFormat("cutout_mov", "mov", "video/quicktime",
                 "The objects cut out, background transparent (ProRes 4444 with alpha)"),
    ExportFormat("masks_zip", "zip", "application/zip",
                 "One 8-bit grey PNG per frame with a mask: pixel = obj_id, 0 = background "
                 "(what OpenCV reads)"),
    ExportFormat("masks_palette_zip", "zip", "application/zip",
                 "One indexed PNG per frame with the DAVIS palette (DAVIS / YouTube-VOS "
                 "convention): index = obj_id, visible in any viewer, ids read by PIL"),
    ExportFormat("coco_json", "json", "application/json",
                 "COCO annotations: one image per frame, compressed RLE per object "
                 "(pycocotools)"),
)}


@dataclass
class ExportSource:
    """What an export reads: frames, label maps and facts of one session, over a frame range."""

    first: int
    last: int
    width: int
    height: int
    fps: Fraction
    mask_frames: set[int]
    frame_rgb: Callable[[int], np.ndarray]
    overlay_rgb: Callable[[int], np.ndarray]
    label_map: Callable[[int], np.ndarray]
    objects: dict[int, dict]
    scores: dict[int, dict[int, dict]]
    report: Callable[[int, int, int], None]

    @property
    def frames(self) -> range:
        return range(self.first, self.last + 1)

    def labels_or_empty(self, frame_idx: int) -> np.ndarray:
        if frame_idx in self.mask_frames:
            return self.label_map(frame_idx)
        return np.zeros((self.height, self.width), np.uint8)

    def each(self, make: Callable[[int], object]) -> Iterator:
        total = len(self.frames)
        for i, frame_idx in enumerate(self.frames):
            yield make(frame_idx)
            self.report(frame_idx, i + 1, total)


def write_export(fmt: str, out: Path, src: ExportSource, polygons: bool = False) -> Path:
    """Write the export ``fmt`` of ``src`` to ``out`` (atomically); return ``out``."""
    size = (src.fps, src.width, src.height)
    if fmt == "overlay_mp4":
        encode_mp4(out, src.each(lambda f: src.overlay_rgb(f) if f in src.mask_frames
                                 else src.frame_rgb(f)), *size)
    elif fmt == "mask_mp4":
        encode_mp4(out, src.each(lambda f: mask_ops.PALETTE[src.labels_or_empty(f)]), *size)
    elif fmt == "mask_bw_mp4":
        encode_mp4(out, src.each(lambda f: np.repeat(
            ((src.labels_or_empty(f) > 0) * 255).astype(np.uint8)[..., None], 3, axis=2)), *size)
    elif fmt in ("cutout_webm", "cutout_mov"):
        def rgba(f: int) -> np.ndarray:
            alpha = ((src.labels_or_empty(f) > 0) * 255).astype(np.uint8)
            return np.dstack([src.frame_rgb(f), alpha])

        if fmt == "cutout_webm":
            # lossless keeps the alpha plane equal to the mask; VP9 takes odd sizes.
            encode_video(out, src.each(rgba), *size, codec="libvpx-vp9", pix_fmt="yuva420p",
                         options={"lossless": "1", "row-mt": "1", "deadline": "realtime",
                                  "cpu-used": "8"}, even_size=False)
        else:
            encode_video(out, src.each(rgba), *size, codec="prores_ks",
                         pix_fmt="yuva444p10le", options={"profile": "4444"}, even_size=False)
    elif fmt == "masks_zip":
        _write_zip(out, src, palette=False)
    elif fmt == "masks_palette_zip":
        _write_zip(out, src, palette=True)
    elif fmt == "coco_json":
        data = coco(src, polygons)
        atomic_write_bytes(out, json.dumps(data, separators=(",", ":")).encode())
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return out


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.{threading.get_ident()}.tmp")


def davis_palette() -> list[int]:
    """The palette of DAVIS and YouTube-VOS annotations (Pascal VOC's): index i's colour is
    made from the bits of i, spread over the high bits of red, green and blue."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        palette += [r, g, b]
    return palette


DAVIS_PALETTE = davis_palette()


def _palette_png(labels: np.ndarray) -> bytes:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(DAVIS_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_zip(out: Path, src: ExportSource, palette: bool) -> None:
    """Grey label maps of the frames with masks, or (``palette``) indexed PNGs of every frame
    in the range, empty ones included, as DAVIS numbers its annotations."""
    tmp = _tmp(out)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            # PNGs are already compressed.
            def add(frame_idx: int) -> None:
                if palette:
                    data = _palette_png(src.labels_or_empty(frame_idx))
                elif frame_idx in src.mask_frames:
                    data = cv2.imencode(".png", src.label_map(frame_idx))[1].tobytes()
                else:
                    return
                zf.writestr(f"masks/{frame_idx:05d}.png", data)

            for _ in src.each(add):
                pass
            zf.writestr("objects.json", json.dumps(
                [{"obj_id": oid, "color": obj["color"]} for oid, obj in sorted(src.objects.items())]))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def rle_encode(binary: np.ndarray) -> dict:
    """COCO compressed RLE of a binary mask, as pycocotools writes it (``counts`` a string)."""
    rle = coco_mask.encode(np.asfortranarray(binary, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco(src: ExportSource, polygons: bool = False) -> dict:
    images, annotations = [], []
    ann_id = 0

    def add(frame_idx: int) -> None:
        nonlocal ann_id
        images.append({"id": frame_idx + 1, "frame_idx": frame_idx,
                       "file_name": f"frames/{frame_idx:05d}.jpg",
                       "width": src.width, "height": src.height})
        if frame_idx not in src.mask_frames:
            return
        labels = src.label_map(frame_idx)
        for obj_id, area in mask_ops.areas(labels).items():
            binary = labels == obj_id
            ys, xs = np.nonzero(binary)
            x0, y0 = int(xs.min()), int(ys.min())
            ann_id += 1
            ann = {"id": ann_id, "image_id": frame_idx + 1, "category_id": obj_id,
                   "obj_id": obj_id, "frame_idx": frame_idx, "iscrowd": 0, "area": area,
                   "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                   "segmentation": rle_encode(binary)}
            score = src.scores.get(frame_idx, {}).get(obj_id)
            if score:
                ann["object_score"] = score.get("object_score")
                ann["predicted_iou"] = score.get("iou")
            if polygons:
                contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_SIMPLE)
                ann["polygons"] = [c.reshape(-1).astype(float).tolist() for c in contours
                                   if len(c) >= 3]
            annotations.append(ann)

    for _ in src.each(add):
        pass
    return {
        "info": {"description": "SAM 2 video segmentation export", "fps": float(src.fps),
                 "frame_range": [src.first, src.last]},
        "images": images,
        "categories": [{"id": oid, "name": f"object {oid}", "color": obj["color"]}
                       for oid, obj in sorted(src.objects.items())],
        "annotations": annotations,
    }
