"""HunyuanVideo-FramePack (``HunyuanVideoFramepackTransformer3DModel``): HunyuanVideo's blocks
over packed history tokens.

The model packs ``[4x history, 2x history, clean latents, noisy latents]`` into one image stream
(each history kind only when given, compressed by its own patch embedding) and attends over it
plus the text, as HunyuanVideo (dual-stream then single-stream blocks, the same processor).
The grid is the noisy latent window only: ``hidden_states`` ``[B, C, T, H, W]`` after patchify,
the last ``T*H*W`` tokens of the image stream. The history tokens are not on that grid (the
compressed ones have other sizes and strides); like the text they are always-attended extra keys
for every video query, and history and text queries attend all keys densely. So the sparse
method acts on attention among the noisy latents; attention to the history and the text stays
exact.
"""

from __future__ import annotations

import math

from .base import register_adapter
from .hunyuan_video import HunyuanVideoAdapter


@register_adapter
class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    name = "hunyuan_video_framepack"
    transformer_classes = ("HunyuanVideoFramepackTransformer3DModel",)

    def video_slice(self, num_tokens, attend):
        num_grid = math.prod(attend.grid)
        if num_grid > num_tokens:
            raise ValueError(
                f"the latent grid {tuple(attend.grid)} has {num_grid} tokens, more than the {num_tokens} "
                f"history and latent tokens of this call; the grid must be the noisy latents' (T, H, W) "
                f"after patchify (set it with vdiff_sparse.set_context(model, grid=...) or let the "
                f"transformer's forward pre-hook infer it)"
            )
        return slice(num_tokens - num_grid, num_tokens)
