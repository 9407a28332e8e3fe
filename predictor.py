"""Meta's SAM2VideoPredictor, built once, fed frames lazily, reporting scores and filling holes."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import cv2
import numpy as np
import sam2.sam2_video_predictor as _sam2_vp
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.sam2_video_predictor import SAM2VideoPredictor

from exact_resize import resize_like_pil
from state_store import SpillingFrameOutputs
from timing import STAGES
from window_attention import padded_blocks, skip_window_padding

logger = logging.getLogger(__name__)

# propagate_in_video draws its own tqdm bar on stderr for every call; the server reports progress
# through jobs and the CLI draws its own bar, so silence sam2's.
_sam2_vp.tqdm = lambda iterable, *args, **kwargs: iterable

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
MAX_BATCH_OBJECTS = 8


class TrackingPredictor(SAM2VideoPredictor):
    """SAM2VideoPredictor that keeps the predicted IoU and fills small holes without ``sam2._C``.

    ``track_step`` drops the mask decoder's IoU prediction; we capture it per thread (sessions may
    run model calls concurrently) and store it next to ``object_score_logits`` in each output.
    Meta's hole filling needs the CUDA extension, which a ``SAM2_BUILD_CUDA=0`` install lacks, so
    ``fill_hole_area`` is switched off in the model and done here with OpenCV instead.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hole_area = 0
        # "off": one object at a time, as Meta's loop; "on": objects whose memories line up
        # go through the whole model as one batch; "exact": only memory attention and the
        # memory encoder do, and the prompt encoder and mask decoder run object by object
        # (their few-token matrix products round differently in a batch).
        self.object_batching = "off"
        # Objects per batch: the model's working memory grows with the batch (at 1024, memory
        # attention's MLP alone holds 32 MiB per object), so larger groups go in several.
        self.max_batch_objects = MAX_BATCH_OBJECTS
        self._tls = threading.local()

    @property
    def batch_objects(self) -> bool:
        return self.object_batching != "off"

    @property
    def heads_one_by_one(self) -> bool:
        return self.object_batching == "exact"

    def _obj_id_to_idx(self, inference_state, obj_id):
        obj_idx = super()._obj_id_to_idx(inference_state, obj_id)
        spill_dir = inference_state.get("spill_dir")
        outputs = inference_state["output_dict_per_obj"][obj_idx]
        if spill_dir is not None and not isinstance(outputs["non_cond_frame_outputs"],
                                                     SpillingFrameOutputs):
            constants = inference_state["constants"]
            outputs["non_cond_frame_outputs"] = SpillingFrameOutputs(
                spill_dir, inference_state["state_window"],
                lambda: constants.get("maskmem_pos_enc"))
        return obj_idx

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None,
                           high_res_features=None, multimask_output=False):
        size = backbone_features.size(0)
        if getattr(self._tls, "heads_alone", False) and size > 1 and point_inputs is None \
                and mask_inputs is None:
            # Each object's slice has the strides its one-object tensor has in Meta's loop.
            parts = [super(TrackingPredictor, self)._forward_sam_heads(
                backbone_features[k:k + 1], None, None,
                None if high_res_features is None else [h[k:k + 1] for h in high_res_features],
                multimask_output) for k in range(size)]
            out = tuple(torch.cat(values, dim=0) for values in zip(*parts, strict=True))
        else:
            out = super()._forward_sam_heads(backbone_features, point_inputs, mask_inputs,
                                             high_res_features, multimask_output)
        ious = out[2]
        self._tls.iou = ious.max(dim=-1).values if multimask_output else ious[:, 0]
        return out

    def _run_single_frame_inference(self, *args, **kwargs):
        self._tls.iou = None
        compact, pred_masks_gpu = super()._run_single_frame_inference(*args, **kwargs)
        compact["maskmem_features"] = self._memory_dtype(compact["maskmem_features"])
        if self.hole_area > 0:
            pred_masks_gpu = fill_small_holes(pred_masks_gpu, self.hole_area)
            storage = compact["pred_masks"].device
            compact["pred_masks"] = pred_masks_gpu.to(storage, non_blocking=True)
        iou = self._tls.iou
        compact["iou"] = iou.float() if iou is not None else None
        return compact, pred_masks_gpu

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        # sam2 caches the image features of the last frame it encoded only, so a click on a
        # prompted frame after a propagation runs the image encoder again. The features of the
        # most recently prompted frames are kept here too (they depend on the frame alone).
        kept = inference_state.get("kept_features")
        if kept is not None and frame_idx in kept:
            kept.move_to_end(frame_idx)
            if frame_idx not in inference_state["cached_features"]:
                inference_state["cached_features"] = {frame_idx: kept[frame_idx]}
        features = super()._get_image_feature(inference_state, frame_idx, batch_size)
        limit = inference_state.get("kept_features_max", 0)
        if kept is not None and limit > 0 and _is_prompted(inference_state, frame_idx):
            kept[frame_idx] = inference_state["cached_features"][frame_idx]
            kept.move_to_end(frame_idx)
            while len(kept) > limit:
                kept.popitem(last=False)
        return features


    # -- tracking several objects in one batch ------------------------------------------------
    @torch.inference_mode()
    def propagate_in_video(self, inference_state, start_frame_idx=None,
                           max_frame_num_to_track=None, reverse=False):
        """Meta's propagation; with ``batch_objects``, objects whose memories line up on a frame
        (the same prompted frames and tracked neighbours) go through the model as one batch."""
        if not self.batch_objects or self._get_obj_num(inference_state) < 2 \
                or start_frame_idx is None:
            yield from super().propagate_in_video(inference_state, start_frame_idx,
                                                  max_frame_num_to_track, reverse)
            return
        self.propagate_in_video_preflight(inference_state)
        num_frames = inference_state["num_frames"]
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else []
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)
        device = inference_state["device"]
        per_obj = inference_state["output_dict_per_obj"]
        obj_ids = inference_state["obj_ids"]
        for frame_idx in order:
            masks: list[torch.Tensor | None] = [None] * len(obj_ids)
            groups: dict[tuple, list[int]] = {}
            for obj_idx in range(len(obj_ids)):
                cond = per_obj[obj_idx]["cond_frame_outputs"]
                if frame_idx in cond:
                    masks[obj_idx] = cond[frame_idx]["pred_masks"].to(device, non_blocking=True)
                else:
                    key = self._memory_signature(per_obj[obj_idx], frame_idx, reverse)
                    groups.setdefault(key, []).append(obj_idx)
            step = max(1, self.max_batch_objects)
            batches = [group[k:k + step] for group in groups.values()
                       for k in range(0, len(group), step)]
            for group in batches:
                outs, group_masks = self._track_objects(inference_state, group, frame_idx,
                                                        reverse)
                for obj_idx, out, mask in zip(group, outs, group_masks, strict=True):
                    per_obj[obj_idx]["non_cond_frame_outputs"][frame_idx] = out
                    masks[obj_idx] = mask
            for obj_idx in range(len(obj_ids)):
                inference_state["frames_tracked_per_obj"][obj_idx][frame_idx] = {
                    "reverse": reverse}
            _, video_res_masks = self._get_orig_video_res_output(
                inference_state, torch.cat(masks, dim=0))
            yield frame_idx, obj_ids, video_res_masks

    def _memory_window(self, frame_idx: int, reverse: bool) -> list[int]:
        # The tracked frames sam2 reads for this frame: memories from the last num_maskmem - 1
        # (further back with a stride), object pointers from the last max_obj_ptrs - 1. No
        # more: with the window of SAM2_STATE_WINDOW (16) frames in memory, one frame too many
        # would read an entry back from disk for every object on every frame.
        stride = self.memory_temporal_stride_for_eval
        reach = max(self.num_maskmem * stride if stride > 1 else self.num_maskmem - 1,
                    self.max_obj_ptrs_in_encoder - 1)
        step = 1 if reverse else -1
        return [frame_idx + step * d for d in range(1, reach + 1)]

    def _memory_signature(self, output_dict: dict, frame_idx: int, reverse: bool) -> tuple:
        # Objects whose memory inputs come from the same frames build memory tensors of the
        # same shape, so they can share one batched pass through the model.
        non_cond = output_dict["non_cond_frame_outputs"]
        return (tuple(sorted(output_dict["cond_frame_outputs"])),
                tuple(t in non_cond for t in self._memory_window(frame_idx, reverse)))

    def _track_objects(self, inference_state: dict, group: list[int], frame_idx: int,
                       reverse: bool) -> tuple[list[dict], list[torch.Tensor]]:
        """Track the objects of ``group`` on ``frame_idx`` in one batch; per-object outputs."""
        size = len(group)
        dicts = [inference_state["output_dict_per_obj"][i] for i in group]
        device = inference_state["device"]

        def merged(outs: list[dict]) -> dict:
            return {
                "maskmem_features": torch.cat(
                    [o["maskmem_features"].to(device, non_blocking=True) for o in outs]),
                "maskmem_pos_enc": [x.expand(size, -1, -1, -1) for x in outs[0]["maskmem_pos_enc"]],
                "obj_ptr": torch.cat([o["obj_ptr"] for o in outs]),
            }

        batch_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        for t in dicts[0]["cond_frame_outputs"]:
            batch_dict["cond_frame_outputs"][t] = merged([d["cond_frame_outputs"][t]
                                                          for d in dicts])
        for t in self._memory_window(frame_idx, reverse):
            if t in dicts[0]["non_cond_frame_outputs"]:
                batch_dict["non_cond_frame_outputs"][t] = merged(
                    [d["non_cond_frame_outputs"][t] for d in dicts])
        _, _, feats, pos_embeds, feat_sizes = self._get_image_feature(
            inference_state, frame_idx, size)
        self._tls.iou = None
        self._tls.heads_alone = self.heads_one_by_one
        try:
            out = self.track_step(
                frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=feats,
                current_vision_pos_embeds=pos_embeds, feat_sizes=feat_sizes, point_inputs=None,
                mask_inputs=None, output_dict=batch_dict,
                num_frames=inference_state["num_frames"], track_in_reverse=reverse,
                run_mem_encoder=True)
        finally:
            self._tls.heads_alone = False
        # As _run_single_frame_inference stores one object's output, for each of the batch.
        storage = inference_state["storage_device"]
        features = out["maskmem_features"].to(torch.bfloat16).to(storage, non_blocking=True)
        pred_masks = out["pred_masks"]
        if self.hole_area > 0:
            pred_masks = fill_small_holes(pred_masks, self.hole_area)
        pos_enc = self._get_maskmem_pos_enc(inference_state, {"maskmem_pos_enc": [
            x[0:1] for x in out["maskmem_pos_enc"]]})
        iou = self._tls.iou
        outs, masks = [], []
        for k in range(size):
            mask = pred_masks[k:k + 1].clone()
            outs.append({
                "maskmem_features": self._memory_dtype(features[k:k + 1].clone()),
                "maskmem_pos_enc": pos_enc,
                "pred_masks": mask.to(storage, non_blocking=True),
                "obj_ptr": out["obj_ptr"][k:k + 1].clone(),
                "object_score_logits": out["object_score_logits"][k:k + 1].clone(),
                "iou": iou[k:k + 1].float().clone() if iou is not None else None,
            })
            masks.append(mask)
        return outs, masks

    def _run_memory_encoder(self, *args, **kwargs):
        features, pos_enc = super()._run_memory_encoder(*args, **kwargs)
        return self._memory_dtype(features), pos_enc

    def _memory_dtype(self, features: torch.Tensor | None) -> torch.Tensor | None:
        # sam2 stores memories in bf16. Under CUDA autocast that is fine, but on the CPU a frame
        # whose memories are all bf16 (no object pointer to promote the concatenation, e.g. an
        # object first prompted after the frame being tracked) reaches a float32 Linear and
        # raises a dtype error. Widening bf16 -> float32 is exact, so masks do not change.
        if features is not None and features.device.type == "cpu":
            return features.float()
        return features


def _is_prompted(inference_state: dict, frame_idx: int) -> bool:
    """Whether any object has points, a box or a mask on the frame."""
    return any(frame_idx in inputs
               for key in ("point_inputs_per_obj", "mask_inputs_per_obj")
               for inputs in inference_state[key].values())


def widen_cpu_memories(predictor: SAM2VideoPredictor) -> None:
    """Give a stock SAM2VideoPredictor the exact bf16 -> float32 widening TrackingPredictor does.

    For the references that tests and the bench drive directly: on the CPU, stock sam2 raises a
    dtype error when a frame's memories are all bf16 (see TrackingPredictor._memory_dtype).
    """
    single, encoder = predictor._run_single_frame_inference, predictor._run_memory_encoder

    def run_single(*args, **kwargs):
        out, masks = single(*args, **kwargs)
        if out["maskmem_features"] is not None:
            out["maskmem_features"] = out["maskmem_features"].float()
        return out, masks

    def run_encoder(*args, **kwargs):
        features, pos = encoder(*args, **kwargs)
        return features.float(), pos

    predictor._run_single_frame_inference = run_single
    predictor._run_memory_encoder = run_encoder


def fill_small_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Set background components of at most ``max_area`` pixels to 0.1 (like sam2's CUDA kernel)."""
    holes = (mask_logits <= 0).to("cpu", torch.uint8).numpy()
    fill = np.zeros(holes.shape, dtype=bool)
    for idx in np.ndindex(holes.shape[:-2]):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(holes[idx], connectivity=8)
        small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] <= max_area) + 1
        if small.size:
            fill[idx] = np.isin(labels, small)
    if not fill.any():
        return mask_logits
    return torch.where(torch.from_numpy(fill).to(mask_logits.device), 0.1, mask_logits)


class LazyFrames:
    """The ``images`` of an inference state: frame i is read from its JPEG when the model asks.

    Item i is made exactly as sam2's ``load_video_frames_from_jpg_images`` makes it (PIL resize,
    float32, then normalised), so masks equal the stock ``init_state`` on the same JPEGs. While
    the model works on frame i, the next frames in the direction of travel are prepared on
    ``prefetcher`` threads.
    """

    def __init__(self, num_frames: int, image_size: int, frame_path: Callable[[int], Path],
                 prefetcher: Executor | None = None, depth: int = 3,
                 resize_on: torch.device | None = None, normalise_on: torch.device | None = None,
                 exact_resize_on: torch.device | None = None):
        self.num_frames = num_frames
        self.image_size = image_size
        self.frame_path = frame_path
        # None: PIL, exactly as sam2 (bit-identical masks). A device: OpenCV decode, then a
        # bicubic antialiased resize there (within 2/255 of PIL; no PIL resize on the host).
        self.resize_on = resize_on
        # A device: the frame is decoded by PIL on the host, and resized there with Pillow's
        # own integer arithmetic (exact_resize): PIL's bytes, without PIL's resize on the host.
        self.exact_resize_on = exact_resize_on if resize_on is None else None
        # With exact frames and ``normalise_on`` (a CUDA model): the PIL-resized uint8 frame
        # goes there (a quarter of the float32 bytes, from pinned memory, without a sync) and is
        # made float and normalised there, by the same IEEE float32 operations: the same values.
        self.upload_to = (self.exact_resize_on or normalise_on) if resize_on is None else None
        device = resize_on or self.upload_to or torch.device("cpu")
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32, device=device)[:, None, None]
        self._std = torch.tensor(IMG_STD, dtype=torch.float32, device=device)[:, None, None]
        # sam2 divides the uint8 frame by 255 in float64, then stores float32: 256 values.
        self._unit = torch.from_numpy((np.arange(256) / 255.0).astype(np.float32)).to(device)
        self._mean_np = np.array(IMG_MEAN, dtype=np.float32)[:, None, None]
        self._std_np = np.array(IMG_STD, dtype=np.float32)[:, None, None]
        self._prefetcher = prefetcher
        self._depth = depth
        self._pending: dict[int, Future] = {}
        self._last: int | None = None

    def __len__(self) -> int:
        return self.num_frames

    def load(self, frame_idx: int) -> torch.Tensor:
        return self._to_model_input(self._read(frame_idx))

    def _read(self, frame_idx: int) -> np.ndarray:
        """Decode and resize (the slow part, done ahead on prefetch threads). No torch here:
        torch ops started on another thread bring their own busy-waiting OpenMP team, which
        slows every model call on a small machine."""
        with STAGES("frame_load"):
            if self.resize_on is not None:
                bgr = cv2.imread(str(self.frame_path(frame_idx)), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise OSError(f"cannot read frame {frame_idx}")
                return np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1))
            # As sam2's _load_img_as_tensor: PIL resize, then / 255 in float64; float32 as
            # init_state stores it; channels first, normalised as init_state does (the same
            # IEEE float32 operations in numpy as in torch, so the same values).
            with Image.open(self.frame_path(frame_idx)) as img:
                if img.mode != "RGB":  # our JPEGs are RGB already: no copy of the frame
                    img = img.convert("RGB")
                if self.exact_resize_on is not None:
                    return np.asarray(img)  # H x W x 3, resized on the device
                rgb = np.asarray(img.resize((self.image_size, self.image_size)))
            if self.upload_to is not None:
                return np.ascontiguousarray(rgb.transpose(2, 0, 1))
            chw = np.ascontiguousarray((rgb / 255.0).astype(np.float32).transpose(2, 0, 1))
            chw -= self._mean_np
            chw /= self._std_np
            return chw

    def _to_model_input(self, array: np.ndarray) -> torch.Tensor:
        if self.resize_on is not None:
            with STAGES("frame_normalise"):
                return self._resize_on_device(array)
        if self.upload_to is not None:
            with STAGES("frame_normalise"):
                return self._normalise_on_device(array)
        return torch.from_numpy(array)

    def _normalise_on_device(self, rgb: np.ndarray) -> torch.Tensor:
        """C x S x S uint8 (or, to be resized first, the decoded H x W x 3) to the model input."""
        if rgb.flags.writeable:
            rgb = torch.from_numpy(rgb)
        else:  # PIL's decoded bytes, as is: only read (copied to the device or to int32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                rgb = torch.from_numpy(rgb)
        if self.upload_to.type == "cuda":
            rgb = rgb.pin_memory().to(self.upload_to, non_blocking=True)
        elif rgb.device != self.upload_to:  # e.g. MPS with exact-device
            rgb = rgb.to(self.upload_to)
        if self.exact_resize_on is not None:
            rgb = resize_like_pil(rgb, (self.image_size, self.image_size))
        img = self._unit[rgb.long()]
        img -= self._mean
        img /= self._std
        return img

    def _resize_on_device(self, rgb_chw: np.ndarray) -> torch.Tensor:
        rgb = torch.from_numpy(rgb_chw)[None]
        if self.resize_on.type == "cuda":
            rgb = rgb.pin_memory().to(self.resize_on, non_blocking=True)
        size = (self.image_size, self.image_size)
        img = torch.nn.functional.interpolate(rgb.float(), size=size, mode="bicubic",
                                              antialias=True, align_corners=False)[0]
        img = img.round_().clamp_(0, 255).div_(255.0)  # PIL hands sam2 rounded uint8
        img -= self._mean
        img /= self._std
        return img

    def __getitem__(self, frame_idx: int) -> torch.Tensor:
        if not 0 <= frame_idx < self.num_frames:
            raise IndexError(frame_idx)
        future = self._pending.pop(frame_idx, None)
        array = future.result() if future is not None else self._read(frame_idx)
        if self._prefetcher is not None:
            step = -1 if self._last is not None and frame_idx == self._last - 1 else 1
            wanted = {frame_idx + step * k for k in range(1, self._depth + 1)}
            wanted = {i for i in wanted if 0 <= i < self.num_frames}
            for stale in set(self._pending) - wanted:
                self._pending.pop(stale).cancel()
            for i in sorted(wanted - set(self._pending)):
                self._pending[i] = self._prefetcher.submit(self._read, i)
        self._last = frame_idx
        return self._to_model_input(array)


def new_inference_state(predictor: SAM2VideoPredictor, images, video_height: int,
                        video_width: int, spill_dir: Path | None = None,
                        state_window: int = 16, kept_features: int = 0) -> dict:
    """The dict ``init_state`` builds, without loading every frame or encoding frame 0.

    With ``spill_dir``, each object's tracked-frame outputs beyond the ``state_window`` most
    recently used go to disk (see state_store). The image features of the ``kept_features``
    most recently prompted frames stay at hand (``TrackingPredictor._get_image_feature``).
    """
    device = predictor.device
    return {
        "spill_dir": spill_dir,
        "state_window": state_window,
        "images": images,
        "num_frames": len(images),
        "offload_video_to_cpu": True,
        "offload_state_to_cpu": False,
        "video_height": video_height,
        "video_width": video_width,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "kept_features": OrderedDict(),
        "kept_features_max": kept_features,
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def warm_up(predictor: SAM2VideoPredictor, frames: int = 3, objects: int = 2) -> None:
    """Run every kind of model call once on a throwaway state: a click, a second object, a
    propagation (memory encoder, memory attention, batched objects) and a refinement.

    The first CUDA call of each kind pays for context set-up, library handles and kernel
    loading (seconds on a GPU); doing it here, while /health still says 503, keeps that off the
    first user's click. Nothing is kept: the state is dropped. Call it inside inference_mode
    (and autocast on CUDA), as the server does for real work.
    """
    size = predictor.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(frames, 3, size, size, generator=gen).to(predictor.device)
    state = new_inference_state(predictor, images, size, size)
    for obj_id in range(1, objects + 1):
        point = [[size * obj_id / (objects + 1), size / 2]]
        predictor.add_new_points_or_box(state, 0, obj_id, points=point, labels=[1])
    for _ in predictor.propagate_in_video(state, start_frame_idx=0):
        pass
    predictor.add_new_points_or_box(state, frames - 1, 1, points=[[size / 4, size / 4]],
                                    labels=[0], clear_old_points=False)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    del state, images


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SAM2_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(name)


def build_predictor(config_file: str, checkpoint: Path, device: torch.device,
                    image_size: int | None, fill_hole_area: int,
                    batch_objects: str | bool = "off",
                    window_padding: str = "compute") -> TrackingPredictor:
    """Build Meta's video predictor with the overrides this server relies on.

    ``batch_objects``: "off" tracks objects one by one, as Meta's loop; "exact" batches memory
    attention and the memory encoder over objects whose memories line up, where
    ``batches_exactly`` shows that gives each object the very numbers it gets alone (else
    "off"); "on" batches the whole model (rounding differs); "auto" is "exact" where it is
    faster (on the CPU below an image size of 512), else "off". ``object_batching`` on the
    result says which one holds.

    ``window_padding``: "skip" leaves the padded rows of Hiera's windows out of the attention
    projections wherever a start-up check shows the block's output stays the same to the bit
    (``window_attention``); "compute" runs them, as sam2; "auto" is "skip" on the CPU (the
    check is not trusted on a GPU yet). ``window_padding`` on the result says which holds:
    "skip", "compute", or "none" where no window needs padding at this image size.
    """
    if window_padding not in ("auto", "skip", "compute"):
        raise ValueError(f"window_padding must be auto, skip or compute, not {window_padding!r}")
    mode = {True: "on", False: "off"}.get(batch_objects, batch_objects)
    if mode not in ("auto", "off", "on", "exact"):
        raise ValueError(f"batch_objects must be auto, off, on or exact, not {batch_objects!r}")
    overrides = [
        f"++model._target_={TrackingPredictor.__module__}.{TrackingPredictor.__qualname__}",
        # A click on an already-tracked frame must become a conditioning frame, or the next
        # propagation recomputes the correction away (sam2 #719, #731).
        "++model.add_all_frames_to_correct_as_cond=true",
    ]
    if image_size is not None:
        overrides.append(f"++model.image_size={image_size}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    predictor = build_sam2_video_predictor(
        config_file, str(checkpoint), device=str(device), hydra_overrides_extra=overrides
    )
    predictor.fill_hole_area = 0  # Meta's version needs sam2._C; ours runs in TrackingPredictor
    predictor.hole_area = fill_hole_area
    reuse_position_encodings(predictor)
    if window_padding == "auto":
        window_padding = "skip" if device.type == "cpu" else "compute"
    predictor.window_padding = _window_padding(predictor, window_padding)
    if mode == "auto":
        # Batching saves calls, which is what costs at small sizes: with 3 objects on 2 CPU
        # cores it was 25% faster at 256, level at 512 and 5% slower at 1024, where the
        # matrix products are large already. Batched GPU kernels are not checked yet.
        mode = "exact" if device.type == "cpu" and predictor.image_size < 512 else "off"
    if mode == "exact" and not batches_exactly(predictor):
        logger.warning("object batching: batched memory attention or memory encoder rounds "
                       "differently from one object at a time on this machine; objects are "
                       "tracked one by one")
        mode = "off"
    predictor.object_batching = mode
    return predictor


def _window_padding(predictor: SAM2VideoPredictor, wanted: str) -> str:
    blocks = padded_blocks(predictor, predictor.image_size)
    if not blocks:
        return "none"
    if wanted == "compute":
        return "compute"
    return "skip" if skip_window_padding(blocks, predictor.device) else "compute"


def batches_exactly(predictor: SAM2VideoPredictor) -> bool:
    """Whether memory attention and the memory encoder give each object of a batch, bit for
    bit, what they give it alone, on this machine's kernels.

    A matrix product's rounding can depend on how its rows fall into the kernel's blocks: one
    object has (image size / 16)^2 query rows and that many memory rows per frame, plus 4 per
    object pointer. The check runs both modules on random inputs laid out as in tracking, with
    1 and 2 pointers (row counts 4 and 8 past a multiple of 16), in a batch of two and one by
    one. The answer depends on the shapes and the kernels, not on the weights: it is kept per
    device, size and thread count.
    """
    key = (str(predictor.device), predictor.image_size, predictor.hidden_dim,
           predictor.mem_dim, torch.get_num_threads())
    if key not in _BATCHES_EXACTLY:
        _BATCHES_EXACTLY[key] = _batches_exactly(predictor)
    return _BATCHES_EXACTLY[key]


_BATCHES_EXACTLY: dict[tuple, bool] = {}


def _batches_exactly(predictor: SAM2VideoPredictor) -> bool:
    device, side = predictor.device, predictor.image_size // predictor.backbone_stride
    hw, dim, mem_dim = side * side, predictor.hidden_dim, predictor.mem_dim
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def image_tokens(batch: int) -> torch.Tensor:  # as _prepare_backbone_features lays them out
        return base.expand(batch, -1, -1, -1).flatten(2).permute(2, 0, 1)

    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())  # as the server runs the model
    with torch.inference_mode(), amp:
        base, base_pos = rand(1, dim, side, side), rand(1, dim, side, side)
        for pointers in (1, 2):
            rows = hw + 4 * pointers
            memory, memory_pos = rand(rows, 2, mem_dim), rand(rows, 2, mem_dim)
            curr = image_tokens(2)
            curr_pos = base_pos.expand(2, -1, -1, -1).flatten(2).permute(2, 0, 1)
            both = predictor.memory_attention(
                curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                num_obj_ptr_tokens=4 * pointers)
            for k in range(2):
                alone = predictor.memory_attention(
                    curr=[image_tokens(1)], curr_pos=[curr_pos[:, k:k + 1]],
                    memory=memory[:, k:k + 1].contiguous(),
                    memory_pos=memory_pos[:, k:k + 1].contiguous(),
                    num_obj_ptr_tokens=4 * pointers)
                if not torch.equal(both[:, k:k + 1], alone):
                    return False
        pix = base.expand(2, -1, -1, -1)
        masks = rand(2, 1, predictor.image_size, predictor.image_size)
        both = predictor.memory_encoder(pix, masks, skip_mask_sigmoid=True)["vision_features"]
        return all(torch.equal(both[k:k + 1], predictor.memory_encoder(
            pix[k:k + 1], masks[k:k + 1], skip_mask_sigmoid=True)["vision_features"])
            for k in range(2))


def reuse_position_encodings(predictor: SAM2VideoPredictor) -> None:
    """Stop recomputing, on every frame, position encodings that depend only on sizes.

    Hiera interpolates its positional embedding (bicubic) and tiles its window embedding for
    each image, and the sine encodings of the FPN levels and the memory encoder copy their
    cached tensor on each call (a 4 MiB copy at 256). Both give the same values every time, and
    sam2 only reads them (``x + pos``), so each is made once and handed out as is: the model
    sees the very same numbers (masks unchanged, checked by the fidelity tests), some 5 ms a
    frame sooner on a CPU.
    """
    trunk = getattr(predictor.image_encoder, "trunk", None)
    if trunk is not None and hasattr(trunk, "_get_pos_embed"):
        compute, made = trunk._get_pos_embed, {}

        def pos_embed(hw) -> torch.Tensor:
            key = (tuple(int(v) for v in hw), torch.is_autocast_enabled())
            found = made.get(key)
            if found is None:
                found = made[key] = compute(hw)
            return found

        trunk._get_pos_embed = pos_embed
    for module in predictor.modules():
        if isinstance(module, PositionEmbeddingSine):
            copy = module._pe

            def pe(batch, device, *key, _module=module, _copy=copy) -> torch.Tensor:
                cached = _module.cache.get(key)
                if batch == 1 and cached is not None and cached.device == device:
                    return cached[None]
                return _copy(batch, device, *key)

            module._pe = pe
