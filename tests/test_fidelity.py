"""The server's masks equal Meta's SAM2VideoPredictor driven directly on the same frames and prompts.

Every scenario runs the server's path (``SAM2Manager`` on the session-wide ``TrackingPredictor``,
lazy frames, point lists resent with ``clear_old_points=True``) and then Meta's stock predictor the
way its README does (``init_state`` on the JPEG folder the server wrote, ``add_new_points_or_box``,
``add_new_mask``, ``propagate_in_video``). The server's label PNGs are compared with a label map
computed here, independently of ``masks.label_map``, from the reference's video-resolution logits:
a pixel gets the obj_id with the highest logit where that logit is > 0, else 0.

Tolerance: 0 differing pixels. The plain CPU path feeds the model the same tensors in the same
order, so it is bit-identical by design.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

WAIT_S = 60

# Frame 0 of the `video` fixture (160x120): the yellow box spans x 16..68, y 40..79; it moves
# right by 3.2 px a frame. The blue corner mark spans x 0..19, y 0..14.
POS_POINTS = [[45, 55], [60, 65]]
POS_LABELS = [1, 1]


# ----------------------------------------------------------------------------- helpers
def open_session(manager, video: Path):
    """Create a session the way the upload route does; frames keep decoding in the background."""
    sid = manager.new_session_id()
    path = manager.store.upload_path_for(sid, "clip.mp4")
    shutil.copy(video, path)
    session = manager.create_session(sid, path, "clip.mp4")
    return sid, session


def reference_state(reference_predictor, session):
    """Meta's stock init_state on the JPEG folder the server decoded, once it is complete."""
    n = session.info.num_frames
    session.extractor.wait_for(n - 1, WAIT_S)
    state = reference_predictor.init_state(str(session.frames_dir))
    assert state["num_frames"] == n
    assert (state["video_height"], state["video_width"]) == (session.info.height,
                                                             session.info.width)
    return state


def ref_label_map(video_res_masks: torch.Tensor, obj_ids) -> np.ndarray:
    """(N,1,H,W) logits -> uint8 HxW: obj_id of the highest logit where it is > 0, else 0."""
    logits = video_res_masks[:, 0].detach().float().cpu().numpy()
    best = logits.argmax(axis=0)
    ids = np.asarray(list(obj_ids), dtype=np.uint8)
    return np.where(logits.max(axis=0) > 0, ids[best], 0).astype(np.uint8)


def ref_propagate(reference_predictor, state, start: int, end: int) -> dict[int, np.ndarray]:
    """propagate_in_video over [start, end] (backwards if end < start); last output per frame."""
    out = {}
    for f, obj_ids, masks in reference_predictor.propagate_in_video(
            state, start_frame_idx=start, max_frame_num_to_track=abs(end - start),
            reverse=end < start):
        out[f] = ref_label_map(masks, obj_ids)
    return out


def ref_add(reference_predictor, state, frame_idx, obj_id, **kwargs) -> np.ndarray:
    _, obj_ids, masks = reference_predictor.add_new_points_or_box(state, frame_idx, obj_id,
                                                                  **kwargs)
    return ref_label_map(masks, obj_ids)


def server_mask(session, frame_idx: int) -> np.ndarray:
    session.wait_for_write(frame_idx)  # a click's files are written off the request path
    path = session.mask_path(frame_idx)
    assert path.is_file(), f"no mask PNG for frame {frame_idx}"
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.ndim == 2, path
    return img


def server_masks(session, frames) -> dict[int, np.ndarray]:
    return {f: server_mask(session, f) for f in frames}


def assert_same_labels(server: dict[int, np.ndarray], reference: dict[int, np.ndarray]) -> None:
    assert sorted(server) == sorted(reference)
    for f in reference:
        assert server[f].shape == reference[f].shape, (f, server[f].shape, reference[f].shape)
    diffs = {f: int((server[f] != reference[f]).sum()) for f in sorted(reference)}
    bad = {f: d for f, d in diffs.items() if d}
    total = sum(m.size for m in reference.values())
    assert not bad, (f"server masks differ from Meta's predictor: differing pixels per frame "
                     f"{bad} ({sum(bad.values())} of {total} pixels)")


def assert_informative(labels: dict[int, np.ndarray], obj_ids=(1,)) -> None:
    """Equality only means something if the masks are neither empty nor the whole frame."""
    for obj_id in obj_ids:
        assert any((m == obj_id).any() for m in labels.values()), f"object {obj_id} never shows"
    assert any((m == 0).any() for m in labels.values()), "no background anywhere"


def assert_one_click_run_matches(reference_predictor, session, click_frame: int, end: int,
                                 annotated: np.ndarray) -> None:
    """Meta's predictor, given the server's one click on ``click_frame`` and one propagation to
    ``end``, gives the same click mask and the same mask on every frame as the server did."""
    n = session.info.num_frames
    state = reference_state(reference_predictor, session)
    clicked = ref_add(reference_predictor, state, click_frame, 1, points=POS_POINTS,
                      labels=POS_LABELS)
    assert_same_labels({click_frame: annotated}, {click_frame: clicked})
    ref = ref_propagate(reference_predictor, state, click_frame, end)
    assert sorted(ref) == list(range(n))
    assert_informative(ref)
    assert_same_labels(server_masks(session, range(n)), ref)


# ----------------------------------------------------------------------------- frames
def test_server_frames_are_what_the_reference_reads(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    assert n == 8
    state = reference_state(reference_predictor, session)
    # Exactly the decoded frames, named as sam2's JPEG loader expects, no leftover temp files.
    assert sorted(os.listdir(session.frames_dir)) == [f"{i:05d}.jpg" for i in range(n)]
    for i in range(n):
        assert manager.store.frame_path(session, i) == session.frames_dir / f"{i:05d}.jpg"
    assert state["num_frames"] == n


def test_lazy_frames_equal_load_video_frames(manager, video, predictor):
    from sam2.utils.misc import load_video_frames

    from predictor import LazyFrames, new_inference_state

    sid, session = open_session(manager, video)
    n = session.info.num_frames
    session.extractor.wait_for(n - 1, WAIT_S)
    images, h, w = load_video_frames(str(session.frames_dir), predictor.image_size,
                                     offload_video_to_cpu=True,
                                     compute_device=torch.device("cpu"))
    lazy = LazyFrames(n, predictor.image_size, lambda i: session.frames_dir / f"{i:05d}.jpg")
    state = new_inference_state(predictor, lazy, h, w)
    assert len(state["images"]) == state["num_frames"] == len(images) == n
    assert (state["video_height"], state["video_width"]) == (h, w) == (120, 160)
    for i in (0, 3, n - 1):
        item = state["images"][i]
        assert item.dtype == images[i].dtype == torch.float32
        assert item.shape == images[i].shape == (3, predictor.image_size, predictor.image_size)
        assert torch.equal(item, images[i]), f"frame {i} differs from load_video_frames"
    # Different frames really are different tensors (the comparison is not vacuous).
    assert not torch.equal(state["images"][0], state["images"][n - 1])


def test_new_inference_state_has_init_state_keys(manager, video, predictor, reference_predictor):
    from predictor import LazyFrames, new_inference_state

    sid, session = open_session(manager, video)
    ref = reference_state(reference_predictor, session)
    lazy = LazyFrames(session.info.num_frames, predictor.image_size,
                      lambda i: session.frames_dir / f"{i:05d}.jpg")
    state = new_inference_state(predictor, lazy, session.info.height, session.info.width)
    missing = set(ref) - set(state)
    assert not missing, f"keys init_state sets that new_inference_state lacks: {missing}"


# ----------------------------------------------------------------------------- 1. forward
def test_annotate_then_propagate_forward(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    annotated = server_mask(session, 0)
    result = manager.propagate(sid, 0, n - 1)
    assert result["frames_processed"] == n

    assert_one_click_run_matches(reference_predictor, session, 0, n - 1, annotated)


# ----------------------------------------------------------------------------- 2. refinement
def test_refine_middle_frame_and_repropagate(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    mid = n // 2
    neg = [[50, 60]]  # inside the tracked object on the middle frame
    extra = [[70, 70]]

    # Server: annotate, propagate, refine the middle frame twice (append), re-propagate from it.
    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    manager.propagate(sid, 0, n - 1)
    first_pass = server_masks(session, range(n))
    stats_before = {f: os.stat(session.mask_path(f)) for f in range(n)}
    bytes_before = {f: session.mask_path(f).read_bytes() for f in range(n)}
    manager.add_prompt(sid, mid, 1, points=neg, labels=[0], append=True)
    refined_once = server_mask(session, mid)
    manager.add_prompt(sid, mid, 1, points=extra, labels=[1], append=True)
    refined_twice = server_mask(session, mid)
    result = manager.propagate(sid, mid, n - 1)

    # Reference: the same sequence, refinements appended with clear_old_points=False.
    state = reference_state(reference_predictor, session)
    ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    ref_first = ref_propagate(reference_predictor, state, 0, n - 1)
    ref_refined_once = ref_add(reference_predictor, state, mid, 1, points=neg, labels=[0],
                               clear_old_points=False)
    ref_refined_twice = ref_add(reference_predictor, state, mid, 1, points=extra, labels=[1],
                                clear_old_points=False)
    ref_second = ref_propagate(reference_predictor, state, mid, n - 1)

    assert_informative(ref_first)
    # The refinement must change the mask, or this test proves nothing about refinement.
    assert (ref_refined_once != ref_first[mid]).any()
    assert (ref_refined_twice != ref_refined_once).any()

    assert_same_labels(first_pass, ref_first)
    assert_same_labels({mid: refined_once}, {mid: ref_refined_once})
    assert_same_labels({mid: refined_twice}, {mid: ref_refined_twice})
    expected = {f: ref_first[f] for f in range(mid)} | ref_second
    assert_same_labels(server_masks(session, range(n)), expected)

    # The second propagation covered [mid, n-1] only: earlier frames were not rewritten.
    assert result["first_frame"] == mid and result["last_frame"] == n - 1
    assert result["frames_processed"] == n - mid
    for f in range(mid):
        after = os.stat(session.mask_path(f))
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            stats_before[f].st_ino, stats_before[f].st_mtime_ns, stats_before[f].st_size), f
        assert session.mask_path(f).read_bytes() == bytes_before[f], f
    desc = manager.store.describe(sid)
    props = desc["propagations"]
    assert len(props) == 2
    assert (props[0]["first_frame"], props[0]["last_frame"], props[0]["frames"]) == (0, n - 1, n)
    assert (props[1]["first_frame"], props[1]["last_frame"], props[1]["frames"]) == (
        mid, n - 1, n - mid)
    assert props[1]["passes"] == [{"direction": "forward", "from": mid, "to": n - 1,
                                   "last": n - 1}]
    assert props[1]["cancelled"] is False
    # The whole point list is what the model holds for the refined frame.
    assert desc["current_prompts"]["1"][str(mid)]["points"] == [[50.0, 60.0], [70.0, 70.0]]
    assert desc["current_prompts"]["1"][str(mid)]["labels"] == [0, 1]
    # The manifest on disk says the same.
    on_disk = json.loads(session.manifest_path.read_text())
    assert on_disk["propagations"] == props


def _count_encodings(predictor, monkeypatch) -> list[int]:
    """Record the frames' image encodings (``forward_image`` calls) from now on."""
    calls: list[int] = []
    encode = predictor.forward_image

    def counted(image):
        calls.append(1)
        return encode(image)

    monkeypatch.setattr(predictor, "forward_image", counted)
    return calls


def test_refining_a_prompted_frame_after_propagation_reuses_its_features(
        manager, video, predictor, reference_predictor, monkeypatch):
    """sam2 keeps the image features of the last frame it encoded only, so the first click on
    frame 0 after a propagation would run the image encoder again. The server keeps those of
    its prompted frames: no encoding, and the same mask as Meta's predictor (which encodes)."""
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    neg = [[50, 60]]
    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    manager.propagate(sid, 0, n - 1)
    encoded = _count_encodings(predictor, monkeypatch)
    manager.add_prompt(sid, 0, 1, points=neg, labels=[0], append=True)
    assert encoded == []
    refined = server_mask(session, 0)
    manager.add_prompt(sid, n - 2, 1, points=POS_POINTS, labels=POS_LABELS)  # never prompted
    assert len(encoded) == 1

    state = reference_state(reference_predictor, session)
    ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    ref_first = ref_propagate(reference_predictor, state, 0, n - 1)
    ref_refined = ref_add(reference_predictor, state, 0, 1, points=neg, labels=[0],
                          clear_old_points=False)
    assert (ref_refined != ref_first[0]).any()  # else the refinement proves nothing
    assert_same_labels({0: refined}, {0: ref_refined})


def test_features_kept_for_the_most_recently_prompted_frames_only(
        settings, predictor, video, monkeypatch):
    from sam2_manager import SAM2Manager

    mgr = SAM2Manager(settings.model_copy(update={"feature_cache_frames": 1}),
                      predictor=predictor)
    try:
        sid, session = open_session(mgr, video)
        n = session.info.num_frames
        mgr.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
        mgr.add_prompt(sid, 3, 1, points=POS_POINTS, labels=POS_LABELS)
        mgr.propagate(sid, 0, n - 1)
        assert list(session.state["kept_features"]) == [3]
        encoded = _count_encodings(predictor, monkeypatch)
        mgr.add_prompt(sid, 3, 1, points=[[50, 60]], labels=[0], append=True)
        assert encoded == []
        mgr.add_prompt(sid, 0, 1, points=[[50, 60]], labels=[0], append=True)
        assert len(encoded) == 1  # frame 0's features were let go for frame 3's
        assert list(session.state["kept_features"]) == [0]
    finally:
        mgr.shutdown()


def test_refine_prompted_frame_resends_whole_point_list(manager, video, reference_predictor):
    """Append on a frame that already has points: server resends all with clear_old_points=True."""
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    manager.add_prompt(sid, 0, 1, points=[POS_POINTS[0]], labels=[1])
    manager.add_prompt(sid, 0, 1, points=[[30, 50]], labels=[0], append=True)
    refined = server_mask(session, 0)
    manager.propagate(sid, 0, n - 1)

    state = reference_state(reference_predictor, session)
    first = ref_add(reference_predictor, state, 0, 1, points=[POS_POINTS[0]], labels=[1])
    ref_refined = ref_add(reference_predictor, state, 0, 1, points=[[30, 50]], labels=[0],
                          clear_old_points=False)
    assert (ref_refined != first).any()
    assert_same_labels({0: refined}, {0: ref_refined})
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref)
    assert_same_labels(server_masks(session, range(n)), ref)


# ----------------------------------------------------------------------------- 3. backward
def test_backward_propagation_from_last_frame(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    last = n - 1
    manager.add_prompt(sid, last, 1, points=POS_POINTS, labels=POS_LABELS)
    annotated = server_mask(session, last)
    result = manager.propagate(sid, last, 0)
    assert result["direction"] == "backward"
    assert result["passes"] == [{"direction": "backward", "from": last, "to": 0, "last": 0}]
    assert result["frames_processed"] == n

    assert_one_click_run_matches(reference_predictor, session, last, 0, annotated)


# ----------------------------------------------------------------------------- 4. two objects
def test_two_objects_propagated_both_ways_from_middle(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    start = n // 2
    obj2_frame, obj2_points = 2, [[130, 100], [140, 20]]
    manager.add_prompt(sid, 1, 1, points=POS_POINTS, labels=POS_LABELS)
    manager.add_prompt(sid, obj2_frame, 2, points=obj2_points, labels=[1, 1])
    result = manager.propagate(sid, start, direction="both")
    assert result["passes"] == [{"direction": "forward", "from": start, "to": n - 1,
                                 "last": n - 1},
                                {"direction": "backward", "from": start, "to": 0, "last": 0}]
    assert result["frames_processed"] == n

    state = reference_state(reference_predictor, session)
    ref_add(reference_predictor, state, 1, 1, points=POS_POINTS, labels=POS_LABELS)
    ref_add(reference_predictor, state, obj2_frame, 2, points=obj2_points, labels=[1, 1])
    ref = ref_propagate(reference_predictor, state, start, n - 1)
    ref |= ref_propagate(reference_predictor, state, start, 0)  # the start frame: last pass wins
    assert sorted(ref) == list(range(n))
    assert_informative(ref, obj_ids=(1, 2))
    assert_same_labels(server_masks(session, range(n)), ref)
    assert manager.store.describe(sid)["mask_frames"] == list(range(n))


def test_both_directions_start_frame_ends_with_the_backward_result(manager, video,
                                                                  reference_predictor,
                                                                  monkeypatch):
    """With direction "both" the start frame is output twice; the last (backward) output wins.

    The forward pass is made short (start = n-2) and the forward write of the start frame is
    held until the backward write of the same frame has finished (or 10 s have passed, which
    is what happens when the server orders writes of one frame). Masks and scores must then
    be the backward pass's, as with Meta's predictor where the later output replaces the
    earlier one.
    """
    import threading

    sid, session = open_session(manager, video)
    n = session.info.num_frames
    start = n - 2
    real_write = manager.store._write_frame
    calls: list[int] = []
    second_done = threading.Event()
    lock = threading.Lock()

    def write_frame(sess, frame_idx, labels_map, seq=None):
        if frame_idx != start:
            return real_write(sess, frame_idx, labels_map, seq)
        with lock:
            calls.append(frame_idx)
            nth = calls.count(start)
        if nth == 1:
            second_done.wait(10)
            return real_write(sess, frame_idx, labels_map, seq)
        try:
            return real_write(sess, frame_idx, labels_map, seq)
        finally:
            second_done.set()

    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    monkeypatch.setattr(manager.store, "_write_frame", write_frame)
    manager.propagate(sid, start, direction="both")
    assert calls.count(start) == 2

    state = reference_state(reference_predictor, session)
    ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    forward = ref_propagate(reference_predictor, state, start, n - 1)
    backward = ref_propagate(reference_predictor, state, start, 0)
    assert (forward[start] != backward[start]).any(), "the two passes must disagree here"
    assert_same_labels({start: server_mask(session, start)}, {start: backward[start]})
    score = manager.store.describe(sid)["scores"][str(start)]["1"]["object_score"]
    final_logit = state["output_dict_per_obj"][0]["non_cond_frame_outputs"][start][
        "object_score_logits"].item()
    assert score == pytest.approx(final_logit, abs=1e-4)


def test_object_prompted_after_the_start_frame(manager, video, reference_predictor):
    """Object 2 is first prompted on a frame after the start of a forward pass.

    Tracking it on the frames before its prompt finds no object pointer, so sam2 concatenates
    only its bf16 memories and, on the CPU without autocast, the stock predictor raises a dtype
    error in memory attention. The server widens memories to float32 (exact). The reference
    here is the stock predictor with the memory cast to float32 where it enters memory
    attention, which is what torch.cat's type promotion does whenever a pointer is present.
    """
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    start = n // 2
    obj2_frame, obj2_points = n - 2, [[130, 100], [140, 20]]
    manager.add_prompt(sid, 1, 1, points=POS_POINTS, labels=POS_LABELS)
    manager.add_prompt(sid, obj2_frame, 2, points=obj2_points, labels=[1, 1])
    result = manager.propagate(sid, start, direction="both")
    assert result["frames_processed"] == n

    def widen(module, args, kwargs):
        return args, kwargs | {"memory": kwargs["memory"].float()}

    handle = reference_predictor.memory_attention.register_forward_pre_hook(widen,
                                                                            with_kwargs=True)
    try:
        state = reference_state(reference_predictor, session)
        ref_add(reference_predictor, state, 1, 1, points=POS_POINTS, labels=POS_LABELS)
        ref_add(reference_predictor, state, obj2_frame, 2, points=obj2_points, labels=[1, 1])
        ref = ref_propagate(reference_predictor, state, start, n - 1)
        ref |= ref_propagate(reference_predictor, state, start, 0)
    finally:
        handle.remove()
    assert_informative(ref, obj_ids=(1, 2))
    assert_same_labels(server_masks(session, range(n)), ref)


# ----------------------------------------------------------------------------- 5. boxes
BOX = [18, 38, 72, 82]


@pytest.mark.parametrize("with_points", [False, True], ids=["box", "box+points"])
def test_box_prompt(manager, video, reference_predictor, with_points):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    points, labels = ([[45, 55], [100, 100]], [1, 0]) if with_points else (None, None)
    manager.add_prompt(sid, 0, 1, points=points, labels=labels, box=BOX)
    annotated = server_mask(session, 0)
    manager.propagate(sid, 0, n - 1)

    state = reference_state(reference_predictor, session)
    kwargs = {"points": points, "labels": labels} if with_points else {}
    ref0 = ref_add(reference_predictor, state, 0, 1, box=BOX, **kwargs)
    assert_same_labels({0: annotated}, {0: ref0})
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref)
    assert_same_labels(server_masks(session, range(n)), ref)


def test_box_added_by_refine_to_existing_points(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    before = server_mask(session, 0)
    manager.add_prompt(sid, 0, 1, box=BOX, append=True)
    refined = server_mask(session, 0)
    manager.propagate(sid, 0, n - 1)
    current = manager.store.describe(sid)["current_prompts"]["1"]["0"]
    assert current["box"] == BOX
    assert current["points"] == [[45.0, 55.0], [60.0, 65.0]] and current["labels"] == [1, 1]

    state = reference_state(reference_predictor, session)
    ref_before = ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    ref_refined = ref_add(reference_predictor, state, 0, 1, box=BOX, points=POS_POINTS,
                          labels=POS_LABELS, clear_old_points=True)
    assert_same_labels({0: before}, {0: ref_before})
    assert_same_labels({0: refined}, {0: ref_refined})
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref)
    assert_same_labels(server_masks(session, range(n)), ref)


# ----------------------------------------------------------------------------- 6. mask prompt
def test_mask_prompt(manager, video, reference_predictor):
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    mask = np.zeros((session.info.height, session.info.width), np.uint8)
    mask[40:80, 16:69] = 255  # the yellow box on frame 0
    manager.add_prompt(sid, 0, 1, mask=mask)
    annotated = server_mask(session, 0)
    manager.propagate(sid, 0, n - 1)

    state = reference_state(reference_predictor, session)
    _, obj_ids, m0 = reference_predictor.add_new_mask(state, 0, 1, mask > 0)
    assert_same_labels({0: annotated}, {0: ref_label_map(m0, obj_ids)})
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref)
    assert_same_labels(server_masks(session, range(n)), ref)


# ----------------------------------------------------------------------------- 7. scores
def _ref_output(state, obj_idx: int, frame_idx: int, temp: bool = False) -> dict:
    key = "temp_output_dict_per_obj" if temp else "output_dict_per_obj"
    per_obj = state[key][obj_idx]
    out = per_obj["cond_frame_outputs"].get(frame_idx)
    if out is None:
        out = per_obj["non_cond_frame_outputs"].get(frame_idx)
    assert out is not None, (obj_idx, frame_idx, temp)
    return out


def test_scores_match_reference_object_score_logits(client, video, reference_predictor):
    """Over HTTP: masks and GET /session/{id} scores equal the reference's outputs."""
    with open(video, "rb") as f:
        r = client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    n = r.json()["num_frames"]
    session = client.manager.get(sid)
    obj2_points = [[130, 100]]

    r = client.post(f"/annotate-frame/{sid}", json={
        "frame_idx": 0, "obj_id": 1,
        "points": [{"x": x, "y": y, "label": 1} for x, y in POS_POINTS]})
    assert r.status_code == 200, r.text
    annotate_scores = r.json()["scores"]
    r = client.post(f"/annotate-frame/{sid}", json={
        "frame_idx": 0, "obj_id": 2, "points": [{"x": 130, "y": 100, "label": 1}]})
    assert r.status_code == 200, r.text
    frame0_scores = r.json()["scores"]
    r = client.post(f"/propagate/{sid}", json={"start_frame": 0, "end_frame": n - 1})
    assert r.status_code == 200, r.text
    r = client.get(f"/session/{sid}")
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert scores == client.manager.store.describe(sid)["scores"]

    state = reference_state(reference_predictor, session)
    ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    ref_score_1 = _ref_output(state, 0, 0, temp=True)["object_score_logits"].item()
    ref_add(reference_predictor, state, 0, 2, points=obj2_points, labels=[1])
    ref_score_2 = _ref_output(state, 1, 0, temp=True)["object_score_logits"].item()
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref, obj_ids=(1, 2))

    # Scores returned by the prompt calls (JSON object keys are strings).
    assert list(annotate_scores) == ["1"]
    assert annotate_scores["1"]["object_score"] == pytest.approx(ref_score_1, abs=1e-4)
    assert frame0_scores["1"]["object_score"] == pytest.approx(ref_score_1, abs=1e-4)
    assert frame0_scores["2"]["object_score"] == pytest.approx(ref_score_2, abs=1e-4)

    # Every frame and object after propagation.
    assert sorted(scores, key=int) == [str(f) for f in range(n)]
    for f in range(n):
        assert sorted(scores[str(f)]) == ["1", "2"], f
        for obj_idx, obj_id in enumerate((1, 2)):
            ref_logit = _ref_output(state, obj_idx, f)["object_score_logits"].item()
            got = scores[str(f)][str(obj_id)]
            assert got["object_score"] == pytest.approx(ref_logit, abs=1e-4), (f, obj_id)
            assert got["visible"] is (ref_logit > 0), (f, obj_id)
            assert got["iou"] is not None and np.isfinite(got["iou"]), (f, obj_id, got)

    # And the mask PNGs served over HTTP equal the reference.
    served = {}
    for f in range(n):
        r = client.get(f"/mask/{sid}/{f}")
        assert r.status_code == 200, r.text
        served[f] = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert_same_labels(served, ref)


def test_mask_prompt_over_http_png(client, video, reference_predictor):
    """A PNG mask sent as base64 reaches add_new_mask as the same boolean mask."""
    with open(video, "rb") as f:
        r = client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    session = client.manager.get(sid)
    mask = np.zeros((120, 160), np.uint8)
    mask[40:80, 16:69] = 1  # any non-zero pixel is the object
    ok, png = cv2.imencode(".png", mask)
    assert ok
    r = client.post(f"/annotate-frame/{sid}", json={
        "frame_idx": 0, "obj_id": 3, "mask_png_base64": base64.b64encode(png).decode()})
    assert r.status_code == 200, r.text
    state = reference_state(reference_predictor, session)
    _, obj_ids, m0 = reference_predictor.add_new_mask(state, 0, 3, mask > 0)
    ref0 = ref_label_map(m0, obj_ids)
    assert_informative({0: ref0}, obj_ids=(3,))
    assert_same_labels({0: server_mask(session, 0)}, {0: ref0})


def test_position_encodings_are_reused_and_never_changed(manager, video, predictor,
                                                         reference_predictor):
    """The server hands out one copy of each size-only position encoding
    (predictor.reuse_position_encodings): after a click and a propagation, each still equals
    what stock sam2 computes afresh, and the same memory is given each time."""
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    sid, session = open_session(manager, video)
    manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    manager.propagate(sid, 0, session.info.num_frames - 1)
    trunk, ref_trunk = predictor.image_encoder.trunk, reference_predictor.image_encoder.trunk
    side = predictor.image_size // 4  # Hiera's patch grid
    with torch.inference_mode():
        first = trunk._get_pos_embed((side, side))
        assert first is trunk._get_pos_embed((side, side))
        assert torch.equal(first, ref_trunk._get_pos_embed((side, side)))
        ours = [m for m in predictor.modules() if isinstance(m, PositionEmbeddingSine)]
        stock = [m for m in reference_predictor.modules() if isinstance(m, PositionEmbeddingSine)]
        assert len(ours) == len(stock) and any(m.cache for m in ours)
        for mine, theirs in zip(ours, stock, strict=True):
            for key in mine.cache:
                reused = mine._pe(1, torch.device("cpu"), *key)
                again = mine._pe(1, torch.device("cpu"), *key)
                assert reused.data_ptr() == again.data_ptr()  # no copy
                fresh = theirs._pe(1, torch.device("cpu"), *key)
                assert torch.equal(reused, fresh), key


# ----------------------------------------------------------------------------- 9. object batches
def _batch_sizes(module, monkeypatch, dim: int) -> list[int]:
    """The batch size of every call of ``module`` (its first tensor argument's ``dim``)."""
    sizes, forward = [], module.forward

    def spy(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        first = first[0] if isinstance(first, list) else first
        sizes.append(first.shape[dim])
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", spy)
    return sizes


def test_objects_batched_exactly_equal_meta_one_by_one(manager, video, predictor,
                                                       reference_predictor, monkeypatch):
    """Three objects tracked together (memory attention and memory encoder in one batch, mask
    decoding per object) give Meta's one-object-at-a-time masks: 0 differing pixels, forward,
    after a refinement that splits the batch, and backwards through spilled state."""
    assert predictor.object_batching == "exact", "this machine's kernels should batch exactly"
    attention = _batch_sizes(predictor.memory_attention, monkeypatch, 1)
    decoder = _batch_sizes(predictor.sam_mask_decoder, monkeypatch, 0)
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    prompts = [(1, [[45, 55]]), (2, [[130, 100]]), (3, [[20, 100], [140, 20]])]
    for obj_id, points in prompts:
        manager.add_prompt(sid, 0, obj_id, points=points, labels=[1] * len(points))
    manager.propagate(sid, 0, n - 1)
    assert 3 in attention, "the three objects never went through memory attention together"
    ours = server_masks(session, range(n))
    manager.add_prompt(sid, 5, 2, points=[[10, 10]], labels=[0], append=True)
    attention.clear()
    manager.propagate(sid, 5, 0)  # object 2 now has its own prompted frame: batches of 2 and 1
    assert sorted(set(attention)) == [1, 2]
    assert set(decoder) == {1}, "the mask decoder must see one object at a time"
    ours_after = server_masks(session, range(n))

    state = reference_state(reference_predictor, session)
    for obj_id, points in prompts:
        ref_add(reference_predictor, state, 0, obj_id, points=points, labels=[1] * len(points))
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref, obj_ids=(1, 2, 3))
    assert_same_labels(ours, ref)
    ref_add(reference_predictor, state, 5, 2, points=[[10, 10]], labels=[0])
    ref |= ref_propagate(reference_predictor, state, 5, 0)
    assert_same_labels(ours_after, ref)


def test_objects_beyond_the_batch_limit_go_in_several_batches(manager, video, predictor,
                                                             reference_predictor, monkeypatch):
    """The model's working memory grows with the batch, so a group larger than the limit is
    split; the masks stay Meta's."""
    monkeypatch.setattr(predictor, "max_batch_objects", 2)
    attention = _batch_sizes(predictor.memory_attention, monkeypatch, 1)
    sid, session = open_session(manager, video)
    n = session.info.num_frames
    prompts = [(1, [[45, 55]]), (2, [[130, 100]]), (3, [[20, 100]])]
    for obj_id, points in prompts:
        manager.add_prompt(sid, 0, obj_id, points=points, labels=[1])
    manager.propagate(sid, 0, n - 1)
    assert sorted(set(attention)) == [1, 2]

    state = reference_state(reference_predictor, session)
    for obj_id, points in prompts:
        ref_add(reference_predictor, state, 0, obj_id, points=points, labels=[1])
    ref = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_informative(ref, obj_ids=(1, 2, 3))
    assert_same_labels(server_masks(session, range(n)), ref)


def test_object_batching_falls_back_where_a_batch_rounds_differently(checkpoint, monkeypatch):
    """Where the start-up check finds a batched module giving an object other numbers than it
    gets alone, objects are tracked one by one."""
    import predictor as predictor_mod

    calls = []

    def check(*args):
        calls.append(args)
        return False

    monkeypatch.setattr(predictor_mod, "_BATCHES_EXACTLY", {})
    monkeypatch.setattr(predictor_mod, "_batches_exactly", check)
    built = predictor_mod.build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint,
                                          torch.device("cpu"), 256, 0, "exact")
    assert calls and built.object_batching == "off"
    assert not built.batch_objects and not built.heads_one_by_one


def test_the_batching_check_sees_a_batch_that_rounds_differently(predictor, monkeypatch):
    """The check itself: a memory attention whose batched output is off by one float32 step
    (far below anything a mask shows) is caught."""
    import predictor as predictor_mod

    forward = predictor.memory_attention.forward

    def off_in_batches(*args, **kwargs):
        out = forward(*args, **kwargs)
        return torch.nextafter(out, out + 1) if out.shape[1] > 1 else out

    monkeypatch.setattr(predictor_mod, "_BATCHES_EXACTLY", {})
    assert predictor_mod.batches_exactly(predictor)
    predictor_mod._BATCHES_EXACTLY.clear()
    monkeypatch.setattr(predictor.memory_attention, "forward", off_in_batches)
    assert not predictor_mod.batches_exactly(predictor)
