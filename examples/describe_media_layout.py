"""A processor whose fields the seed API does not know: describe its layout as data.

Run: ``python examples/describe_media_layout.py``. The README shows this script and its output.
"""

import torch

import pp_media

# InternVL-style images: pixel_values [tiles, C, H, W] flat over the batch, "num_patches" counts
# the tiles of each image, "n_images_per_sample" the images of each sample.
TILES = pp_media.MediaLayout(
    (
        pp_media.MediaGroup(
            "pixel_values",
            items="n_images_per_sample",  # items per sample: a [B] count
            rows=pp_media.CountRows("num_patches"),  # rows per item: a count per image
        ),
    )
)


def collate(samples: list[dict]) -> dict:
    tiles = [t for sample in samples for t in sample["tiles"]]
    return {
        "input_ids": torch.stack([sample["input_ids"] for sample in samples]),
        "pixel_values": torch.randn(sum(tiles), 3, 4, 4),
        "num_patches": torch.tensor(tiles),
        "n_images_per_sample": torch.tensor([len(sample["tiles"]) for sample in samples]),
    }


samples = [
    {"input_ids": torch.full((8,), i), "tiles": tiles}
    for i, tiles in enumerate([[6], [5], [1], [], [1, 1]])
]
collate_for_pp = pp_media.wrap_vlm_collate_for_pp(
    collate, n_microbatches=2, layout=TILES, balance_media=True
)
batch = collate_for_pp(samples)
media = batch[pp_media.VLM_PP_MEDIA_KEY]
print("sample order:", batch[pp_media.VLM_PP_SAMPLE_ORDER_KEY].tolist())
for k in range(2):
    print(
        f"microbatch {k}:",
        f"samples {batch['input_ids'][:, 0].tensor_split(2)[k].tolist()},",
        f"pixel_values {tuple(media['pixel_values'][k].shape)},",
        f"num_patches {media['num_patches'][k].tolist()}",
    )
