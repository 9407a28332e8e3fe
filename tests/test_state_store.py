"""Tracking state beyond the window goes to disk and comes back bit for bit: masks do not change."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from media import make_video

from state_store import SpillingFrameOutputs, state_memory_report

N = 14


@pytest.fixture
def small_window_manager(settings, predictor):
    from sam2_manager import SAM2Manager

    mgr = SAM2Manager(settings.model_copy(update={"state_window": 2}), predictor=predictor)
    yield mgr
    mgr.shutdown()


def _open(mgr, video):
    sid = mgr.new_session_id()
    path = mgr.store.upload_path_for(sid, "clip.mp4")
    shutil.copy(video, path)
    session = mgr.create_session(sid, path, "clip.mp4")
    session.extractor.wait_for(session.info.num_frames - 1, 60)
    return sid, session


def _labels(masks: torch.Tensor, obj_ids: list[int]) -> np.ndarray:
    import masks as mask_ops

    return mask_ops.label_map(masks, obj_ids)


def _server_mask(session, frame_idx):
    session.wait_for_write(frame_idx)
    return cv2.imread(str(session.mask_path(frame_idx)), cv2.IMREAD_UNCHANGED)


def test_spilled_state_gives_identical_masks(small_window_manager, reference_predictor, tmp_path):
    mgr = small_window_manager
    video = make_video(tmp_path / "v.mp4", num_frames=N)
    sid, session = _open(mgr, video)
    ref = reference_predictor
    state = ref.init_state(str(session.frames_dir))
    expected: dict[int, np.ndarray] = {}

    def ref_propagate(start, end):
        reverse = end < start
        for f, ids, m in ref.propagate_in_video(state, start_frame_idx=start,
                                                max_frame_num_to_track=abs(end - start),
                                                reverse=reverse):
            expected[f] = _labels(m, ids)

    mgr.add_prompt(sid, 0, 1, points=[[45, 55], [50, 60]], labels=[1, 1])
    ref.add_new_points_or_box(state, 0, 1, points=[[45, 55], [50, 60]], labels=[1, 1])
    mgr.propagate(sid, 0, N - 1)
    ref_propagate(0, N - 1)

    report = state_memory_report(session.state)[1]
    assert report["in_memory"] <= 2 and report["on_disk"] >= N - 4
    assert len(list(session.state_dir.rglob("*.pt"))) == report["on_disk"]

    # A refinement on an early frame (its state is on disk) and a re-propagation from it.
    mgr.add_prompt(sid, 3, 1, points=[[10, 10]], labels=[0], append=True)
    _, ids, m = ref.add_new_points_or_box(state, 3, 1, points=[[10, 10]], labels=[0],
                                          clear_old_points=False)
    expected[3] = _labels(m, ids)
    assert np.array_equal(_server_mask(session, 3), expected[3])
    mgr.propagate(sid, 3, N - 1)
    ref_propagate(3, N - 1)
    # Backwards from the end, reading the memories of frames now on disk.
    mgr.propagate(sid, N - 1, 0)
    ref_propagate(N - 1, 0)

    for f in range(N):
        diff = int((_server_mask(session, f) != expected[f]).sum())
        assert diff == 0, f"frame {f}: {diff} pixels differ"
    nc = session.state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    assert isinstance(nc, SpillingFrameOutputs) and nc.loads > 0 and nc.spills > 0


def test_mapping_round_trip_is_exact(tmp_path):
    pos = [torch.randn(1, 4, 2, 2)]
    store = SpillingFrameOutputs(tmp_path, keep=1, pos_enc=lambda: pos)
    outs = {i: {"maskmem_features": torch.randn(1, 4, 2, 2).to(torch.bfloat16),
                "maskmem_pos_enc": [pos[0].expand(1, -1, -1, -1)],
                "pred_masks": torch.randn(1, 1, 8, 8), "obj_ptr": torch.randn(1, 16),
                "object_score_logits": torch.randn(1, 1), "iou": torch.rand(1)}
            for i in range(3)}
    for i, out in outs.items():
        store[i] = out
    assert store.in_memory == 1 and store.on_disk == 2 and len(store) == 3
    assert list(store) == [0, 1, 2] and 0 in store and 5 not in store
    back = store[0]
    for key in ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits", "iou"):
        assert torch.equal(back[key], outs[0][key]) and back[key].dtype == outs[0][key].dtype
    assert torch.equal(back["maskmem_pos_enc"][0], pos[0])
    assert store.pop(1)["obj_ptr"].shape == (1, 16)
    assert store.pop(7, None) is None
    del store[2]
    assert len(store) == 1
    store.clear()
    assert len(store) == 0 and not list(store.folder.glob("*.pt"))
    with pytest.raises(KeyError):
        store[0]


def _entries(pos, n):
    return {i: {"maskmem_features": torch.randn(1, 4, 2, 2).to(torch.bfloat16),
                "maskmem_pos_enc": [pos[0].expand(1, -1, -1, -1)],
                "pred_masks": torch.randn(1, 1, 8, 8), "obj_ptr": torch.randn(1, 16),
                "object_score_logits": torch.randn(1, 1), "iou": torch.rand(1)}
            for i in range(n)}


def test_background_spills_round_trip_exactly(tmp_path):
    """The GPU path (spilled by a background thread), driven here with CPU tensors: every entry
    reads back bit for bit, whether its file was still being written or already on disk, and
    no write outlives a delete or a clear."""
    pos = [torch.randn(1, 4, 2, 2)]
    store = SpillingFrameOutputs(tmp_path, keep=2, pos_enc=lambda: pos, background=True)
    outs = _entries(pos, 30)
    for i, out in outs.items():
        store[i] = out
    assert store.spills == 28 and len(store._writing) <= store.IN_FLIGHT
    assert len(store) == 30 and store.in_memory == 2
    for i in (29, 27, 3, 0, 15):  # in memory, just spilled, long written, ...
        back = store[i]
        for key in ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits", "iou"):
            assert torch.equal(back[key], outs[i][key]) and back[key].dtype == outs[i][key].dtype
    del store[20]
    assert 20 not in store
    store.clear()
    assert len(store) == 0 and not store._writing
    assert not list(store.folder.glob("*.pt")) and not list(store.folder.glob("*.tmp"))


def test_failed_background_spill_keeps_the_entry(tmp_path):
    """A spill that cannot be written (its folder gone, a full disk) loses nothing: the entry
    is still there, and the next spill reports the error to the tracking thread."""
    pos = [torch.randn(1, 4, 2, 2)]
    store = SpillingFrameOutputs(tmp_path, keep=1, pos_enc=lambda: pos, background=True)
    outs = _entries(pos, 3)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    store._write = full_disk
    store[0] = outs[0]
    store[1] = outs[1]  # spills 0 in the background: its write fails
    assert torch.equal(store[0]["obj_ptr"], outs[0]["obj_ptr"])  # read back all the same
    with pytest.raises(OSError, match="No space"):  # spilling 1, ... fails in turn: the
        for k in range(100):  # error surfaces at a later spill (at most IN_FLIGHT later)
            store[2 + k] = outs[k % 3]
    assert torch.equal(store[1]["obj_ptr"], outs[1]["obj_ptr"])


def test_finish_spills_waits_for_every_write(tmp_path):
    """Before a session's state folder is removed, the spills still being written are waited
    for: after finish_spills none is in flight and every file is whole."""
    from state_store import finish_spills

    pos = [torch.randn(1, 4, 2, 2)]
    store = SpillingFrameOutputs(tmp_path, keep=1, pos_enc=lambda: pos, background=True)
    for i, out in _entries(pos, 6).items():
        store[i] = out
    finish_spills({"output_dict_per_obj": {0: {"non_cond_frame_outputs": store}}})
    assert not store._writing
    assert sorted(p.name for p in store.folder.iterdir()) == [f"{i:06d}.pt" for i in range(5)]


def test_reset_and_close_remove_spilled_files(small_window_manager, tmp_path):
    mgr = small_window_manager
    video = make_video(tmp_path / "v.mp4", num_frames=8)
    sid, session = _open(mgr, video)
    mgr.add_prompt(sid, 0, 1, points=[[45, 55]], labels=[1])
    mgr.propagate(sid, 0, 7)
    assert list(session.state_dir.rglob("*.pt"))
    mgr.reset(sid)
    assert not list(session.state_dir.rglob("*.pt"))
    mgr.add_prompt(sid, 0, 1, points=[[45, 55]], labels=[1])
    mgr.propagate(sid, 0, 7)
    mgr.close_session(sid, delete_files=False)
    assert not session.state_dir.exists()
    assert session.mask_path(7).exists()  # the work stays on disk
