"""Settings for the SAM 2 video segmentation backend (env prefix ``SAM2_``, ``.env`` supported)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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

    frame_resize: Literal["auto", "exact", "exact-device", "device"] = Field(
        "exact", description="exact: PIL as sam2 (identical masks; normalised on the GPU with "
                             "CUDA); exact-device: PIL decodes, and Pillow's resize is redone "
                             "bit for bit on the model's device (identical masks, less host "
                             "CPU); device: OpenCV decode and resize on the model's device "
                             "(masks differ); auto: the same as exact")
    batch_objects: Literal["auto", "exact", "on", "off"] = Field(
        "auto", description="Objects whose memories come from the same frames go through the "
                            "model together. exact: memory attention and the memory encoder in "
                            "one batch, mask decoding object by object, used only where a "
                            "start-up check shows each object gets the numbers it gets alone "
                            "(identical masks; else off); on: the whole model in one batch "
                            "(masks differ by rounding); off: one object at a time, as Meta's "
                            "loop; auto: exact on the CPU below an image size of 512 (where it "
                            "is faster), else off")
    window_padding: Literal["auto", "skip", "compute"] = Field(
        "auto", description="Where Hiera's attention windows overrun the feature map (tiny, "
                            "small, base+), sam2 projects the zero padding too. skip: project "
                            "the real rows only, where a start-up check shows the image "
                            "encoder's output is the same to the bit (identical masks; else "
                            "compute); compute: as sam2; auto: skip on the CPU, compute on a GPU")
    warm_up: bool = Field(
        True, description="Run each kind of model call once at start-up, behind /health = 503, "
                          "so the first user click does not pay for CUDA set-up")

    upload_dir: Path = Path("uploads")
    output_dir: Path = Path("outputs")
    host: str | None = Field(
        None, description="Listen address; default 127.0.0.1 without access keys, 0.0.0.0 with")
    port: int = Field(8000, ge=1, le=65535)

    # -- access control
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated access keys; when set, every route but /health needs "
                          "one (Authorization: Bearer <key> or X-API-Key) and sessions belong "
                          "to the key that made them")
    api_keys_file: Path | None = Field(None, description="A file of access keys, one a line")
    admin_keys: SecretStr | None = Field(
        None, description="Comma-separated keys that see and manage every session")

    max_sessions: int = Field(8, ge=1)
    session_ttl_s: float = Field(3600.0, gt=0)
    cleanup_interval_s: float = Field(60.0, gt=0)
    max_upload_mb: float = Field(2048.0, gt=0)
    max_frames: int = Field(200_000, ge=1, description="Refuse videos with more frames")
    jpeg_quality: int = Field(95, ge=1, le=100)
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS, comma-separated. Empty: any localhost "
                    "origin without keys, none with keys. '*' is refused when keys are set")
    session_lock_timeout_s: float = Field(
        30.0, ge=0, description="How long a request waits for a busy session before 409"
    )
    session_queue: int = Field(
        4, ge=0, le=64, description="Requests that may wait for one busy session; more get 409 "
                                    "at once with Retry-After")

    # -- input limits
    max_video_pixels: int = Field(
        4096 * 2160, ge=64 * 64, description="Largest width x height accepted, read from the "
                                             "stream header before anything is decoded")
    min_video_side: int = Field(16, ge=1, description="Smallest width or height accepted")
    max_json_mb: float = Field(
        24.0, gt=0, description="Largest request body other than a video upload (JSON, mask "
                                "images); refused with 413 while it arrives")
    max_disk_gb: float = Field(
        0.0, ge=0, description="Quota for the upload and output folders together; 0: none. "
                               "Past it, uploads, propagations and exports answer 507")

    # -- robustness
    model_retry_s: float = Field(
        10.0, gt=0, description="First wait before retrying a failed model load (doubles, "
                                "up to 10 minutes)")
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="On SIGTERM, how long running work may take to stop")
    frame_wait_timeout_s: float = Field(
        120.0, gt=0, description="How long a request waits for a frame still being decoded"
    )
    state_window: int = Field(
        16, ge=1, description="Tracked frames per object kept in memory (older ones go to disk); "
                              "below 16 sequential tracking reads some back from disk")
    feature_cache_frames: int = Field(
        4, ge=0, le=64, description="Prompted frames whose image features stay at hand per "
                                    "session, so clicking one again after a propagation skips "
                                    "the image encoder (about 28 MiB each at image size 1024, "
                                    "1.8 MiB at 256; 0: only the last frame, as sam2)")
    writer_threads: int = Field(
        0, ge=0, le=64, description="Threads writing masks/overlays (0: from the CPU count)")
    torch_threads: int = Field(
        0, ge=0, le=256, description="torch intra-op threads for the model (0: torch's default, "
                                     "one per core)")
    prefetch_threads: int = Field(
        0, ge=0, le=64, description="Threads preparing upcoming frames (0: from the CPU count "
                                    "with a GPU; none with the model on the CPU, where each frame "
                                    "is prepared when the model asks for it)")

    # -- Ray mode (python serve_ray.py); the single process ignores these
    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. 10.0.0.5:6379, or 'auto'); unset: start "
                          "a local one")
    ray_workers: int = Field(2, ge=1, le=256, description="Engines (Ray actors), each with "
                                                          "its own model")
    ray_gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per worker (unset: 1 where the cluster has GPUs, else 0)")
    ray_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs reserved per worker")
    ray_pin_cpus: bool = Field(
        False, description="Confine each worker to SAM2_RAY_CPUS_PER_WORKER cores of its node "
                           "(Ray reserves CPUs but does not confine a process to them)")
    ray_ingress_replicas: int = Field(1, ge=1, le=64, description="HTTP ingress replicas "
                                                                  "(Ray Serve)")
    ray_call_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a worker's answer (a blocking propagation "
                                 "or export included)")

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

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"SAM2_API_KEYS_FILE={value} is not a file")
        return value

    def check_deployment(self) -> None:
        """Refuse settings that would expose a keyed server (outside validation, whose errors
        would print the keys)."""
        if self.auth_enabled and "*" in self.allowed_origins:
            raise ValueError("SAM2_ALLOWED_ORIGINS='*' is refused when access keys are set: list "
                             "the browser origins of your frontends instead")

    def access_keys(self) -> tuple[list[str], list[str]]:
        """(user keys, admin keys) from SAM2_API_KEYS, SAM2_API_KEYS_FILE and SAM2_ADMIN_KEYS."""
        def split(secret: SecretStr | str | None) -> list[str]:
            raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret or ""
            return [k.strip() for k in raw.split(",") if k.strip()]

        users = split(self.api_keys)
        if self.api_keys_file is not None:
            for line in Path(self.api_keys_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    users.append(line)
        return users, split(self.admin_keys)

    @property
    def auth_enabled(self) -> bool:
        users, admins = self.access_keys()
        return bool(users or admins)

    @property
    def listen_host(self) -> str:
        if self.host:
            return self.host
        return "0.0.0.0" if self.auth_enabled else "127.0.0.1"

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def max_disk_bytes(self) -> int | None:
        return int(self.max_disk_gb * 1024**3) if self.max_disk_gb else None

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
