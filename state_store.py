"""Keeping SAM 2's per-frame tracking state flat in memory: recent frames in memory, the rest on disk.

Meta's predictor keeps every tracked frame's output (memory features, low-res mask logits,
object pointer, scores) in ``output_dict_per_obj[obj]["non_cond_frame_outputs"]`` on the model's
device: about 0.8 MiB per object per frame at 1024, so GPU memory grows with video length.
Tracking a frame only reads the last few frames' memories and object pointers, so this mapping
keeps the most recently used entries where they were and moves older ones to disk, loading them
back bit for bit when a re-propagation or a click needs them: masks do not change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

import torch

from timing import STAGES

_MISSING = object()


class SpillingFrameOutputs(MutableMapping):
    """frame_idx -> output dict; at most ``keep`` entries in memory, the others in ``folder``."""

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, folder: Path, keep: int, pos_enc: Callable[[], list | None]):
        with self._counter_lock:
            SpillingFrameOutputs._counter += 1
            uid = SpillingFrameOutputs._counter
        self.folder = Path(folder) / f"obj{uid:04d}"
        self.keep = max(1, keep)
        self._pos_enc = pos_enc  # maskmem_pos_enc is a shared constant: not stored per frame
        self._mem: OrderedDict[int, dict] = OrderedDict()
        self._disk: set[int] = set()
        self.loads = 0
        self.spills = 0

    # -- mapping protocol -------------------------------------------------------------------
    def __getitem__(self, frame_idx: int) -> dict:
        out = self._mem.get(frame_idx)
        if out is not None:
            self._mem.move_to_end(frame_idx)
            return out
        if frame_idx not in self._disk:
            raise KeyError(frame_idx)
        out = self._load(frame_idx)
        self._disk.discard(frame_idx)
        self._path(frame_idx).unlink(missing_ok=True)
        self._mem[frame_idx] = out
        self._evict()
        return out

    def __setitem__(self, frame_idx: int, out: dict) -> None:
        if frame_idx in self._disk:
            self._disk.discard(frame_idx)
            self._path(frame_idx).unlink(missing_ok=True)
        self._mem[frame_idx] = out
        self._mem.move_to_end(frame_idx)
        self._evict()

    def __delitem__(self, frame_idx: int) -> None:
        if self._mem.pop(frame_idx, None) is not None:
            return
        if frame_idx in self._disk:
            self._disk.discard(frame_idx)
            self._path(frame_idx).unlink(missing_ok=True)
            return
        raise KeyError(frame_idx)

    def __contains__(self, frame_idx: object) -> bool:
        return frame_idx in self._mem or frame_idx in self._disk

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._mem) | self._disk))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def pop(self, frame_idx: int, default=_MISSING):
        # sam2 only pops to discard, but a mapping's pop returns the value: read it back.
        if frame_idx in self._mem:
            return self._mem.pop(frame_idx)
        if frame_idx in self._disk:
            out = self[frame_idx]
            del self._mem[frame_idx]
            return out
        if default is _MISSING:
            raise KeyError(frame_idx)
        return default

    def clear(self) -> None:
        self._mem.clear()
        for frame_idx in self._disk:
            self._path(frame_idx).unlink(missing_ok=True)
        self._disk.clear()

    # -- what is where ---------------------------------------------------------------------
    @property
    def in_memory(self) -> int:
        return len(self._mem)

    @property
    def on_disk(self) -> int:
        return len(self._disk)

    def _path(self, frame_idx: int) -> Path:
        return self.folder / f"{frame_idx:06d}.pt"

    def _evict(self) -> None:
        while len(self._mem) > self.keep:
            frame_idx, out = self._mem.popitem(last=False)
            self._save(frame_idx, out)
            self._disk.add(frame_idx)

    def _save(self, frame_idx: int, out: dict) -> None:
        with STAGES("state_spill"):
            self._save_now(frame_idx, out)

    def _save_now(self, frame_idx: int, out: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        device = None
        packed = {}
        for key, value in out.items():
            if key == "maskmem_pos_enc":
                continue
            if isinstance(value, torch.Tensor):
                device = value.device
                # clone: a slice of a batched output would otherwise save the whole batch.
                packed[key] = value.detach().to("cpu").clone()
            else:
                packed[key] = value
        packed["_device"] = str(device) if device is not None else None
        tmp = self._path(frame_idx).with_suffix(".tmp")
        torch.save(packed, tmp)
        tmp.replace(self._path(frame_idx))
        self.spills += 1

    def _load(self, frame_idx: int) -> dict:
        with STAGES("state_load"):
            return self._load_now(frame_idx)

    def _load_now(self, frame_idx: int) -> dict:
        packed = torch.load(self._path(frame_idx), map_location="cpu", weights_only=True)
        device = packed.pop("_device")
        out = {k: (v.to(device) if isinstance(v, torch.Tensor) and device else v)
               for k, v in packed.items()}
        pos_enc = self._pos_enc()
        out["maskmem_pos_enc"] = (None if pos_enc is None or out.get("maskmem_features") is None
                                  else [x.expand(1, -1, -1, -1) for x in pos_enc])
        self.loads += 1
        return out


def state_memory_report(inference_state: dict) -> dict:
    """How many tracked-frame entries each object holds in memory and on disk."""
    per_obj = {}
    for obj_idx, out_dict in inference_state.get("output_dict_per_obj", {}).items():
        non_cond = out_dict["non_cond_frame_outputs"]
        obj_id = inference_state["obj_idx_to_id"].get(obj_idx, obj_idx)
        if isinstance(non_cond, SpillingFrameOutputs):
            per_obj[obj_id] = {"in_memory": non_cond.in_memory, "on_disk": non_cond.on_disk,
                               "cond_frames": len(out_dict["cond_frame_outputs"])}
        else:
            per_obj[obj_id] = {"in_memory": len(non_cond), "on_disk": 0,
                               "cond_frames": len(out_dict["cond_frame_outputs"])}
    return per_obj
