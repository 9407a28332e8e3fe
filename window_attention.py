"""Hiera's windowed attention without the matrix products on its padding: sam2's numbers, less work.

Hiera attends within windows of w x w tokens. Where a feature map's side is not a multiple of
w (hiera-tiny, -small and -base+: 14-token windows over a 64x64 map at 1024, over 16x16 at
256), sam2 pads the map with zeros and runs the attention's qkv and output projections over
every padded row: at 256, 784 rows for 256 tokens. A padded row's qkv is the projection of
zeros, the same for every padded row, and its output row is thrown away. Here the projections
run on the real rows only; the windows are assembled with that one projected zero row in the
padding, and the output projection runs on the real rows taken back out of the windows.
Attention itself is unchanged (padded keys still take part, as in sam2).

The attention sees the very same numbers provided a matrix product gives a row the same value
whatever the other rows are. That holds for the CPU kernels measured (MKL, contiguous inputs),
but is a property of the kernels, not of the maths: ``skip_window_padding`` checks each block
shape, on the model's device and in its precision, before using the shorter path, and leaves
any shape that differs by a single bit on sam2's path.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleBlock, do_pool

logger = logging.getLogger(__name__)


class _Layout:
    """Where each row of sam2's window layout comes from, for one (batch, height, width, window).

    ``gather[r]`` is the token (raster order over batch x height x width) in window row r, or
    the index one past the last token for a padded row. ``real[t]`` is token t's window row.
    """

    def __init__(self, batch: int, height: int, width: int, window: int, device: torch.device):
        padded_h, padded_w = height + (-height) % window, width + (-width) % window
        tokens = batch * height * width
        source = torch.full((batch, padded_h, padded_w), tokens, dtype=torch.long)
        source[:, :height, :width] = torch.arange(tokens).view(batch, height, width)
        # As sam2's window_partition orders rows: window by window, each in raster order.
        gather = source.view(batch, padded_h // window, window, padded_w // window, window)
        gather = gather.permute(0, 1, 3, 2, 4).reshape(-1)
        real = torch.empty(tokens, dtype=torch.long)
        is_real = gather < tokens
        real[gather[is_real]] = torch.nonzero(is_real).squeeze(1)
        self.windows = gather.numel() // (window * window)
        self.gather = gather.to(device)
        self.real = real.to(device)


class PaddingFreeBlock(MultiScaleBlock):
    """A Hiera block that, for the input shapes in ``exact_shapes``, skips the padded rows."""

    exact_shapes: frozenset = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        if (batch, height, width) not in self.exact_shapes:
            return super().forward(x)
        return self.forward_without_padding(x)

    def forward_without_padding(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        window, attn = self.window_size, self.attn
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = do_pool(self.proj(x), self.pool)
        layout = self._layout(batch, height, width, window, x.device)
        qkv = attn.qkv(x).reshape(batch * height * width, -1)
        qkv_of_zeros = attn.qkv(x.new_zeros(1, channels))  # what every padded row projects to
        rows = torch.cat([qkv, qkv_of_zeros.to(qkv.dtype)]).index_select(0, layout.gather)
        # From here as sam2's MultiScaleAttention, on the same values in the same layout.
        qkv = rows.reshape(layout.windows, window * window, 3, attn.num_heads, -1)
        q, k, v = torch.unbind(qkv, 2)
        side_h = side_w = window
        if attn.q_pool:
            q = do_pool(q.reshape(layout.windows, window, window, -1), attn.q_pool)
            side_h, side_w = q.shape[1:3]
            q = q.reshape(layout.windows, side_h * side_w, attn.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(layout.windows * side_h * side_w, -1)
        if self.q_stride:  # the output windows are pooled too, over the pooled map
            window = self.window_size // self.q_stride[0]
            height, width = shortcut.shape[1:3]
            layout = self._layout(batch, height, width, window, x.device)
        # Only the real rows, contiguous: a strided input takes another matmul path, whose
        # rounding differs.
        out = attn.proj(out.index_select(0, layout.real)).view(batch, height, width, -1)
        x = shortcut + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _layout(self, batch: int, height: int, width: int, window: int,
                device: torch.device) -> _Layout:
        cache = self.__dict__.setdefault("_layouts", {})
        key = (batch, height, width, window, device)
        if key not in cache:
            cache[key] = _Layout(batch, height, width, window, device)
        return cache[key]


def block_inputs(trunk: torch.nn.Module, image_size: int) -> list[tuple[MultiScaleBlock, int]]:
    """Each Hiera block with the side of the square feature map it reads at ``image_size``."""
    conv = trunk.patch_embed.proj
    side = (image_size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    inputs = []
    for block in trunk.blocks:
        inputs.append((block, side))
        if block.q_stride:
            side //= block.q_stride[0]
    return inputs


def padded_blocks(model: torch.nn.Module, image_size: int) -> list[tuple[MultiScaleBlock, int]]:
    """The Hiera blocks of ``model`` whose windows need padding at ``image_size``, each with the
    side of its input feature map."""
    trunk = getattr(getattr(model, "image_encoder", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks"):
        return []
    return [(block, side) for block, side in block_inputs(trunk, image_size)
            if isinstance(block, MultiScaleBlock) and block.window_size > 0
            and side % block.window_size != 0]


def skip_window_padding(blocks: list[tuple[MultiScaleBlock, int]], device: torch.device) -> int:
    """Let each of ``blocks`` (as ``padded_blocks`` lists them) skip its padding, where a check
    on this device shows the output stays the same to the bit; the number of blocks that do."""
    skipped, checked = 0, {}
    for block, side in blocks:
        block.__class__ = PaddingFreeBlock
        # Exactness depends on the kernels and the shapes, not on the weights: one block per
        # kind of shape is checked.
        kind = (side, block.dim, block.dim_out, block.window_size, block.q_stride)
        if kind not in checked:
            checked[kind] = _same_output(block, side, device)
        if checked[kind]:
            block.exact_shapes = frozenset({(1, side, side)})
            skipped += 1
    failed = [kind for kind, same in checked.items() if not same]
    if failed:
        logger.warning("window padding: %d block shape(s) round differently without the "
                       "padded rows on this machine; they keep sam2's padded path",
                       len(failed))
    return skipped


def _same_output(block: PaddingFreeBlock, side: int, device: torch.device) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, side, side, block.dim, generator=gen).to(device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())  # as the server runs the model
    with torch.inference_mode(), amp:
        return torch.equal(MultiScaleBlock.forward(block, x), block.forward_without_padding(x))
