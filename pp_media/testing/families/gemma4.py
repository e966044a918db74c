"""Gemma4: per-layer inputs, keys and values shared across layers, variable-size images, videos.

The tiny text model keeps what makes Gemma4 hard to pipeline: every layer takes a per-layer
input (``hidden_size_per_layer_input``), the second half of the layers reuse the keys and values
of the last earlier layer of their type (``num_kv_shared_layers``), and full-attention layers
have their own head size (``global_head_dim``, so ``per_layer_config`` differs by layer). Images
go through the real ``Gemma4ImageProcessorPil`` at its smallest budget (70 soft tokens). Videos
are built in ``Gemma4VideoProcessor``'s output layout (it needs torchvision): see
``Gemma4Family.video_frames``.
"""

from __future__ import annotations

from typing import Any

import torch

from pp_media.testing._tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    TinyFamily,
    alternating,
    small_vision,
    tiny_family,
)

#: Pixels per patch side; the processor resizes each image to at most 70 pooled soft tokens.
PATCH = 4
POOLING = 2
SOFT_TOKENS = 70
#: Patches per frame row, real and padding: what the video processor pads every frame to.
MAX_PATCHES = SOFT_TOKENS * POOLING**2
#: Patch grids (rows, columns) a video's frames take: whole pooling windows, small so that
#: sequences stay short (the real processor scales frames to the budget; the layout is the same).
FRAME_GRIDS = ((4, 4), (4, 6), (6, 4), (6, 6))
#: Frames per video: 1 to this many.
MAX_FRAMES = 3


class _Gemma4ImageFields:
    """``Gemma4ImageProcessorPil`` as ``Gemma4Processor`` uses it: the processor drops
    ``num_soft_tokens_per_image`` (its ``unused_input_names``), which only expands the prompt's
    placeholders, so a collated batch holds ``pixel_values`` and ``image_position_ids``."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        fields = dict(self.processor(images=images, return_tensors=return_tensors))
        fields.pop("num_soft_tokens_per_image", None)
        return fields


@tiny_family
class Gemma4Family(TinyFamily):
    """Sliding and full layers alternating, the last half sharing keys and values; image blocks
    attend bidirectionally in sliding layers (``use_bidirectional_attention="vision"`` with
    ``mm_token_type_ids``). The MoE block is off, as in the Gemma4 checkpoints with per-layer
    inputs and shared keys and values (E2B, E4B)."""

    model_types = ("gemma4",)
    video_layout = "frames"
    video_frames_separately = True
    video_separators = ("boi_token_id", "eoi_token_id")

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        import transformers

        layers = text["num_hidden_layers"]
        gemma4 = {
            **text,
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 16,
            "layer_types": alternating("sliding_attention", "full_attention", layers),
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": text["vocab_size"],
            "num_kv_shared_layers": layers // 2,
            "use_bidirectional_attention": "vision",
            "final_logit_softcapping": 30.0,
        }
        vision = small_vision(
            num_key_value_heads=2,
            head_dim=16,
            patch_size=PATCH,
            pooling_kernel_size=POOLING,
            position_embedding_size=64,
        )
        return transformers.Gemma4Config(
            text_config=gemma4,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            boi_token_id=VISION_START,
            eoi_token_id=VISION_END,
            tie_word_embeddings=tie_word_embeddings,
        )

    def processor(self, config: Any) -> Any:
        import transformers

        vision = config.vision_config
        return _Gemma4ImageFields(
            transformers.Gemma4ImageProcessorPil(
                patch_size=vision.patch_size,
                pooling_kernel_size=vision.pooling_kernel_size,
                max_soft_tokens=SOFT_TOKENS,
            )
        )

    def video_frames(
        self, config: Any, generator: torch.Generator, n_videos: int, longest: bool = False
    ) -> dict[str, torch.Tensor]:
        """Videos as ``Gemma4VideoProcessor`` emits them: every video's frames concatenated,
        one row per frame padded to ``MAX_PATCHES`` patches (``pixel_values_videos [frames,
        MAX_PATCHES, 3 * PATCH**2]``), each frame's patch positions (x, y) with -1 at padding
        (``video_position_ids [frames, MAX_PATCHES, 2]``) and ``num_frames_per_video``. All
        frames of a video share its grid. ``longest``: every video of the most frames and the
        largest grid (for sizing sequences)."""
        pixels, positions, frames = [], [], []
        for _ in range(n_videos):
            if longest:
                n_frames, (rows, cols) = MAX_FRAMES, max(FRAME_GRIDS, key=lambda g: g[0] * g[1])
            else:
                n_frames = int(torch.randint(1, MAX_FRAMES + 1, (1,), generator=generator))
                rows, cols = FRAME_GRIDS[
                    int(torch.randint(len(FRAME_GRIDS), (1,), generator=generator))
                ]
            grid = torch.stack(
                torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), dim=-1
            ).reshape(rows * cols, 2)
            padded = torch.full((n_frames, MAX_PATCHES, 2), -1, dtype=torch.int64)
            padded[:, : rows * cols] = grid
            frame_pixels = torch.zeros(n_frames, MAX_PATCHES, 3 * PATCH * PATCH)
            frame_pixels[:, : rows * cols] = torch.rand(
                n_frames, rows * cols, 3 * PATCH * PATCH, generator=generator
            )
            pixels.append(frame_pixels)
            positions.append(padded)
            frames.append(n_frames)
        return {
            "pixel_values_videos": torch.cat(pixels),
            "video_position_ids": torch.cat(positions),
            "num_frames_per_video": torch.tensor(frames, dtype=torch.int64),
        }

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        """``mm_token_type_ids`` as ``Gemma4Processor`` emits them: 1 at image placeholders,
        2 at video placeholders."""
        input_ids = batch["input_ids"]
        batch["mm_token_type_ids"] = (input_ids == config.image_token_id).long() + 2 * (
            input_ids == config.video_token_id
        ).long()
