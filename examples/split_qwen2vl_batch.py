"""Wrap a collate function and look at what each pipeline microbatch gets.

A Qwen2-VL-style batch: flat patches for all images of the batch, one ``image_grid_thw`` row
per image, and 0-2 images per sample. Run: ``python examples/split_qwen2vl_batch.py``.
"""

import torch

import pp_media

IMAGE_TOKEN = 151655


def collate(samples: list[dict]) -> dict:
    """What a Qwen2-VL collate returns, plus the images-per-sample count pp_media needs."""
    grids = [grid for sample in samples for grid in sample["grids"]]
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": torch.stack([sample["input_ids"] for sample in samples]),
        "pixel_values": torch.randn(patches, 1176),
        "image_grid_thw": torch.tensor(grids).reshape(-1, 3),
        "n_images_per_sample": torch.tensor([len(sample["grids"]) for sample in samples]),
    }


samples = [
    {"input_ids": torch.full((16,), i), "grids": grids}
    for i, grids in enumerate([[], [(1, 4, 4)], [(1, 2, 4), (1, 4, 6)], [], [(1, 6, 6)]])
]
collate_for_pp = pp_media.wrap_vlm_collate_for_pp(collate, n_microbatches=3)
batch = collate_for_pp(samples)

print("batch keys:", sorted(batch))
media = batch[pp_media.VLM_PP_MEDIA_KEY]
for k in range(3):
    print(
        f"microbatch {k}:",
        f"pixel_values {tuple(media['pixel_values'][k].shape)},",
        f"image_grid_thw {media['image_grid_thw'][k].tolist()}",
    )
