"""Every export format decodes back to what the session's masks say."""

from __future__ import annotations

import io
import json
import zipfile

import av
import numpy as np
import pytest
from conftest import label_png
from pycocotools import mask as coco_mask

from exports import DAVIS_PALETTE, rle_encode

N = 6


@pytest.fixture
def tracked(client, session_id):
    """Two objects tracked over the whole clip."""
    for body in ({"frame_idx": 0, "obj_id": 1, "points": [{"x": 45, "y": 55, "label": 1}]},
                 {"frame_idx": 0, "obj_id": 2, "box": [90, 60, 150, 110]}):
        assert client.post(f"/annotate-frame/{session_id}", json=body).status_code == 200
    r = client.post(f"/propagate/{session_id}", json={"start_frame": 0, "end_frame": 7})
    assert r.status_code == 200
    masks = {i: label_png(client.get(f"/mask/{session_id}/{i}").content) for i in range(8)}
    assert any(m.any() for m in masks.values())
    return session_id, masks


def _export(client, sid, fmt, **params):
    r = client.get(f"/export/{sid}", params={"format": fmt, **params})
    assert r.status_code == 200, r.text
    return r


def _decode_rgba(data: bytes, decoder: str | None = None) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if decoder is None:
            return [f.to_ndarray(format="rgba") for f in container.decode(stream)]
        ctx = av.codec.CodecContext.create(decoder, "r")
        frames = []
        for packet in container.demux(stream):
            frames += [f.to_ndarray(format="rgba") for f in ctx.decode(packet)]
        return frames


def test_coco_json_decodes_to_the_png_masks(client, tracked):
    sid, masks = tracked
    r = _export(client, sid, "coco_json", start_frame=1, end_frame=N, polygons="true")
    assert r.headers["content-type"] == "application/json"
    assert r.headers["content-disposition"].endswith('.json"')
    data = r.json()
    assert [img["frame_idx"] for img in data["images"]] == list(range(1, N + 1))
    assert {c["id"] for c in data["categories"]} == {1, 2}
    rebuilt = {i: np.zeros_like(masks[i]) for i in range(1, N + 1)}
    for ann in data["annotations"]:
        rle = ann["segmentation"]
        assert isinstance(rle["counts"], str)  # compressed RLE, as pycocotools writes it
        binary = coco_mask.decode(rle)
        assert ann["area"] == int(binary.sum()) == int(coco_mask.area(rle))
        rebuilt[ann["frame_idx"]][binary.astype(bool)] = ann["obj_id"]
        assert "object_score" in ann and "polygons" in ann
    for i in range(1, N + 1):
        assert np.array_equal(rebuilt[i], masks[i]), f"frame {i}"


def test_masks_zip_holds_the_png_masks(client, tracked):
    sid, masks = tracked
    r = _export(client, sid, "masks_zip")
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        assert sorted(n for n in names if n.endswith(".png")) == \
            [f"masks/{i:05d}.png" for i in range(8)]
        for i in range(8):
            assert np.array_equal(label_png(zf.read(f"masks/{i:05d}.png")), masks[i])
        assert {o["obj_id"] for o in json.loads(zf.read("objects.json"))} == {1, 2}


def test_cutout_webm_alpha_equals_mask(client, tracked):
    sid, masks = tracked
    r = _export(client, sid, "cutout_webm")
    assert r.headers["content-type"] == "video/webm"
    frames = _decode_rgba(r.content, decoder="libvpx-vp9")  # FFmpeg's vp9 drops alpha
    assert len(frames) == 8
    for i, rgba in enumerate(frames):
        assert np.array_equal(rgba[..., 3] > 127, masks[i] > 0), f"frame {i}"
        assert set(np.unique(rgba[..., 3])) <= {0, 255}


def test_cutout_mov_alpha_equals_mask(client, tracked):
    sid, masks = tracked
    r = _export(client, sid, "cutout_mov", start_frame=2, end_frame=4)
    assert r.headers["content-type"] == "video/quicktime"
    frames = _decode_rgba(r.content)
    assert len(frames) == 3
    for rgba, i in zip(frames, range(2, 5), strict=True):
        assert np.array_equal(rgba[..., 3] == 255, masks[i] > 0)
        assert np.array_equal(rgba[..., 3] == 0, masks[i] == 0)


@pytest.mark.parametrize("fmt", ["mask_mp4", "mask_bw_mp4", "overlay_mp4"])
def test_mp4_exports_keep_size_rate_and_range(client, tracked, fmt):
    sid, masks = tracked
    r = _export(client, sid, fmt, start_frame=3)
    assert r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 24
    assert len(frames) == 5 and frames[0].shape == (120, 160, 3)
    if fmt == "mask_bw_mp4":
        for rgb, i in zip(frames, range(3, 8), strict=True):
            white = rgb.mean(axis=2) > 127
            # H.264 is lossy at the edges; the interior agrees.
            assert (white != (masks[i] > 0)).mean() < 0.05


def test_export_job_and_download(client, tracked):
    sid, masks = tracked
    r = client.post(f"/export/{sid}", json={"format": "masks_zip", "end_frame": 2})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    with client.stream("GET", f"/jobs/{job_id}/events") as events:
        lines = [line for line in events.iter_lines() if line.startswith("data:")]
    final = json.loads(lines[-1][5:])
    assert final["status"] == "succeeded" and final["total"] == 3
    url = final["result"]["download_url"]
    got = client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".png")]) == 3
    assert client.get(f"/exports/{sid}/nope.zip").status_code == 404
    assert client.get(f"/exports/{sid}/..%2F..%2Fsession.json").status_code == 404


def test_export_errors(client, session_id, tracked):
    sid, _ = tracked
    assert client.get(f"/export/{sid}", params={"format": "gif"}).status_code == 422
    r = client.get(f"/export/{sid}", params={"start_frame": 5, "end_frame": 2})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert client.get(f"/export/{sid}", params={"start_frame": 99}).status_code == 422


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (4, 4), (720, 1280)]:
        for density in (0.0, 0.5, 1.0):
            binary = rng.random(shape) < density
            rle = rle_encode(binary)
            assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
            assert np.array_equal(coco_mask.decode(json.loads(json.dumps(rle))).astype(bool),
                                  binary)


def test_palette_zip_keeps_pixel_equal_obj_id(client, tracked):
    from PIL import Image

    sid, masks = tracked
    r = _export(client, sid, "masks_palette_zip", start_frame=0, end_frame=7)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(n for n in zf.namelist() if n.endswith(".png")) == \
            [f"masks/{i:05d}.png" for i in range(8)]
        for i in range(8):
            img = Image.open(io.BytesIO(zf.read(f"masks/{i:05d}.png")))
            assert img.mode == "P"
            assert img.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # DAVIS colours
            assert np.array_equal(np.array(img), masks[i]), i  # PIL reads the ids back
    assert DAVIS_PALETTE[3 * 3:3 * 4] == [128, 128, 0]
