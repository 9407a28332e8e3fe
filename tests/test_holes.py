"""Small-hole filling without ``sam2._C``: ``predictor.fill_small_holes`` and TrackingPredictor.

Meta's ``fill_holes_in_mask_scores`` labels the background (logit <= 0) with an 8-connected
CUDA kernel and sets every background component of at most ``max_area`` pixels to 0.1. The
tests compare with a plain-Python labelling written here, independent of OpenCV.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, MODEL_CFG, build_reference_predictor
from media import frame_rgb

from predictor import build_predictor, fill_small_holes

HOLE_AREA = 8
FILL = torch.tensor(0.1, dtype=torch.float32).item()  # what 0.1 becomes in a float32 tensor


# ----------------------------------------------------------------------------- reference
def components_8(bg: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of the True pixels, by flood fill."""
    h, w = bg.shape
    seen = np.zeros_like(bg, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if not bg[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            stack, comp = [(y, x)], []
            while stack:
                cy, cx = stack.pop()
                comp.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and bg[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            comps.append(comp)
    return comps


def hole_mask(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Bool tensor shaped like ``logits``: background components of <= max_area pixels."""
    bg = (logits <= 0).cpu().numpy()
    out = np.zeros(bg.shape, dtype=bool)
    for idx in np.ndindex(bg.shape[:-2]):
        for comp in components_8(bg[idx]):
            if len(comp) <= max_area:
                ys, xs = zip(*comp, strict=True)
                out[idx][list(ys), list(xs)] = True
    return torch.from_numpy(out)


def reference_fill(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """What sam2's fill_holes_in_mask_scores does with a working CUDA kernel."""
    return torch.where(hole_mask(logits, max_area).to(logits.device), 0.1, logits)


def blob(h: int = 24, w: int = 24) -> torch.Tensor:
    """(1,1,h,w) logits: -5 background, a +4 square at rows/cols 4..19."""
    t = torch.full((1, 1, h, w), -5.0)
    t[..., 4:20, 4:20] = 4.0
    return t


# ----------------------------------------------------------------------------- unit tests
def test_small_hole_filled_large_hole_and_background_kept():
    logits = blob()
    logits[..., 7:9, 7:9] = -2.0      # 4 px hole
    logits[..., 12:16, 12:16] = -3.0  # 16 px hole
    original = logits.clone()
    out = fill_small_holes(logits, HOLE_AREA)
    assert torch.equal(logits, original), "the input was modified"
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert (out[..., 7:9, 7:9] == FILL).all()
    assert torch.equal(out[..., 12:16, 12:16], original[..., 12:16, 12:16])
    untouched = torch.ones_like(logits, dtype=torch.bool)
    untouched[..., 7:9, 7:9] = False
    assert torch.equal(out[untouched], original[untouched])  # foreground and background
    assert torch.equal(out, reference_fill(logits, HOLE_AREA))


def test_area_limit_is_inclusive():
    logits = blob()
    logits[..., 6, 6:14] = -1.0   # 8 px: filled at max_area 8
    logits[..., 10, 6:15] = -1.0  # 9 px: kept
    out = fill_small_holes(logits, 8)
    assert (out[..., 6, 6:14] == FILL).all()
    assert (out[..., 10, 6:15] == -1.0).all()


def test_zero_logit_is_background():
    logits = blob()
    logits[..., 9, 9] = 0.0
    out = fill_small_holes(logits, HOLE_AREA)
    assert out[..., 9, 9].item() == FILL


def test_diagonal_neighbours_are_one_component():
    """8-connectivity, like sam2's kernel: two diagonal 1 px holes make one 2 px component."""
    logits = blob()
    logits[..., 8, 8] = -1.0
    logits[..., 9, 9] = -1.0
    assert torch.equal(fill_small_holes(logits, 1), logits)
    out = fill_small_holes(logits, 2)
    assert out[..., 8, 8].item() == FILL and out[..., 9, 9].item() == FILL


def test_small_background_region_at_the_border_counts_as_a_hole():
    """sam2 fills any background component up to max_area, enclosed or not."""
    logits = torch.full((1, 1, 16, 16), 3.0)
    logits[..., 0:2, 0:2] = -1.0  # 4 px in the corner
    out = fill_small_holes(logits, HOLE_AREA)
    assert (out[..., 0:2, 0:2] == FILL).all()


def test_no_holes_leaves_logits_unchanged():
    logits = blob()
    out = fill_small_holes(logits, HOLE_AREA)
    assert torch.equal(out, logits)
    all_fg = torch.full((2, 1, 8, 8), 1.5)
    assert torch.equal(fill_small_holes(all_fg, HOLE_AREA), all_fg)


def test_batch_items_are_filled_independently():
    b0 = blob()
    b0[..., 7:9, 7:9] = -2.0  # 4 px hole
    b1 = blob()               # no hole
    b2 = blob()
    b2[..., 10:13, 10:14] = -1.0  # 12 px hole: kept at 8, filled at 12
    logits = torch.cat([b0, b1, b2])  # (3,1,H,W)
    out = fill_small_holes(logits, HOLE_AREA)
    assert out.shape == (3, 1, 24, 24)
    assert (out[0, :, 7:9, 7:9] == FILL).all()
    assert torch.equal(out[1], b1[0])
    assert torch.equal(out[2], b2[0])
    for i in range(3):
        assert torch.equal(out[i:i + 1], fill_small_holes(logits[i:i + 1], HOLE_AREA))
    out12 = fill_small_holes(logits, 12)
    assert (out12[2, :, 10:13, 10:14] == FILL).all()
    assert (out12[0, :, 7:9, 7:9] == FILL).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_logits_keep_their_dtype(dtype):
    logits = blob().to(dtype)
    logits[..., 7:9, 7:9] = -2.0
    out = fill_small_holes(logits, HOLE_AREA)
    assert out.dtype == dtype
    assert torch.equal(out, reference_fill(logits, HOLE_AREA))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_area", [1, 3, 8, 40])
def test_matches_reference_labelling_on_random_logits(seed, max_area):
    g = torch.Generator().manual_seed(seed)
    # Smooth random fields: many components of many sizes, in a batch with a second dim.
    coarse = torch.randn((2, 3, 1, 8, 8), generator=g)
    logits = F.interpolate(coarse.flatten(0, 1), size=(40, 40), mode="bilinear",
                           align_corners=False).reshape(2, 3, 1, 40, 40)
    logits = logits + 0.3 * torch.randn(logits.shape, generator=g)
    expected = reference_fill(logits, max_area)
    out = fill_small_holes(logits, max_area)
    assert torch.equal(out, expected)
    assert hole_mask(logits, max_area).any()  # the case is not vacuous


# ----------------------------------------------------------------------------- the predictor
@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hole_frames")
    for i in range(8):
        cv2.imwrite(str(d / f"{i:05d}.jpg"), frame_rgb(i, 160, 120)[..., ::-1])
    return d


@pytest.fixture(scope="module")
def filling_predictor(checkpoint):
    """The server's TrackingPredictor with hole filling on."""
    return build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, HOLE_AREA)


@pytest.fixture(scope="module")
def stock_filling_predictor(checkpoint):
    """Meta's predictor with fill_hole_area on (its kernel is replaced in the test using it)."""
    predictor = build_reference_predictor(checkpoint)
    predictor.fill_hole_area = HOLE_AREA
    return predictor


def _lowres(state, obj_idx: int, frame_idx: int, temp: bool = False) -> torch.Tensor:
    per_obj = state["temp_output_dict_per_obj" if temp else "output_dict_per_obj"][obj_idx]
    out = per_obj["cond_frame_outputs"].get(frame_idx)
    if out is None:
        out = per_obj["non_cond_frame_outputs"].get(frame_idx)
    return out["pred_masks"]


def test_tracking_predictor_differs_from_reference_only_at_holes(
        filling_predictor, reference_predictor, frames_dir):
    """One prompt: the filled output is the reference's with its small holes set to 0.1."""
    points, labels = [[45, 55]], [1]
    ref_state = reference_predictor.init_state(str(frames_dir))
    _, _, ref_video = reference_predictor.add_new_points_or_box(ref_state, 0, 1, points=points,
                                                                labels=labels)
    state = filling_predictor.init_state(str(frames_dir))
    _, _, video = filling_predictor.add_new_points_or_box(state, 0, 1, points=points,
                                                          labels=labels)
    ref_low = _lowres(ref_state, 0, 0, temp=True)
    low = _lowres(state, 0, 0, temp=True)
    holes = hole_mask(ref_low, HOLE_AREA)
    assert holes.any(), "this prompt was chosen because its mask has small holes"

    differs = low != ref_low
    assert differs.any()
    assert not (differs & ~holes).any(), "changed pixels outside the holes"
    assert (low[holes] == FILL).all()
    assert torch.equal(low, torch.where(holes, 0.1, ref_low))
    # The video-resolution output is the filled low-res mask upsampled as sam2 does it.
    expected_video = F.interpolate(low, size=ref_video.shape[-2:], mode="bilinear",
                                   align_corners=False)
    assert torch.equal(video, expected_video)
    assert not torch.equal(video, ref_video)
    # Outside the upsampling footprint of the holes the video-res output is the reference's.
    near_holes = F.interpolate(holes.float(), size=ref_video.shape[-2:], mode="bilinear",
                               align_corners=False) > 0
    near_holes = F.max_pool2d(near_holes.float(), 5, stride=1, padding=2) > 0
    assert torch.equal(video[~near_holes], ref_video[~near_holes])


def test_tracking_predictor_equals_stock_predictor_with_working_kernel(
        filling_predictor, stock_filling_predictor, frames_dir, monkeypatch):
    """Through a propagation, TrackingPredictor fills where and when Meta's predictor does.

    The stock predictor's ``fill_holes_in_mask_scores`` (which needs ``sam2._C``) is replaced by
    the plain-Python reference; everything else is Meta's code path.
    """
    import sam2.sam2_video_predictor as vp

    calls = {"n": 0, "with_holes": 0}

    def kernel(mask, max_area):
        calls["n"] += 1
        if hole_mask(mask, max_area).any():
            calls["with_holes"] += 1
        return reference_fill(mask, max_area)

    monkeypatch.setattr(vp, "fill_holes_in_mask_scores", kernel)
    points, labels = [[45, 55], [60, 65]], [1, 1]
    n = 8

    ref_state = stock_filling_predictor.init_state(str(frames_dir))
    _, _, ref0 = stock_filling_predictor.add_new_points_or_box(ref_state, 0, 1, points=points,
                                                               labels=labels)
    ref_frames = {f: m for f, _, m in stock_filling_predictor.propagate_in_video(
        ref_state, start_frame_idx=0, max_frame_num_to_track=n - 1)}
    stock_calls = calls["n"]

    state = filling_predictor.init_state(str(frames_dir))
    _, _, out0 = filling_predictor.add_new_points_or_box(state, 0, 1, points=points,
                                                         labels=labels)
    frames = {f: m for f, _, m in filling_predictor.propagate_in_video(
        state, start_frame_idx=0, max_frame_num_to_track=n - 1)}
    assert calls["n"] == stock_calls, "TrackingPredictor must not use sam2's fill path"

    assert stock_calls == n  # the prompt plus every tracked frame after it
    assert calls["with_holes"] >= 2, "the comparison should involve real holes"
    assert torch.equal(out0, ref0)
    assert sorted(frames) == sorted(ref_frames) == list(range(n))
    for f in range(n):
        assert torch.equal(frames[f], ref_frames[f]), f"frame {f} differs"
        low = _lowres(state, 0, f)
        assert torch.equal(low, _lowres(ref_state, 0, f)), f"stored low-res mask of frame {f}"
        assert not hole_mask(low, HOLE_AREA).any(), f"frame {f} still has small holes"


def test_hole_area_zero_is_the_plain_predictor(predictor, reference_predictor, frames_dir):
    """The session-wide predictor (fill_hole_area=0) leaves the reference's holes alone."""
    points, labels = [[45, 55]], [1]
    assert predictor.hole_area == 0
    ref_state = reference_predictor.init_state(str(frames_dir))
    _, _, ref_video = reference_predictor.add_new_points_or_box(ref_state, 0, 1, points=points,
                                                                labels=labels)
    state = predictor.init_state(str(frames_dir))
    _, _, video = predictor.add_new_points_or_box(state, 0, 1, points=points, labels=labels)
    assert hole_mask(_lowres(ref_state, 0, 0, temp=True), HOLE_AREA).any()
    assert torch.equal(video, ref_video)
