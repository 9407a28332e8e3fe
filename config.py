"""Settings for the SAM 2 video segmentation backend (env prefix ``SAM2_``, ``.env`` supported)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Canonical model name -> (Hydra config inside the sam2 package, Meta's checkpoint file name).
MODELS: dict[str, tuple[str, str]] = {
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}

# Every spelling a user may know a model by: ours, Meta's file stems, the seed's names.
MODEL_ALIASES: dict[str, str] = {
    **{name: name for name in MODELS},
    **{f"sam2.1_hiera_{name}": name for name in MODELS},
    **{f"sam2.1_hiera_{name}.pt": name for name in MODELS},
    "base+": "base_plus",
    "sam2.1_hiera_b+": "base_plus",
    "sam2_t.pt": "tiny",
    "sam2_s.pt": "small",
    "sam2_b.pt": "base_plus",
    "sam2_l.pt": "large",
    "sam2_t": "tiny",
    "sam2_s": "small",
    "sam2_b": "base_plus",
    "sam2_l": "large",
}

DEFAULT_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/{filename}"


class Settings(BaseSettings):
    """Every knob of the server and the CLI; read once, passed explicitly."""

    model_config = SettingsConfigDict(
        env_prefix="SAM2_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    model: str = Field("tiny", description="tiny | small | base_plus | large (or a known alias)")
    checkpoint: Path | None = Field(
        None, description="Checkpoint in Meta's format; default: checkpoints/<model file>"
    )
    checkpoint_dir: Path = Path("checkpoints")
    checkpoint_url: str = Field(
        DEFAULT_CHECKPOINT_URL,
        description="Download URL template for a missing checkpoint; {filename} is substituted",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    image_size: int | None = Field(
        None, ge=64, le=2048, description="Model input size override (++model.image_size)"
    )
    fill_hole_area: int = Field(
        8, ge=0, description="Fill background holes up to this many low-res pixels (0: off)"
    )

    frame_resize: Literal["auto", "exact", "device"] = Field(
        "auto", description="exact: PIL as sam2 (identical masks); device: resize on the model's "
                            "device (auto: device with CUDA)")
    batch_objects: Literal["auto", "on", "off"] = Field(
        "auto", description="Track objects whose memories line up as one batch (auto: on CUDA)")
    warm_up: bool = Field(
        True, description="Run each kind of model call once at start-up, behind /health = 503, "
                          "so the first user click does not pay for CUDA set-up")

    upload_dir: Path = Path("uploads")
    output_dir: Path = Path("outputs")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)

    max_sessions: int = Field(8, ge=1)
    session_ttl_s: float = Field(3600.0, gt=0)
    cleanup_interval_s: float = Field(60.0, gt=0)
    max_upload_mb: float = Field(2048.0, gt=0)
    max_frames: int = Field(200_000, ge=1, description="Refuse videos with more frames")
    jpeg_quality: int = Field(95, ge=1, le=100)
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"])
    session_lock_timeout_s: float = Field(
        30.0, ge=0, description="How long a request waits for a busy session before 409"
    )
    frame_wait_timeout_s: float = Field(
        120.0, gt=0, description="How long a request waits for a frame still being decoded"
    )
    state_window: int = Field(
        16, ge=1, description="Tracked frames per object kept in memory (older ones go to disk); "
                              "below 16 sequential tracking reads some back from disk")
    writer_threads: int = Field(
        0, ge=0, le=64, description="Threads writing masks/overlays (0: from the CPU count)")
    prefetch_threads: int = Field(
        0, ge=0, le=64, description="Threads preparing upcoming frames (0: from the CPU count)")

    @field_validator("model", mode="before")
    @classmethod
    def _canonical_model(cls, value: str) -> str:
        key = str(value).strip()
        canonical = MODEL_ALIASES.get(key) or MODEL_ALIASES.get(key.lower())
        if canonical is None:
            raise ValueError(
                f"unknown model {value!r}; use one of {', '.join(MODELS)} "
                f"(or sam2_t.pt / sam2_s.pt / sam2_b.pt / sam2_l.pt)"
            )
        return canonical

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # Accept "a,b" as well as the JSON list pydantic-settings expects.
        if isinstance(value, str) and not value.strip().startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def model_config_file(self) -> str:
        return MODELS[self.model][0]

    @property
    def checkpoint_filename(self) -> str:
        return MODELS[self.model][1]

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.checkpoint_dir / self.checkpoint_filename

    @property
    def checkpoint_download_url(self) -> str:
        return self.checkpoint_url.format(filename=self.checkpoint_filename)

    @property
    def writer_workers(self) -> int:
        return self.writer_threads or min(8, max(2, (os.cpu_count() or 2) // 2))

    @property
    def prefetch_workers(self) -> int:
        return self.prefetch_threads or min(4, max(1, (os.cpu_count() or 2) // 4))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@lru_cache
def get_settings() -> Settings:
    return Settings()
