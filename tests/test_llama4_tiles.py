"""Llama 4 images of several tiles: the stand-in lays them out as the image processor does, each
image's tiles are derived from ``aspect_ratios`` or from its tokens (as the processor's batches,
which drop ``aspect_ratios``, need), and every microbatch gets exactly its own images' tiles;
bad batches are refused by name (single process, no model)."""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict, namedtuple
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pp_media._core.bounds import sample_bounds  # noqa: E402
from pp_media._hf.batch import prepare_step_inputs, reference_batch  # noqa: E402
from pp_media._hf.families import adapter_for  # noqa: E402
from pp_media.testing import (  # noqa: E402
    IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    default_seq_len,
    synthetic_batch,
    tiny_config,
)
from pp_media.testing._synthetic import IMAGE_SIZES, _image  # noqa: E402
from pp_media.testing.families.llama4 import (  # noqa: E402
    IMAGE_MARK,
    TILE_SIZE,
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
    TileLayout,
    best_grid,
    fitted_size,
    image_prompt,
)

CONFIG = tiny_config("llama4")
ADAPTER = adapter_for(CONFIG)
PER_TILE = 4
SEQ_LEN = 160
#: Images per sample (indices into ``IMAGE_SIZES``): text-only samples, one sample of three
#: images with grids 2x2, 1x1 and 1x2, single-tile images beside multi-tile ones.
SAMPLES = [[], [5, 0, 1], [3], [], [0, 0], [2, 4], [1]]


def _processor_functions() -> dict[str, Any]:
    """``get_best_fit``, ``find_supported_resolutions`` and ``get_max_res_without_distortion``
    from transformers' Llama 4 image processor, compiled from its source: the module imports
    torchvision, which does not import beside the CPU build of torch here; these functions use
    torch only."""
    from transformers.models import llama4

    path = Path(llama4.__file__).parent / "image_processing_llama4.py"
    tree = ast.parse(path.read_text())
    wanted = {
        "get_factors",
        "get_max_res_without_distortion",
        "find_supported_resolutions",
        "get_best_fit",
    }
    body = [node for node in tree.body if getattr(node, "name", None) in wanted]
    assert {node.name for node in body} == wanted
    namespace: dict[str, Any] = {
        "torch": torch,
        "math": math,
        "defaultdict": defaultdict,
        "lru_cache": lru_cache,
        "SizeDict": Any,
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("max_patches", [1, 4, 16])
def test_the_stand_in_picks_the_processors_grid_and_size(max_patches: int) -> None:
    theirs = _processor_functions()
    size = namedtuple("Size", "height width")(TILE_SIZE, TILE_SIZE)
    resolutions = torch.tensor(theirs["find_supported_resolutions"](max_patches, size))
    sides = (20, 56, 84, 100, 112, 150, 168, 230)
    for height in sides:
        for width in sides:
            canvas = theirs["get_best_fit"]((height, width), resolutions).tolist()
            grid = best_grid(height, width, TILE_SIZE, max_patches)
            assert [grid[0] * TILE_SIZE, grid[1] * TILE_SIZE] == canvas, (height, width)
            target = (
                min(max(height, TILE_SIZE), canvas[0]),
                min(max(width, TILE_SIZE), canvas[1]),
            )
            fitted = theirs["get_max_res_without_distortion"]((height, width), target)
            assert fitted_size(height, width, grid, TILE_SIZE) == tuple(max(s, 1) for s in fitted)


def test_the_stand_in_emits_the_processors_layout() -> None:
    """Tiles of an image row by row, then its global tile; ``aspect_ratios`` per image."""
    images = [_image(torch.Generator().manual_seed(i), *IMAGE_SIZES[i]) for i in (5, 0, 3)]
    out = TileLayout(TILE_SIZE)(images)
    assert out["aspect_ratios"].tolist() == [[2, 2], [1, 1], [2, 1]]
    assert out["pixel_values"].shape == (5 + 1 + 3, 3, TILE_SIZE, TILE_SIZE)
    alone = TileLayout(TILE_SIZE)([images[2]])["pixel_values"]
    assert torch.equal(out["pixel_values"][6:], alone)
    # 112x56 fills its 2x1 canvas: tile 0 is the top half, the global tile the whole image.
    pixels = TileLayout(TILE_SIZE)._pixels(images[2], 112, 56)
    assert torch.equal(alone[0], pixels[:, :56]) and torch.equal(alone[1], pixels[:, 56:])
    assert torch.equal(alone[2], TileLayout(TILE_SIZE)._pixels(images[2], 56, 56))


def test_image_prompts_are_the_processors() -> None:
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    ids = {
        "<|image_start|>": VISION_START,
        "<|image_end|>": VISION_END,
        "<|patch|>": IMAGE_TOKEN,
        "<|image|>": IMAGE_MARK,
        "<|tile_x_separator|>": TILE_X_SEPARATOR,
        "<|tile_y_separator|>": TILE_Y_SEPARATOR,
    }
    for ratio in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)]:
        text = Llama4Processor._prompt_split_image(None, ratio, PER_TILE)
        assert image_prompt(ratio, PER_TILE) == [ids[t] for t in re.findall(r"<\|\w+\|>", text)]


# --- a batch of known images -----------------------------------------------------------------


def _images() -> list[list[Any]]:
    generator = torch.Generator().manual_seed(0)
    return [[_image(generator, *IMAGE_SIZES[i]) for i in sample] for sample in SAMPLES]


def _batch(images: list[list[Any]]) -> dict[str, torch.Tensor]:
    """The processor's output for ``images``: ``aspect_ratios`` dropped, tokens expanded."""
    flat = [image for sample in images for image in sample]
    processed = TileLayout(TILE_SIZE)(flat)
    ratios = iter(processed["aspect_ratios"].tolist())
    input_ids = torch.full((len(images), SEQ_LEN), 0)
    for row, sample in enumerate(images):
        tokens = [11, 12]
        for _ in sample:
            tokens += [*image_prompt(next(ratios), PER_TILE), 13]
        tokens += [14, 15]
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
    labels = input_ids.masked_fill(input_ids >= IMAGE_TOKEN, -100)
    return {"pixel_values": processed["pixel_values"], "input_ids": input_ids, "labels": labels}


IMAGES = _images()
BATCH = _batch(IMAGES)
RATIOS = TileLayout(TILE_SIZE)([image for sample in IMAGES for image in sample])["aspect_ratios"]
#: Tiles per image in batch order: grids 2x2, 1x1, 1x2, 2x1, 1x1, 1x1, 2x1, 1x2, 1x2 (+ global).
TILES = [5, 1, 3, 3, 1, 1, 3, 3, 3]


def test_tiles_come_from_the_tokens_and_from_aspect_ratios_alike() -> None:
    assert RATIOS.prod(-1).tolist() == [4, 1, 2, 2, 1, 1, 2, 2, 2]
    from_tokens = ADAPTER.rows_per_item(CONFIG, ADAPTER.media[0], BATCH)
    with_ratios = {**BATCH, "aspect_ratios": RATIOS}
    from_ratios = ADAPTER.rows_per_item(CONFIG, ADAPTER.media[0], with_ratios)
    assert from_tokens.tolist() == from_ratios.tolist() == TILES
    assert from_tokens.dtype == torch.int64 and sum(TILES) == BATCH["pixel_values"].shape[0]


@pytest.mark.parametrize("n_microbatches", [2, 3, 4, 7])
def test_each_microbatch_gets_exactly_its_own_images_tiles(n_microbatches: int) -> None:
    """The step's chunks equal the processor's output for each microbatch's images alone."""
    step = prepare_step_inputs(BATCH, ADAPTER, CONFIG, n_microbatches)
    bounds = sample_bounds(len(IMAGES), n_microbatches)
    for k in range(n_microbatches):
        own = [image for sample in IMAGES[bounds[k] : bounds[k + 1]] for image in sample]
        chunk = step.media["pixel_values"][k]
        if not own:
            assert chunk.shape[0] == 0
            continue
        alone = TileLayout(TILE_SIZE)(own)
        assert torch.equal(chunk, alone["pixel_values"]), f"microbatch {k}"
        tiles = alone["aspect_ratios"].prod(-1)
        assert step.media["n_tiles_per_image"][k].tolist() == (tiles + (tiles > 1)).tolist()
        counts = [len(sample) for sample in IMAGES[bounds[k] : bounds[k + 1]]]
        assert step.media["n_images_per_sample"][k].tolist() == counts


def test_the_synthetic_batch_has_multi_tile_images_and_the_step_takes_it() -> None:
    batch = synthetic_batch(CONFIG, 6, default_seq_len(CONFIG), seed=1)
    ratios = batch.pop("aspect_ratios")
    assert int(ratios.prod(-1).max()) > 1 and int(ratios.prod(-1).min()) == 1
    step = prepare_step_inputs(batch, ADAPTER, CONFIG, 4)
    tiles = torch.cat(step.media["n_tiles_per_image"])
    assert tiles.tolist() == (ratios.prod(-1) + (ratios.prod(-1) > 1)).tolist()


def test_without_start_tokens_or_aspect_ratios_each_row_is_an_image() -> None:
    """A batch that cannot tell tiles apart (no image start/end tokens, no ``aspect_ratios``):
    one row per image, as before; each row's placeholders are one tile's."""
    ids = BATCH["input_ids"]
    plain = {**BATCH, "input_ids": ids.masked_fill(ids > IMAGE_TOKEN, 20)}
    assert ADAPTER.rows_per_item(CONFIG, ADAPTER.media[0], plain) is None
    step = prepare_step_inputs(plain, ADAPTER, CONFIG, 4)
    assert "n_tiles_per_image" not in step.media
    assert sum(chunk.shape[0] for chunk in step.media["pixel_values"]) == sum(TILES)


def test_the_reference_batch_leaves_out_the_tile_counts() -> None:
    given = {**BATCH, "n_tiles_per_image": torch.tensor(TILES), "aspect_ratios": RATIOS}
    assert sorted(reference_batch(given, ADAPTER, CONFIG)) == [
        "aspect_ratios",
        "input_ids",
        "labels",
        "pixel_values",
    ]


# --- refusals --------------------------------------------------------------------------------


def _ids_with(changes: dict[tuple[int, int], int]) -> torch.Tensor:
    ids = BATCH["input_ids"].clone()
    for (row, column), value in changes.items():
        ids[row, column] = value
    return ids


def _refused(batch: dict[str, torch.Tensor]) -> str:
    before = {name: value.clone() for name, value in batch.items()}
    with pytest.raises(ValueError) as error:
        prepare_step_inputs(batch, ADAPTER, CONFIG, 4)
    assert all(torch.equal(batch[name], before[name]) for name in before), "batch untouched"
    return str(error.value)


STRUCTURE = (
    "pp_media: 'input_ids' (shape (7, 160), dtype torch.int64): expected each image's "
    "placeholder tokens (id 990) between its image start and end tokens (ids 992, 993), in one "
    "sample; sample {sample} has {found}."
)
ALTERED = " Check that no image token was altered or dropped."


def _end(row: int) -> int:
    return int((BATCH["input_ids"][row] == VISION_END).nonzero()[-1, 0])


def test_a_sample_cut_inside_an_image_is_refused() -> None:
    """Sample 6 ends inside its image (its end token and the text after it cut off)."""
    end = _end(6)
    ids = BATCH["input_ids"].clone()
    ids[6, end:] = 0
    message = STRUCTURE.format(
        sample=6,
        found="an image start token (id 992) without its end token (id 993): its sequence ends "
        "inside an image",
    )
    assert _refused({**BATCH, "input_ids": ids}) == message + (
        " The sample was truncated inside an image: truncate before an image, not inside one "
        "(or raise the maximum length)."
    )


def test_broken_image_tokens_are_refused_by_sample() -> None:
    found = "an image start token (id 992) inside another image (two starts without an end "
    found += "between them)"
    ids = _ids_with({(1, int((BATCH["input_ids"][1] == VISION_END).nonzero()[0, 0])): 5})
    assert _refused({**BATCH, "input_ids": ids}) == STRUCTURE.format(sample=1, found=found) + (
        ALTERED
    )
    ids = _ids_with({(2, int((BATCH["input_ids"][2] == VISION_START).nonzero()[0, 0])): 5})
    found = "an image end token (id 993) without a start token before it"
    assert _refused({**BATCH, "input_ids": ids}) == STRUCTURE.format(sample=2, found=found) + (
        ALTERED
    )
    ids = _ids_with({(0, 3): IMAGE_TOKEN})
    found = "1 placeholder token (id 990) outside any image's start and end tokens"
    assert _refused({**BATCH, "input_ids": ids}) == STRUCTURE.format(sample=0, found=found) + (
        " Write every image as the Llama 4 processor does (<|image_start|>, its tiles' "
        "placeholders, <|image_end|>), or pass 'n_tiles_per_image'."
    )


def test_an_image_of_no_whole_number_of_tiles_is_refused() -> None:
    """Image 3 (sample 2's 2x1 image) loses one placeholder: 11, not whole tiles of 4."""
    position = int((BATCH["input_ids"][2] == IMAGE_TOKEN).nonzero()[0, 0])
    ids = _ids_with({(2, position): 20})
    assert _refused({**BATCH, "input_ids": ids}) == (
        "pp_media: 'input_ids' (shape (7, 160), dtype torch.int64): expected a whole number "
        "(at least 1) of tiles of 4 placeholder tokens (id 990) between each image's start and "
        "end tokens (ids 992, 993); image 3 of the batch (sample 2) has 11. A tile has "
        "(vision_config.image_size // patch_size)**2 * pixel_shuffle_ratio**2 placeholders: "
        "check that the processor's patch_size and pixel_shuffle_ratio and the image "
        "processor's size match the model's vision_config."
    )


def test_tiles_that_do_not_add_up_to_the_pixel_rows_are_refused() -> None:
    pixels = BATCH["pixel_values"][:-3]  # the last image's tiles lost
    expected = (
        "pp_media: 'pixel_values' (shape (20, 3, 56, 56), dtype torch.float32): expected 23 "
        "rows: the tiles of the batch's 9 images, as {source} ([5, 1, 3, 3, 1, 1, 3, 3, 3] per "
        "image: h * w tiles, plus a global one when h * w > 1). Check that 'pixel_values' holds "
        "exactly these images' tiles, in batch order (the image processor's output for all of "
        "the batch's images)."
    )
    assert _refused({**BATCH, "pixel_values": pixels}) == expected.format(
        source="their placeholder tokens (id 990) count them"
    )
    with_ratios = {**BATCH, "pixel_values": pixels, "aspect_ratios": RATIOS}
    assert _refused(with_ratios) == expected.format(source="'aspect_ratios' counts them")


def test_aspect_ratios_that_disagree_with_the_tokens_are_refused() -> None:
    ratios = RATIOS.clone()
    ratios[4] = torch.tensor([1, 2])  # image 4 (sample 4's first) is 1x1: one tile
    assert _refused({**BATCH, "aspect_ratios": ratios}) == (
        "pp_media: 'aspect_ratios' (shape (9, 2), dtype torch.int64): expected each image's "
        "tiles (h * w, plus a global tile when h * w > 1) to be those of its placeholder tokens "
        "(id 990, 4 per tile): image 4 of the batch (sample 4) has 4, 1 tile, but its row "
        "[1, 2] gives 3 tiles. Check that 'aspect_ratios' belong to these images, in batch "
        "order, and that the processor expanded each image's tokens from its own aspect ratio."
    )
    assert _refused({**BATCH, "aspect_ratios": RATIOS[:-1]}) == (
        "pp_media: 'aspect_ratios' (shape (8, 2), dtype torch.int64): expected one row per "
        "image of input_ids: 9 (their image start and end tokens (ids 992, 993)). Check that "
        "'aspect_ratios' belong to these samples' images, in batch order."
    )
    assert _refused({**BATCH, "aspect_ratios": RATIOS - 1}) == (
        "pp_media: 'aspect_ratios' (shape (9, 2), dtype torch.int64): expected one row (tiles "
        "down, tiles across), each at least 1, per image. Pass the image processor's "
        "'aspect_ratios' unchanged."
    )
