"""Hiera's windows without the padded rows: the image encoder's output stays sam2's, to the bit."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import IMAGE_SIZE, MODEL_CFG, build_reference_predictor
from sam2.build_sam import build_sam2_video_predictor

import window_attention
from predictor import build_predictor
from window_attention import PaddingFreeBlock, padded_blocks, skip_window_padding


def _encoders_equal(ours, stock, size: int, images: int = 2) -> bool:
    gen = torch.Generator().manual_seed(size)
    with torch.inference_mode():
        for _ in range(images):
            image = torch.randn(1, 3, size, size, generator=gen)
            a, b = ours.image_encoder(image), stock.image_encoder(image)
            if not all(torch.equal(x, y) for x, y in zip(a["backbone_fpn"], b["backbone_fpn"],
                                                          strict=True)):
                return False
            if not torch.equal(a["vision_features"], b["vision_features"]):
                return False
    return True


def _spy_short_path(monkeypatch) -> list[tuple]:
    shapes = []
    short = PaddingFreeBlock.forward_without_padding

    def spy(self, x):
        shapes.append(tuple(x.shape))
        return short(self, x)

    monkeypatch.setattr(PaddingFreeBlock, "forward_without_padding", spy)
    return shapes


def test_server_predictor_skips_the_padding_and_its_encoder_is_sam2s(predictor,
                                                                     reference_predictor,
                                                                     monkeypatch):
    """At 256, hiera-tiny's 14- and 7-token windows overrun the 16x16 and 8x8 maps: 784 rows
    for 256 tokens. The server's predictor projects only the real rows, and every output of
    the image encoder equals stock sam2's on the same image."""
    assert predictor.window_padding == "skip", "this machine's kernels should give sam2's rows"
    shapes = _spy_short_path(monkeypatch)
    assert _encoders_equal(predictor, reference_predictor, IMAGE_SIZE)
    # Four windowed blocks over 16x16 (one pooling to 8x8), one over 8x8, on each image.
    assert sorted(set(shapes)) == [(1, 8, 8, 768), (1, 16, 16, 384)]
    assert len(shapes) == 2 * 5


@pytest.mark.parametrize("size", [320, 512])
def test_other_image_sizes_give_sam2s_encoder_output(checkpoint, size, monkeypatch):
    """Other map sides pad by other amounts (20 -> 28 and 10 -> 14 at 320; 32 -> 42 and
    16 -> 21 at 512); the output is still sam2's, bit for bit."""
    overrides = [f"++model.image_size={size}"]
    stock = build_sam2_video_predictor(MODEL_CFG, str(checkpoint), device="cpu",
                                       hydra_overrides_extra=overrides)
    ours = build_sam2_video_predictor(MODEL_CFG, str(checkpoint), device="cpu",
                                      hydra_overrides_extra=overrides)
    assert skip_window_padding(padded_blocks(ours, size), torch.device("cpu")) == 5
    shapes = _spy_short_path(monkeypatch)
    assert _encoders_equal(ours, stock, size, images=1)
    assert len(shapes) == 5


def test_a_block_shape_that_rounds_differently_keeps_sam2s_path(checkpoint, monkeypatch, caplog):
    """The start-up check: where leaving the padding out changes a block's output by one float32
    step, that block shape keeps sam2's padded path, with a warning, and the output is sam2's."""
    short = PaddingFreeBlock.forward_without_padding

    def off_by_one_step(self, x):
        out = short(self, x)
        if x.shape[1] == 8:  # only the 8x8 blocks
            out = torch.nextafter(out, torch.full_like(out, float("inf")))
        return out

    monkeypatch.setattr(PaddingFreeBlock, "forward_without_padding", off_by_one_step)
    with caplog.at_level(logging.WARNING, logger=window_attention.__name__):
        built = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0,
                                "off", "skip")
    assert "round differently" in caplog.text
    assert built.window_padding == "skip"  # the 16x16 blocks still skip theirs
    blocks = padded_blocks(built, IMAGE_SIZE)
    assert [b.exact_shapes for b, side in blocks if side == 8] == [frozenset()]
    assert all(b.exact_shapes == {(1, 16, 16)} for b, side in blocks if side == 16)
    assert _encoders_equal(built, build_reference_predictor(checkpoint), IMAGE_SIZE, images=1)


def test_every_block_shape_failing_means_compute(checkpoint, monkeypatch):
    monkeypatch.setattr(window_attention, "_same_output", lambda *args: False)
    built = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0,
                            "off", "skip")
    assert built.window_padding == "compute"


def test_compute_and_sizes_without_padding(checkpoint):
    """``compute`` leaves sam2's blocks alone; at 448 every window fits its map (112/8, 56/4,
    28/14, 14/7), so there is nothing to skip."""
    built = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0,
                            "off", "compute")
    assert built.window_padding == "compute"
    assert not any(isinstance(m, PaddingFreeBlock) for m in built.modules())
    built = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), 448, 0, "off", "skip")
    assert built.window_padding == "none"
    assert not any(isinstance(m, PaddingFreeBlock) for m in built.modules())
    with pytest.raises(ValueError, match="window_padding"):
        build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0, "off", "on")


def test_auto_settings_resolve_by_device_and_size(checkpoint):
    """``auto``, as the server starts by default on the CPU: the padding is skipped at any
    size; objects are batched at 256, where it is faster, and not at 1024, where it was 5%
    slower; an unknown mode is refused before any model is built."""
    small = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0,
                            "auto", "auto")
    assert (small.object_batching, small.window_padding) == ("exact", "skip")
    large = build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), 1024, 0, "auto", "auto")
    assert (large.object_batching, large.window_padding) == ("off", "skip")
    with pytest.raises(ValueError, match="batch_objects"):
        build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0, "sometimes")
