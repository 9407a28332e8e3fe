"""Frame paths: the device-resize one stays within a stated tolerance of sam2's; the exact one
normalised on the model's device (CUDA), and the one resized there with Pillow's arithmetic,
give sam2's values bit for bit."""

from __future__ import annotations

import shutil

import torch
from media import make_video

from predictor import LazyFrames

# OpenCV decode + torch bicubic antialiased resize vs PIL's: model inputs within 2/255 of each
# other before normalisation, and this fraction of a frame's mask pixels may flip (measured:
# at most 0.04% on this clip).
PIXEL_TOLERANCE = 2 / 255
MASK_TOLERANCE = 0.002


def test_model_inputs_close_to_pil(tmp_path, manager, video):
    sid = manager.new_session_id()
    path = manager.store.upload_path_for(sid, "v.mp4")
    shutil.copy(video, path)
    session = manager.create_session(sid, path, "v.mp4")
    session.extractor.wait_for(7, 60)
    frames = lambda i: session.frames_dir / f"{i:05d}.jpg"  # noqa: E731
    exact = LazyFrames(8, 256, frames)
    fast = LazyFrames(8, 256, frames, resize_on=torch.device("cpu"))
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for i in range(8):
        diff = ((exact[i] - fast[i]) * std).abs()  # back in 0..1 units
        assert diff.max().item() <= PIXEL_TOLERANCE + 1e-6, i
        assert fast[i].shape == exact[i].shape and fast[i].dtype == torch.float32


def _random_jpegs(folder, seed: int):
    """Three random 130x90 JPEG frames; their path function and sam2's own model inputs."""
    import numpy as np
    from PIL import Image
    from sam2.utils.misc import load_video_frames_from_jpg_images

    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90)
    ref, _, _ = load_video_frames_from_jpg_images(str(folder), 256, offload_video_to_cpu=True,
                                                  compute_device=torch.device("cpu"))
    return (lambda i: folder / f"{i:05d}.jpg"), ref


def test_exact_frames_normalised_on_device_are_bit_identical(tmp_path):
    """With CUDA, exact frames are uploaded as uint8 and normalised there (a 256-entry table of
    x / 255 in float64 rounded to float32, then the float32 subtract and divide). Here the
    "device" is the CPU: the same operations must give sam2's numbers exactly, on random
    frames of every byte value."""
    import numpy as np

    frames, ref = _random_jpegs(tmp_path, 7)
    on_device = LazyFrames(3, 256, frames, normalise_on=torch.device("cpu"))
    assert on_device.upload_to is not None
    raw = on_device._read(0)
    assert raw.dtype == np.uint8  # what crosses to the GPU: a quarter of float32's bytes
    for i in range(3):
        mine = on_device[i]
        assert mine.dtype == torch.float32
        assert torch.equal(mine, ref[i]), i
        assert torch.equal(mine, LazyFrames(3, 256, frames)[i]), i


# (input width, height) -> (output width, height): down, up, mixed, one axis unchanged (that
# pass skipped, as Pillow skips it), large ratios, and the sizes the server meets most.
RESIZES = [((130, 90), (256, 256)), ((640, 360), (256, 256)), ((1920, 1080), (1024, 1024)),
           ((256, 100), (256, 37)), ((31, 256), (256, 256)), ((1000, 7), (16, 64)),
           ((3840, 2160), (1024, 1024)), ((17, 19), (1024, 1024)), ((333, 444), (512, 512))]


def test_resize_like_pil_is_pils_to_the_byte():
    import numpy as np
    from PIL import Image

    from exact_resize import resize_like_pil

    rng = np.random.default_rng(11)
    for (w, h), size in RESIZES:
        for pattern in ("noise", "edges"):
            if pattern == "noise":
                hwc = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            else:  # hard 0/255 steps drive bicubic's overshoot into both clips
                hwc = ((rng.random((h, w, 1)) > 0.5) * np.array([255, 0, 255])).astype(np.uint8)
            expected = np.asarray(Image.fromarray(hwc).resize(size))
            mine = resize_like_pil(torch.from_numpy(hwc), size).permute(1, 2, 0).numpy()
            differing = int((mine != expected).sum())
            assert differing == 0, f"{(w, h)} -> {size} ({pattern}): {differing} values differ"


def test_exact_frames_resized_on_device_are_bit_identical(tmp_path):
    """SAM2_FRAME_RESIZE=exact-device: PIL decodes on the host, the full-size uint8 frame goes
    to the device and is resized and normalised there; the CPU stands in for the device."""
    import numpy as np

    frames, ref = _random_jpegs(tmp_path, 5)
    on_device = LazyFrames(3, 256, frames, exact_resize_on=torch.device("cpu"))
    raw = on_device._read(0)
    assert raw.shape == (90, 130, 3) and raw.dtype == np.uint8  # not resized on the host
    for i in range(3):
        assert torch.equal(on_device[i], ref[i]), i


def _masks_by_mode(settings, predictor, tmp_path, modes, n=10):
    from sam2_manager import SAM2Manager

    video = make_video(tmp_path / "v.mp4", num_frames=n)
    masks = []
    for mode in modes:
        mgr = SAM2Manager(settings.model_copy(update={
            "frame_resize": mode, "output_dir": settings.output_dir / mode}), predictor=predictor)
        sid = mgr.new_session_id()
        path = mgr.store.upload_path_for(sid, "v.mp4")
        shutil.copy(video, path)
        session = mgr.create_session(sid, path, "v.mp4")
        mgr.add_prompt(sid, 0, 1, points=[[45, 55], [50, 60]], labels=[1, 1])
        mgr.propagate(sid, 0, n - 1)
        mgr.add_prompt(sid, 5, 1, points=[[10, 10]], labels=[0], append=True)
        mgr.propagate(sid, 5, 0)
        masks.append([mgr.store.read_label_map(session, f) for f in range(n)])
        mgr.shutdown()
    return masks


def test_masks_within_tolerance(settings, predictor, tmp_path):
    n = 10
    masks = _masks_by_mode(settings, predictor, tmp_path, ("exact", "device"), n)
    for f in range(n):
        differing = float((masks[0][f] != masks[1][f]).mean())
        assert differing <= MASK_TOLERANCE, f"frame {f}: {differing:.3%} of pixels differ"


def test_exact_device_masks_equal_exact_ones(settings, predictor, tmp_path):
    exact, on_device = _masks_by_mode(settings, predictor, tmp_path, ("exact", "exact-device"))
    assert any((m > 0).any() for m in exact)  # not an empty comparison
    for f, (a, b) in enumerate(zip(exact, on_device, strict=True)):
        assert int((a != b).sum()) == 0, f


def test_frames_prefetched_only_beside_a_gpu_by_default(settings, predictor, video, tmp_path):
    """With the model on the CPU, frames are prepared when the model asks (no prefetch threads
    competing with torch's); SAM2_PREFETCH_THREADS > 0 turns prefetching back on."""
    from sam2_manager import SAM2Manager

    for threads, expect_prefetch in ((0, False), (2, True)):
        mgr = SAM2Manager(settings.model_copy(update={
            "prefetch_threads": threads, "output_dir": tmp_path / str(threads)}),
            predictor=predictor)
        try:
            sid = mgr.new_session_id()
            path = mgr.store.upload_path_for(sid, "v.mp4")
            shutil.copy(video, path)
            session = mgr.create_session(sid, path, "v.mp4")
            mgr.add_prompt(sid, 0, 1, points=[[45, 55]], labels=[1])
            images = session.state["images"]
            assert (images._prefetcher is not None) == expect_prefetch
            mgr.propagate(sid, 0, 3)
            assert bool(images._pending) == expect_prefetch  # frames 4.. ahead, or none
        finally:
            mgr.shutdown()
