"""Real Hugging Face image processors (built offline): each microbatch gets its own samples' media.

The reference for microbatch k is the processor run on only the images of the samples that the
engine puts into microbatch k; the prepared chunk must equal it, value for value.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

import pp_media

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

# Images per sample, text-only samples included; sizes are (height, width).
SAMPLES = [[], [(56, 84)], [(112, 56), (84, 112)], [], [(56, 56)], [(84, 56), (56, 112), (56, 84)]]


def _images(seed: int) -> list[list[Image.Image]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            Image.fromarray(
                torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
            )
            for h, w in sample
        ]
        for sample in SAMPLES
    ]


def _engine_samples(batch_size: int, n_microbatches: int) -> list[list[int]]:
    ids = torch.arange(batch_size).view(-1, 1)
    _, chunks = split_args_kwargs_into_chunks((), {"input_ids": ids}, n_microbatches)
    return [chunk["input_ids"].view(-1).tolist() for chunk in chunks]


def _check(processor: object, fields: tuple[str, ...], n_microbatches: int) -> None:
    images = _images(seed=n_microbatches)
    flat = [image for sample in images for image in sample]
    batch = dict(processor(images=flat, return_tensors="pt"))
    batch["input_ids"] = torch.zeros(len(SAMPLES), 8, dtype=torch.long)
    batch["n_images_per_sample"] = torch.tensor([len(sample) for sample in images])
    pp_media.prepare_vlm_media_for_pp(batch, len(SAMPLES), n_microbatches)
    media = batch[pp_media.VLM_PP_MEDIA_KEY]
    assert set(fields) <= set(media)
    for k, samples in enumerate(_engine_samples(len(SAMPLES), n_microbatches)):
        own = [image for i in samples for image in images[i]]
        if not own:
            assert all(media[field][k].shape[0] == 0 for field in fields)
            continue
        expected = processor(images=own, return_tensors="pt")
        for field in fields:
            torch.testing.assert_close(media[field][k], expected[field], rtol=0, atol=0)


@pytest.mark.parametrize("n_microbatches", [1, 2, 3, 4, 6])
def test_qwen2_vl_flat_patches(n_microbatches: int) -> None:
    processor = transformers.Qwen2VLImageProcessor()
    _check(processor, ("pixel_values", "image_grid_thw"), n_microbatches)


@pytest.mark.parametrize("n_microbatches", [1, 2, 4, 5])
def test_gemma3_per_image_with_num_crops(n_microbatches: int) -> None:
    processor = transformers.Gemma3ImageProcessor()
    _check(processor, ("pixel_values", "num_crops"), n_microbatches)
