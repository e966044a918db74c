"""Aria's and Inkling's own rules, single process: Aria's placeholder rule refuses rows of a
size its projector has no queries for, by name; the Inkling layout stand-in cuts images as the
processor's ``divide_to_patches`` does (the stand-in's layout is what the parity cases split)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from pp_media._hf.batch import prepare_step_inputs
from pp_media._hf.families import adapter_for
from pp_media.testing import IMAGE_TOKEN, image_processor, tiny_config


def test_aria_rows_of_a_size_without_projector_queries_are_refused_by_name() -> None:
    """420-pixel rows give 36 patches of 70; the tiny projector maps only 49 (490 pixels)."""
    config = tiny_config("aria")
    input_ids = torch.full((2, 8), 20)
    input_ids[1, 1:5] = IMAGE_TOKEN
    batch = {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "pixel_values": torch.zeros(1, 3, 420, 420),
        "pixel_mask": torch.ones(1, 420, 420, dtype=torch.bool),
    }
    message = (
        "pp_media: aria pixel_values rows of 420x420 pixels give 36 patches, but "
        "projector_patch_to_query_dict has [49]; resize images to a side the config maps "
        "(the processor's max_image_size)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        prepare_step_inputs(batch, adapter_for(config), config, 2)


def test_the_inkling_stand_in_cuts_patches_by_the_processor_rule() -> None:
    """After the 1/8 rescale (half-up), ``ceil(H / p)`` rows of ``W // p + 1`` patches: a
    56x112 image becomes 7x14 pixels, 2 rows of 4 patches; the last column holds 2 pixel
    columns then padding (-1 before normalising), the extra one of a 56x56 image (7 // 4 + 1
    = 2 columns) 3."""
    from PIL import Image

    config = tiny_config("inkling")
    processor = image_processor(config)
    images = [Image.new("RGB", (112, 56), (255, 0, 0)), Image.new("RGB", (56, 56), (0, 0, 255))]
    out = processor(images=images, return_tensors="pt")
    assert out["num_patches"].tolist() == [8, 4]
    pixels = out["pixel_values"]
    assert list(pixels.shape) == [12, 2, 4, 4, 3]
    assert torch.equal(pixels[:, 0], pixels[:, 1]), "the image repeated over both frames"
    padding = (-1 / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    last = pixels[3, 0]  # first image, row 0, column 3: pixels 12-13, then padding
    assert torch.allclose(last[:, 2:], padding.expand(4, 2, 3))
    assert not torch.allclose(last[:, :2], padding.expand(4, 2, 3))
    second = pixels[8 + 1, 0]  # second image, row 0, column 1: pixels 4-6, then padding
    assert torch.allclose(second[:, 3:], padding.expand(4, 1, 3))
    bottom = pixels[8 + 3, 0]  # row 1 holds image rows 4-6: its 4th row is padding
    assert torch.allclose(bottom[3], padding.expand(4, 3))
