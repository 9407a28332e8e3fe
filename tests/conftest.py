"""Shared fixtures: a random-weight SAM 2.1 hiera-tiny checkpoint, settings on tmp_path, clients."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from media import frame_rgb, make_video  # noqa: E402

from config import Settings  # noqa: E402

MODEL_CFG = "configs/sam2.1/sam2.1_hiera_t.yaml"
IMAGE_SIZE = 256
# Seed chosen so that a click gives a mask that is neither empty nor full, and a refinement
# changes it: random weights otherwise tend to give all-or-nothing masks.
CHECKPOINT_SEED = 4


def build_reference_predictor(checkpoint: Path):
    """Meta's stock predictor, configured as the server's (same overrides, no hole filling)."""
    from sam2.build_sam import build_sam2_video_predictor

    from predictor import widen_cpu_memories

    predictor = build_sam2_video_predictor(
        MODEL_CFG, str(checkpoint), device="cpu",
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}",
                               "++model.add_all_frames_to_correct_as_cond=true"])
    predictor.fill_hole_area = 0  # needs sam2._C, absent in a SAM2_BUILD_CUDA=0 install
    # Stock sam2 on the CPU raises a bf16/float32 error in some scenarios; the server widens its
    # memories (exact), and the reference gets the same widening so both run every scenario.
    widen_cpu_memories(predictor)
    return predictor


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Random weights for the real hiera-tiny architecture, in Meta's {"model": state_dict}."""
    from sam2.build_sam import build_sam2_video_predictor

    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.manual_seed(CHECKPOINT_SEED)
    model = build_sam2_video_predictor(MODEL_CFG, None, device="cpu")
    torch.save({"model": model.state_dict()}, path)

    # The masks of this seed must be informative: neither empty nor the whole frame.
    frames_dir = path.parent / "frames"
    frames_dir.mkdir()
    import cv2

    for i in range(4):
        cv2.imwrite(str(frames_dir / f"{i:05d}.jpg"), frame_rgb(i, 160, 120)[..., ::-1])
    ref = build_reference_predictor(path)
    state = ref.init_state(str(frames_dir))
    _, _, m0 = ref.add_new_points_or_box(state, 0, 1, points=[[45, 55]], labels=[1])
    fractions = [(m0 > 0).float().mean().item()]
    for _, _, masks in ref.propagate_in_video(state):
        fractions.append((masks > 0).float().mean().item())
    assert all(0.02 < f < 0.98 for f in fractions), fractions
    return path


@pytest.fixture(scope="session")
def predictor(checkpoint):
    """The server's predictor, built once for the whole run (it holds no per-session state).

    As the server builds it on the CPU (SAM2_BATCH_OBJECTS=auto, SAM2_WINDOW_PADDING=auto):
    objects whose memories line up share memory attention and the memory encoder, and the
    image encoder leaves the padded rows of Hiera's windows out of its projections, so every
    fidelity test checks both against Meta's stock predictor."""
    from predictor import build_predictor

    return build_predictor(MODEL_CFG, checkpoint, torch.device("cpu"), IMAGE_SIZE, 0, "exact",
                           "skip")


@pytest.fixture(scope="session")
def reference_predictor(checkpoint):
    return build_reference_predictor(checkpoint)


@pytest.fixture
def settings(tmp_path, checkpoint) -> Settings:
    return Settings(
        checkpoint=checkpoint, image_size=IMAGE_SIZE, device="cpu", fill_hole_area=0,
        upload_dir=tmp_path / "uploads", output_dir=tmp_path / "outputs",
        checkpoint_dir=tmp_path / "checkpoints", max_sessions=4, max_upload_mb=5,
        session_lock_timeout_s=5, _env_file=None,
    )


@pytest.fixture
def manager(settings, predictor):
    from sam2_manager import SAM2Manager

    mgr = SAM2Manager(settings, predictor=predictor)
    yield mgr
    mgr.shutdown()


@pytest.fixture
def client(settings, predictor):
    """A TestClient whose lifespan runs, on a manager sharing the session-wide predictor."""
    from fastapi.testclient import TestClient

    from main import create_app
    from sam2_manager import SAM2Manager

    mgr = SAM2Manager(settings, predictor=predictor)
    with TestClient(create_app(settings, mgr)) as c:
        c.manager = mgr
        yield c


@pytest.fixture
def video(tmp_path) -> Path:
    """8 frames, 160x120, H.264 in MP4, 24 fps."""
    return make_video(tmp_path / "in" / "clip.mp4")


@pytest.fixture
def session_id(client, video) -> str:
    with open(video, "rb") as f:
        r = client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def label_png(content: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.ndim == 2
    return img
