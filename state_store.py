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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from timing import STAGES

_MISSING = object()
_writer: ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()


def _spill_writer() -> ThreadPoolExecutor:
    """One thread per process writing spilled entries whose tensors live on a GPU."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = ThreadPoolExecutor(1, thread_name_prefix="state-spill")
        return _writer


class SpillingFrameOutputs(MutableMapping):
    """frame_idx -> output dict; at most ``keep`` entries in memory, the others in ``folder``.

    An entry on a GPU is spilled without stalling tracking: its tensors are copied to pinned
    host memory in stream order (no sync) and written by a background thread. Until its file is
    written, the entry itself stays at hand (at most ``IN_FLIGHT`` of them), and reading it back
    returns it as it was, without waiting for the disk.
    """

    IN_FLIGHT = 8
    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, folder: Path, keep: int, pos_enc: Callable[[], list | None],
                 background: bool | None = None):
        with self._counter_lock:
            SpillingFrameOutputs._counter += 1
            uid = SpillingFrameOutputs._counter
        self.folder = Path(folder) / f"obj{uid:04d}"
        self.keep = max(1, keep)
        self._pos_enc = pos_enc  # maskmem_pos_enc is a shared constant: not stored per frame
        self._mem: OrderedDict[int, dict] = OrderedDict()
        self._disk: set[int] = set()
        # None: in the background when an entry's tensors are on a GPU (where a copy to the host
        # would otherwise wait for all queued GPU work); True/False: always/never.
        self.background = background
        self._writing: OrderedDict[int, tuple[dict, Future]] = OrderedDict()
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
        out = self._settle(frame_idx)
        if out is None:
            out = self._load(frame_idx)
        self._disk.discard(frame_idx)
        self._path(frame_idx).unlink(missing_ok=True)
        self._mem[frame_idx] = out
        self._evict()
        return out

    def __setitem__(self, frame_idx: int, out: dict) -> None:
        if frame_idx in self._disk:
            self._settle(frame_idx)
            self._disk.discard(frame_idx)
            self._path(frame_idx).unlink(missing_ok=True)
        self._mem[frame_idx] = out
        self._mem.move_to_end(frame_idx)
        self._evict()

    def __delitem__(self, frame_idx: int) -> None:
        if frame_idx in self._disk:
            self._settle(frame_idx)
            self._mem.pop(frame_idx, None)  # where a failed write left it
            self._disk.discard(frame_idx)
            self._path(frame_idx).unlink(missing_ok=True)
            return
        if self._mem.pop(frame_idx, None) is None:
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
        self.finish_writes()
        self._mem.clear()
        for frame_idx in self._disk:
            self._path(frame_idx).unlink(missing_ok=True)
        self._disk.clear()

    def finish_writes(self) -> None:
        """Wait for the spills still being written in the background."""
        for frame_idx in list(self._writing):
            self._settle(frame_idx)

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
            self.folder.mkdir(parents=True, exist_ok=True)
            packed, on_gpu = self._pack(out)
            self.spills += 1
            if not (self.background if self.background is not None else on_gpu):
                self._write(frame_idx, packed, None)
                return
            done = None
            if on_gpu:
                done = torch.cuda.Event()
                done.record()
            future = _spill_writer().submit(self._write, frame_idx, packed, done)
            self._writing[frame_idx] = (out, future)
            for f in [f for f, (_, fut) in self._writing.items() if fut.done()]:
                self._settle(f, quiet=False)  # written: forget the entry, or raise its error
            while len(self._writing) > self.IN_FLIGHT:
                self._settle(next(iter(self._writing)), quiet=False)

    def _pack(self, out: dict) -> tuple[dict, bool]:
        device, on_gpu = None, False
        packed = {}
        for key, value in out.items():
            if key == "maskmem_pos_enc":
                continue
            if isinstance(value, torch.Tensor):
                device = value.device
                if value.device.type == "cuda":
                    # Into pinned memory, queued behind the work that made it: no sync here.
                    packed[key] = value.detach().to("cpu", non_blocking=True)
                    on_gpu = True
                else:
                    # clone: a slice of a batched output would otherwise save the whole batch.
                    packed[key] = value.detach().to("cpu").clone()
            else:
                packed[key] = value
        packed["_device"] = str(device) if device is not None else None
        return packed, on_gpu

    def _write(self, frame_idx: int, packed: dict, done) -> None:
        if done is not None:
            done.synchronize()  # the copies to the host have landed
        tmp = self._path(frame_idx).with_suffix(".tmp")
        torch.save(packed, tmp)  # no mkdir here: a session deleted meanwhile stays deleted
        tmp.replace(self._path(frame_idx))

    def _settle(self, frame_idx: int, quiet: bool = True) -> dict | None:
        """If ``frame_idx`` is being written in the background: wait for its file, and return
        the entry as it was when spilled (what a load would give back, bit for bit). A failed
        write (a full disk) leaves the entry in memory; ``quiet=False`` raises its error."""
        item = self._writing.pop(frame_idx, None)
        if item is None:
            return None
        out, future = item
        try:
            future.result()
        except Exception:
            self._disk.discard(frame_idx)
            self._mem[frame_idx] = out
            if not quiet:
                raise
        return out

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


def finish_spills(inference_state: dict | None) -> None:
    """Wait for the spills still being written, so that removing the state's folder next
    leaves nothing behind (a write landing after the removal would recreate a file)."""
    for out_dict in (inference_state or {}).get("output_dict_per_obj", {}).values():
        non_cond = out_dict["non_cond_frame_outputs"]
        if isinstance(non_cond, SpillingFrameOutputs):
            non_cond.finish_writes()


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
