"""Test videos: re-exported from the project's synthetic video maker (also used by the bench)."""

from synthetic_video import frame_rgb, make_video, read_all_frames  # noqa: F401
