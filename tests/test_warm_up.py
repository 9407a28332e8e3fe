"""Start-up warm-up: every kind of model call runs once behind /health = 503, and leaves nothing."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
from media import make_video

import engine
from sam2_manager import SAM2Manager


def _track(mgr: SAM2Manager, video) -> list[bytes]:
    sid = mgr.new_session_id()
    path = mgr.store.upload_path_for(sid, "clip.mp4")
    shutil.copy(video, path)
    session = mgr.create_session(sid, path, "clip.mp4")
    mgr.add_prompt(sid, 0, 1, points=[[60, 50]], labels=[1])
    mgr.add_prompt(sid, 2, 2, points=[[100, 70]], labels=[1])
    mgr.propagate(sid, 0, session.info.num_frames - 1)
    session.drain_writes()
    return [session.mask_path(i).read_bytes() for i in range(session.info.num_frames)]


def test_warm_up_runs_behind_health_and_changes_no_mask(settings, manager, tmp_path, monkeypatch):
    seen = []
    real = engine.warm_up

    def spy(predictor):
        seen.append(warm.health())
        real(predictor)

    monkeypatch.setattr(engine, "warm_up", spy)
    warm = SAM2Manager(settings.model_copy(update={
        "warm_up": True, "upload_dir": tmp_path / "w-up", "output_dir": tmp_path / "w-out"}))
    try:
        warm.load_model()
        assert warm.ready, warm.model_detail
        assert len(seen) == 1
        assert seen[0]["status"] == "unavailable" and seen[0]["model_status"] == "warming_up"
        assert "warm-up" in seen[0]["detail"]
        assert warm.health()["warm_up_s"] >= 0
        assert warm.health()["object_batching"] == "exact"  # SAM2_BATCH_OBJECTS=auto, CPU
        assert warm.health()["window_padding"] == "skip"  # SAM2_WINDOW_PADDING=auto, CPU

        # The warm-up's throwaway state leaves no trace: the same masks as a predictor that
        # never ran it (the shared test predictor), byte for byte.
        video = make_video(tmp_path / "v.mp4", num_frames=6)
        masks_warm = _track(warm, video)
        masks_cold = _track(manager, video)
        assert masks_warm == masks_cold
        labels = [cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_UNCHANGED) for m in masks_warm]
        assert any(lab.any() for lab in labels), "all masks empty: the comparison shows nothing"
    finally:
        warm.shutdown()


def test_warm_up_can_be_turned_off(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "warm_up", lambda predictor: (_ for _ in ()).throw(
        AssertionError("warm-up ran although SAM2_WARM_UP=false")))
    mgr = SAM2Manager(settings.model_copy(update={"warm_up": False}))
    try:
        mgr.load_model()
        assert mgr.ready, mgr.model_detail
        assert mgr.health()["warm_up_s"] is None
    finally:
        mgr.shutdown()
