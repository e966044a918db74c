"""Names shared by the collate side and the stage-0 side of pp_media."""

from __future__ import annotations

#: Batch key under which the per-microbatch media chunks travel from collate to the step.
VLM_PP_MEDIA_KEY = "_vlm_pp_media_chunks"

#: Processor fields whose dim 0 is not the sample dimension (or that describe such fields).
#: ``prepare_vlm_media_for_pp`` takes every one of them out of the batch.
_VLM_MEDIA_KEYS: tuple[str, ...] = (
    "pixel_values",
    "patch_pixel_values",
    "num_patches",
    "patch_newline_mask",
    "image_grid_hws",
    "image_grid_thw",
    "image_sizes",
    "image_position_ids",
    "n_images_per_sample",
    "pixel_values_videos",
    "video_grid_thw",
    "n_videos_per_sample",
)

#: Image grid fields in the order ``_select_image_grid`` prefers them.
IMAGE_GRID_KEYS: tuple[str, ...] = (
    "image_grid_hws",
    "image_grid_thw",
    "image_sizes",
    "image_position_ids",
)

#: Per-item fields that some processors emit beside the media (Gemma3 ``num_crops``, Gemma4
#: ``num_soft_tokens_per_image``, Idefics3 ``pixel_attention_mask``, Qwen2.5-VL
#: ``second_per_grid_ts``). Their dim 0 counts the pixel rows (images, or videos), so they
#: travel with the media; left in the batch the engine would split them by rows.
IMAGE_ROW_KEYS: tuple[str, ...] = ("num_crops", "num_soft_tokens_per_image", "pixel_attention_mask")
VIDEO_ROW_KEYS: tuple[str, ...] = ("second_per_grid_ts",)

#: Fields that belong to the image group / video group of a microbatch.
IMAGE_GROUP_KEYS: frozenset[str] = frozenset(
    {
        "pixel_values",
        "patch_pixel_values",
        "num_patches",
        "patch_newline_mask",
        "n_images_per_sample",
        *IMAGE_GRID_KEYS,
        *IMAGE_ROW_KEYS,
    }
)
VIDEO_GROUP_KEYS: frozenset[str] = frozenset(
    {"pixel_values_videos", "video_grid_thw", "n_videos_per_sample", *VIDEO_ROW_KEYS}
)
