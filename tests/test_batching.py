"""Objects tracked as one batch give the masks of tracking them one by one (small tolerance)."""

from __future__ import annotations

import shutil

import pytest
from media import make_video

# Batched matrix products may round differently from one-object ones; a mask pixel can flip
# where its logit is within rounding of 0. Allowed: this fraction of a frame's pixels.
TOLERANCE = 0.001


@pytest.fixture
def managers(settings, checkpoint):
    import torch

    from predictor import build_predictor
    from sam2_manager import SAM2Manager

    pair = []
    for batch in (False, True):
        predictor = build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint,
                                    torch.device("cpu"), 256, 0, batch_objects=batch)
        s = settings.model_copy(update={"output_dir": settings.output_dir / str(batch),
                                        "state_window": 4})
        pair.append(SAM2Manager(s, predictor=predictor))
    yield pair
    for mgr in pair:
        mgr.shutdown()


def _session(mgr, video):
    sid = mgr.new_session_id()
    path = mgr.store.upload_path_for(sid, "v.mp4")
    shutil.copy(video, path)
    return sid, mgr.create_session(sid, path, "v.mp4")


def _masks(mgr, session, n):
    return [mgr.store.read_label_map(session, f) for f in range(n)]


@pytest.mark.parametrize("layout", ["same_frame", "different_frames"])
def test_batched_objects_match_one_by_one(managers, tmp_path, layout):
    n = 12
    video = make_video(tmp_path / "v.mp4", num_frames=n)
    prompts = [(0, 1, [[45, 55]]), (0, 2, [[120, 80]]), (0, 3, [[20, 100]])]
    if layout == "different_frames":
        prompts = [(0, 1, [[45, 55]]), (0, 2, [[120, 80]]), (3, 3, [[20, 100]])]
    results = []
    for mgr in managers:
        sid, session = _session(mgr, video)
        for frame_idx, obj_id, points in prompts:
            mgr.add_prompt(sid, frame_idx, obj_id, points=points, labels=[1])
        mgr.propagate(sid, 0, n - 1)
        mgr.add_prompt(sid, 6, 2, points=[[10, 10]], labels=[0], append=True)
        mgr.propagate(sid, 6, 0)  # backwards, through spilled state
        results.append((_masks(mgr, session, n), mgr.store.describe(sid)["scores"]))
    (plain, plain_scores), (batched, batched_scores) = results
    assert any(m.any() for m in plain)
    for f in range(n):
        differing = float((plain[f] != batched[f]).mean())
        assert differing <= TOLERANCE, f"frame {f}: {differing:.4%} of pixels differ"
        for obj, score in plain_scores[str(f)].items():
            assert batched_scores[str(f)][obj]["object_score"] == pytest.approx(
                score["object_score"], abs=1e-3)


def test_batched_tracking_reads_nothing_back_from_disk(settings, checkpoint, tmp_path):
    """A forward propagation in batches reads, per frame, only the tracked frames sam2 uses
    (15 object pointers, 6 memories), all within the default window of 16 kept in memory: no
    entry is loaded back from disk (one frame too many made it load one per object per frame)."""
    import torch

    from predictor import build_predictor
    from sam2_manager import SAM2Manager
    from state_store import SpillingFrameOutputs

    predictor = build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint,
                                torch.device("cpu"), 256, 0, batch_objects=True)
    mgr = SAM2Manager(settings.model_copy(update={"state_window": 16}), predictor=predictor)
    try:
        n = 22
        sid, session = _session(mgr, make_video(tmp_path / "v.mp4", num_frames=n))
        mgr.add_prompt(sid, 0, 1, points=[[45, 55]], labels=[1])
        mgr.add_prompt(sid, 0, 2, points=[[120, 80]], labels=[1])
        mgr.propagate(sid, 0, n - 1)
        stores = [out["non_cond_frame_outputs"]
                  for out in session.state["output_dict_per_obj"].values()]
        assert all(isinstance(s, SpillingFrameOutputs) for s in stores)
        assert all(s.spills > 0 for s in stores)  # the window was exceeded ...
        assert [s.loads for s in stores] == [0, 0]  # ... and nothing came back
    finally:
        mgr.shutdown()
