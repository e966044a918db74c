"""The collate-side public API: names, signatures, layouts, and the storage format."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

import pp_media
from pp_media import (
    _VLM_MEDIA_KEYS,
    VLM_PP_MEDIA_KEY,
    _select_image_grid,
    chunk_step3_media,
    chunk_vlm_media,
    prepare_vlm_media_for_pp,
    wrap_vlm_collate_for_pp,
)
from tests.helpers import media_batches as mb
from tests.helpers.strategies import IMAGE_LAYOUTS, build_batch, example_spec

EMPTY = inspect.Parameter.empty

#: Seed reference (pp_media_api.md): parameter names, in order, with their defaults.
SEED_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "_select_image_grid": [
        ("image_grid_hws", EMPTY),
        ("image_grid_thw", EMPTY),
        ("image_sizes", EMPTY),
        ("image_position_ids", EMPTY),
    ],
    "chunk_step3_media": [
        ("pixel_values", EMPTY),
        ("batch_size", EMPTY),
        ("n_microbatches", EMPTY),
        ("num_patches", None),
        ("patch_pixel_values", None),
        ("patch_newline_mask", None),
    ],
    "chunk_vlm_media": [
        ("pixel_values", EMPTY),
        ("image_grid", EMPTY),
        ("batch_size", EMPTY),
        ("n_microbatches", EMPTY),
        ("n_images_per_sample", None),
    ],
    "prepare_vlm_media_for_pp": [
        ("batch", EMPTY),
        ("batch_size", EMPTY),
        ("n_microbatches", EMPTY),
    ],
    "wrap_vlm_collate_for_pp": [
        ("collate_fn", EMPTY),
        ("n_microbatches", EMPTY),
    ],
}


def _media(batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    return batch[VLM_PP_MEDIA_KEY]


def _sizes(chunks: list[torch.Tensor]) -> list[int]:
    return [chunk.shape[0] for chunk in chunks]


def _assert_chunks_equal(chunks: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(chunks) == len(expected)
    for got, want in zip(chunks, expected, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert torch.equal(got, want)


# --- names ------------------------------------------------------------------------------


def test_media_key_value() -> None:
    """The storage key is the seed's string."""
    assert VLM_PP_MEDIA_KEY == "_vlm_pp_media_chunks"


#: One batch group per layout, together carrying every media field a processor may emit.
MEDIA_FIELD_GROUPS = {
    "qwen images": mb.qwen_images([0, 2, 1], [(1, 2, 2), (1, 1, 2), (1, 2, 1)]),
    "qwen videos": mb.qwen_videos([1, 0, 1], [(2, 1, 1), (1, 2, 2)]),
    "kimi": mb.kimi_images([1, 0, 2], [(1, 2), (2, 1), (1, 1)]),
    "gemma": mb.gemma_images([1, 0, 2]),
    "llava-next": mb.llava_next_images([1, 0, 2]),
    "step3": mb.step3_images([0, 2, 1]),
}


@pytest.mark.parametrize("group", MEDIA_FIELD_GROUPS)
def test_every_media_field_leaves_the_batch_for_the_stored_chunks(group: str) -> None:
    """Each seed media field a batch carries (``pp_media._VLM_MEDIA_KEYS``) is taken out of
    the batch and stored as per-microbatch chunks; the text fields stay for the engine."""
    media = mb.combine(3, MEDIA_FIELD_GROUPS[group])
    carried = set(_VLM_MEDIA_KEYS) & set(media.batch)
    assert carried, f"{group} carries no media field"
    out = prepare_vlm_media_for_pp(dict(media.batch), 3, 2)
    assert not carried & set(out), f"left in the batch: {sorted(carried & set(out))}"
    assert carried <= set(_media(out))
    assert {"input_ids", "attention_mask", "labels"} <= set(out)


def test_the_layouts_cover_every_seed_media_field() -> None:
    """Every field of the seed's ``_VLM_MEDIA_KEYS`` is exercised by one of the layouts
    above, so the test before shows each of them leaving the batch."""
    covered = set().union(*(mb.combine(3, g).batch for g in MEDIA_FIELD_GROUPS.values()))
    assert isinstance(_VLM_MEDIA_KEYS, tuple)
    assert set(_VLM_MEDIA_KEYS) <= covered, sorted(set(_VLM_MEDIA_KEYS) - covered)


def test_collate_side_names_are_public() -> None:
    """The seed's public collate-side names are in ``__all__`` and resolve to callables."""
    for name in (
        "VLM_PP_MEDIA_KEY",
        "chunk_vlm_media",
        "chunk_step3_media",
        "prepare_vlm_media_for_pp",
        "wrap_vlm_collate_for_pp",
        "move_vlm_media_to_device",
    ):
        assert name in pp_media.__all__
    for name in pp_media.__all__:
        assert hasattr(pp_media, name), name


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_signature_matches_seed(name: str) -> None:
    """Seed parameters come first, in order, positional-or-keyword, with the seed's defaults;
    anything extra is keyword-only and optional."""
    params = list(inspect.signature(getattr(pp_media, name)).parameters.values())
    seed = SEED_SIGNATURES[name]
    assert [(p.name, p.default) for p in params[: len(seed)]] == seed
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[: len(seed)])
    for extra in params[len(seed) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY, extra.name
        assert extra.default is not EMPTY, extra.name


# --- _select_image_grid -----------------------------------------------------------------


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=4)))
def test_select_image_grid_precedence(present: tuple[bool, bool, bool, bool]) -> None:
    """hws, then thw, then sizes, then position ids; None when none is given."""
    grids = [torch.ones(2, 2, dtype=torch.int64) * (k + 1) for k in range(4)]
    args = [grid if flag else None for grid, flag in zip(grids, present, strict=True)]
    chosen = _select_image_grid(*args)
    first = next((grid for grid in args if grid is not None), None)
    assert chosen is first


def test_select_image_grid_by_keyword() -> None:
    """Keyword call with the seed's names; the result is the very tensor passed in."""
    thw = torch.tensor([[1, 2, 2]])
    sizes = torch.tensor([[4, 4]])
    assert (
        _select_image_grid(
            image_grid_hws=None, image_grid_thw=thw, image_sizes=sizes, image_position_ids=None
        )
        is thw
    )


# --- chunk_vlm_media: the four layouts --------------------------------------------------


def test_chunk_vlm_media_one_full_image_per_sample() -> None:
    """Layout 1: ``[B, C, H, W]`` with a B-row grid; B=4, M=3 gives 2, 1, 1 samples."""
    pixels = torch.arange(4 * 12, dtype=torch.float32).reshape(4, 3, 2, 2)
    sizes = torch.tensor([[10, 11], [20, 21], [30, 31], [40, 41]])
    pixel_chunks, grid_chunks = chunk_vlm_media(pixels, sizes, 4, 3)
    _assert_chunks_equal(pixel_chunks, [pixels[0:2], pixels[2:3], pixels[3:4]])
    _assert_chunks_equal(grid_chunks, [sizes[0:2], sizes[2:3], sizes[3:4]])


def test_chunk_vlm_media_padded_patches_per_sample() -> None:
    """Layout 2: ``[B, max_patches, D]`` padded, one image per sample."""
    pixels = torch.arange(5 * 6 * 3, dtype=torch.float32).reshape(5, 6, 3)
    position_ids = torch.arange(5 * 6).reshape(5, 6)
    pixel_chunks, grid_chunks = chunk_vlm_media(pixels, position_ids, 5, 2)
    _assert_chunks_equal(pixel_chunks, [pixels[0:3], pixels[3:5]])
    _assert_chunks_equal(grid_chunks, [position_ids[0:3], position_ids[3:5]])


def test_chunk_vlm_media_flat_with_counts() -> None:
    """Layout 3: flat patches, ``n_images_per_sample`` maps samples to images."""
    grid = torch.tensor([[1, 2, 2], [1, 1, 2], [2, 1, 1], [1, 1, 1]])  # 4 + 2 + 2 + 1 patches
    pixels = torch.arange(9 * 4, dtype=torch.float32).reshape(9, 4)
    counts = torch.tensor([0, 2, 1, 0, 1])
    pixel_chunks, grid_chunks = chunk_vlm_media(pixels, grid, 5, 2, counts)
    # engine: samples [0, 1, 2] | [3, 4] -> images [0, 1, 2] | [3] -> patches [0, 8) | [8, 9)
    _assert_chunks_equal(pixel_chunks, [pixels[0:8], pixels[8:9]])
    _assert_chunks_equal(grid_chunks, [grid[0:3], grid[3:4]])


def test_chunk_vlm_media_flat_one_image_per_sample() -> None:
    """Layout 4: flat patches and ``n_images == batch_size`` without counts."""
    grid = torch.tensor([[1, 1, 1], [1, 2, 2], [1, 1, 2], [1, 1, 3]])  # 1 + 4 + 2 + 3 patches
    pixels = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    pixel_chunks, grid_chunks = chunk_vlm_media(pixels, grid, 4, 3)
    _assert_chunks_equal(pixel_chunks, [pixels[0:5], pixels[5:7], pixels[7:10]])
    _assert_chunks_equal(grid_chunks, [grid[0:2], grid[2:3], grid[3:4]])


@pytest.mark.parametrize("grid_key", ["image_grid_hws", "image_grid_thw", "image_sizes"])
def test_chunk_vlm_media_takes_selected_grid(grid_key: str) -> None:
    """What ``_select_image_grid`` returns is what ``chunk_vlm_media`` takes."""
    counts = [1, 0, 2, 1]
    group = {
        "image_grid_hws": lambda: mb.kimi_images(counts, [(1, 2), (2, 1), (1, 1), (2, 2)]),
        "image_grid_thw": lambda: mb.qwen_images(
            counts, [(1, 1, 2), (1, 2, 1), (1, 1, 1), (2, 1, 1)]
        ),
        "image_sizes": lambda: mb.llava_next_images(counts),
    }[grid_key]()
    media = mb.combine(4, group)
    batch = media.batch
    grid = _select_image_grid(
        batch.get("image_grid_hws"),
        batch.get("image_grid_thw"),
        batch.get("image_sizes"),
        batch.get("image_position_ids"),
    )
    assert grid is batch[grid_key]
    pixel_chunks, grid_chunks = chunk_vlm_media(
        batch["pixel_values"], grid, 4, 2, batch["n_images_per_sample"]
    )
    media.per_sample.pop("n_images_per_sample")
    mb.assert_chunks_aligned({"pixel_values": pixel_chunks, grid_key: grid_chunks}, media, 2)


def test_chunk_vlm_media_takes_3d_position_ids() -> None:
    """Gemma-style ``image_position_ids [n, P, 2]`` straight from ``_select_image_grid``."""
    media = mb.combine(3, mb.gemma_images([1, 0, 2], n_patches=3, two_d=True))
    batch = media.batch
    grid = _select_image_grid(None, None, None, batch["image_position_ids"])
    pixel_chunks, grid_chunks = chunk_vlm_media(
        batch["pixel_values"], grid, 3, 2, batch["n_images_per_sample"]
    )
    media.per_sample.pop("n_images_per_sample")
    chunks = {"pixel_values": pixel_chunks, "image_position_ids": grid_chunks}
    mb.assert_chunks_aligned(chunks, media, 2)


# --- chunk_step3_media ------------------------------------------------------------------


def test_chunk_step3_media_full_images_and_crops() -> None:
    """One full image per sample; crops and newline mask follow ``num_patches``."""
    pixels = torch.arange(3 * 12, dtype=torch.float32).reshape(3, 3, 2, 2)
    num_patches = torch.tensor([1, 0, 2])
    crops = torch.arange(3 * 12, dtype=torch.float32).reshape(3, 3, 2, 2) + 100
    newline = torch.tensor([True, False, True])
    out = chunk_step3_media(pixels, 3, 2, num_patches, crops, newline)
    assert set(out) == {"pixel_values", "num_patches", "patch_pixel_values", "patch_newline_mask"}
    # engine: samples [0, 1] | [2]; crops of sample 0: row 0, of sample 2: rows 1..2
    _assert_chunks_equal(out["pixel_values"], [pixels[0:2], pixels[2:3]])
    _assert_chunks_equal(out["num_patches"], [num_patches[0:2], num_patches[2:3]])
    _assert_chunks_equal(out["patch_pixel_values"], [crops[0:1], crops[1:3]])
    _assert_chunks_equal(out["patch_newline_mask"], [newline[0:1], newline[1:3]])


def test_chunk_step3_media_flat_pixels_mapped_by_num_patches() -> None:
    """A flat pixel tensor with ``sum(num_patches)`` rows is split by ``num_patches``."""
    pixels = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    num_patches = torch.tensor([2, 0, 3])
    out = chunk_step3_media(pixels, 3, 3, num_patches=num_patches)
    assert set(out) == {"pixel_values", "num_patches"}
    _assert_chunks_equal(out["pixel_values"], [pixels[0:2], pixels[2:2], pixels[2:5]])
    _assert_chunks_equal(out["num_patches"], [num_patches[0:1], num_patches[1:2], num_patches[2:3]])


def test_chunk_step3_media_num_patches_defaults_to_zeros() -> None:
    """Without ``num_patches`` every sample has zero crops; only full images are split."""
    pixels = torch.arange(5 * 12, dtype=torch.float32).reshape(5, 3, 2, 2)
    out = chunk_step3_media(pixels, 5, 2)
    assert set(out) == {"pixel_values", "num_patches"}
    _assert_chunks_equal(out["pixel_values"], [pixels[0:3], pixels[3:5]])
    for chunk, size in zip(out["num_patches"], (3, 2), strict=True):
        assert not chunk.dtype.is_floating_point
        assert chunk.shape == (size,)
        assert torch.count_nonzero(chunk) == 0


# --- prepare_vlm_media_for_pp -----------------------------------------------------------


def _qwen_counts_grids() -> tuple[list[int], list[tuple[int, int, int]]]:
    counts = [0, 2, 1, 0, 3, 1]
    return counts, [(1, 1 + g % 2, 2) for g in range(sum(counts))]


def test_prepare_images() -> None:
    """Images leave the batch; their chunks come back under the processor's names."""
    counts, grids = _qwen_counts_grids()
    media = mb.combine(6, mb.qwen_images(counts, grids))
    out = prepare_vlm_media_for_pp(media.batch, 6, 4)
    assert out is media.batch
    assert set(out) == {"input_ids", "attention_mask", "labels", VLM_PP_MEDIA_KEY}
    for key in ("input_ids", "attention_mask", "labels"):
        assert out[key] is media.originals[key]
    assert set(_media(out)) == {"pixel_values", "image_grid_thw", "n_images_per_sample"}
    mb.assert_chunks_aligned(_media(out), media, 4)


def test_prepare_videos_with_their_own_grid_and_counts() -> None:
    """Videos only: ``pixel_values_videos`` follows ``video_grid_thw`` and its own counts."""
    media = mb.combine(5, mb.qwen_videos([1, 0, 0, 2, 0], [(2, 1, 1), (1, 1, 2), (1, 2, 2)]))
    out = prepare_vlm_media_for_pp(media.batch, 5, 3)
    assert set(_media(out)) == {"pixel_values_videos", "video_grid_thw", "n_videos_per_sample"}
    mb.assert_chunks_aligned(_media(out), media, 3)


def test_prepare_images_and_videos_in_one_batch() -> None:
    """Images and videos have independent counts; each group follows the same samples."""
    counts, grids = _qwen_counts_grids()
    video_counts = [1, 0, 0, 1, 0, 2]
    video_grids = [(1, 1, 1), (2, 2, 1), (1, 1, 3), (1, 2, 1)]
    media = mb.combine(6, mb.qwen_images(counts, grids), mb.qwen_videos(video_counts, video_grids))
    out = prepare_vlm_media_for_pp(media.batch, 6, 3)
    mb.assert_chunks_aligned(_media(out), media, 3)
    assert not set(_VLM_MEDIA_KEYS) & set(out)


def test_prepare_step3_without_grid() -> None:
    """No image grid: Step3-style media split by ``num_patches``."""
    media = mb.combine(4, mb.step3_images([0, 2, 1, 0]))
    out = prepare_vlm_media_for_pp(media.batch, 4, 3)
    assert set(_media(out)) == {
        "pixel_values",
        "num_patches",
        "patch_pixel_values",
        "patch_newline_mask",
    }
    mb.assert_chunks_aligned(_media(out), media, 3)


def test_prepare_extra_image_grids_travel_along() -> None:
    """A second per-image field (``image_sizes`` beside ``image_grid_thw``) follows the images."""
    counts, grids = _qwen_counts_grids()
    fields, rows = mb.qwen_images(counts, grids)
    sizes = torch.arange(2 * len(grids)).reshape(len(grids), 2)
    fields["image_sizes"] = sizes
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rows["image_sizes"] = [sizes[s : s + n].clone() for s, n in zip(starts, counts, strict=True)]
    media = mb.combine(6, (fields, rows))
    out = prepare_vlm_media_for_pp(media.batch, 6, 4)
    mb.assert_chunks_aligned(_media(out), media, 4)


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(lambda: dict(mb.text_fields(4)), id="text-only"),
        pytest.param(lambda: {**mb.text_fields(4), "pixel_values": None}, id="media-key-none"),
        pytest.param(lambda: {"input_ids": torch.zeros(4, 2)}, id="ids-only"),
    ],
)
def test_prepare_without_media_returns_batch_unchanged(
    batch: Callable[[], dict[str, Any]],
) -> None:
    """No media: the very same object with the same keys and the same values."""
    original = batch()
    before = dict(original)
    out = prepare_vlm_media_for_pp(original, 4, 2)
    assert out is original
    assert list(out) == list(before)
    assert all(out[key] is before[key] for key in before)


def test_prepare_is_a_no_op_on_a_prepared_batch() -> None:
    """A prepared batch has no raw media left; preparing it again changes nothing."""
    counts, grids = _qwen_counts_grids()
    media = mb.combine(6, mb.qwen_images(counts, grids))
    prepare_vlm_media_for_pp(media.batch, 6, 2)
    stored = _media(media.batch)
    again = prepare_vlm_media_for_pp(media.batch, 6, 2)
    assert again is media.batch
    assert _media(again) is stored


# --- storage format ---------------------------------------------------------------------


def test_storage_format_and_empty_microbatches() -> None:
    """A dict from field names to lists of exactly M tensors; a microbatch without media
    gets an empty tensor with the field's trailing shape and dtype."""
    media = mb.combine(
        6,
        mb.qwen_images([0, 2, 0, 0, 1, 0], [(1, 1, 2), (1, 2, 1), (1, 1, 1)]),
        mb.qwen_videos([0, 0, 1, 0, 0, 0], [(1, 1, 2)]),
    )
    out = prepare_vlm_media_for_pp(media.batch, 6, 6)
    stored = _media(out)
    assert isinstance(stored, dict)
    for name, chunks in stored.items():
        assert isinstance(name, str)
        assert isinstance(chunks, list)
        assert len(chunks) == 6
        assert all(isinstance(chunk, torch.Tensor) for chunk in chunks)
    assert _sizes(stored["pixel_values"]) == [0, 4, 0, 0, 1, 0]
    assert _sizes(stored["image_grid_thw"]) == [0, 2, 0, 0, 1, 0]
    assert _sizes(stored["pixel_values_videos"]) == [0, 0, 2, 0, 0, 0]
    for name, chunks in stored.items():
        original = media.originals[name]
        for chunk in chunks:
            assert chunk.shape[1:] == original.shape[1:], name
            assert chunk.dtype == original.dtype, name
    assert stored["pixel_values"][0].shape == (0, 4)
    assert stored["image_grid_thw"][0].shape == (0, 3)
    assert stored["pixel_values_videos"][0].shape == (0, 2, 3)


def test_storage_format_empty_step3_microbatch() -> None:
    """Step3 crops of a microbatch without crops: ``[0, C, H, W]`` floats, ``[0]`` bools."""
    media = mb.combine(4, mb.step3_images([0, 0, 3, 0]))
    stored = _media(prepare_vlm_media_for_pp(media.batch, 4, 4))
    assert stored["patch_pixel_values"][0].shape == (0, 3, 2, 2)
    assert stored["patch_pixel_values"][0].dtype == torch.float32
    assert stored["patch_newline_mask"][3].shape == (0,)
    assert stored["patch_newline_mask"][3].dtype == torch.bool


@pytest.mark.parametrize("layout", IMAGE_LAYOUTS)
def test_stored_keys_are_the_batch_media_keys(layout: str) -> None:
    """The stored dict has exactly the media fields the collated batch had, no others."""
    media = build_batch(example_spec(layout))
    present = {key for key in _VLM_MEDIA_KEYS if key in media.batch}
    stored = _media(prepare_vlm_media_for_pp(media.batch, 5, 2))
    assert set(stored) == present


def test_plain_batch_keeps_processor_field_names() -> None:
    """LLaVA-1.5 / PaliGemma: only ``pixel_values`` is stored."""
    media = mb.combine(4, mb.plain_images(4))
    stored = _media(prepare_vlm_media_for_pp(media.batch, 4, 2))
    assert set(stored) == {"pixel_values"}


def test_per_image_pixels_follow_counts_without_grid() -> None:
    """Counts [2, 0, 1], no grid: sample 0's second image stays in sample 0's microbatch
    (n_images == B must not make the images split one per sample)."""
    media = mb.combine(3, mb.per_image_counted_images([2, 0, 1]))
    out = prepare_vlm_media_for_pp(media.batch, 3, 3)
    assert set(_media(out)) == {"pixel_values", "n_images_per_sample"}
    mb.assert_chunks_aligned(_media(out), media, 3)
    assert _sizes(_media(out)["pixel_values"]) == [2, 0, 1]


# --- wrap_vlm_collate_for_pp ------------------------------------------------------------


def _counts_grids(samples: list[int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Per-sample image counts and grids of the collate function below."""
    counts = [s % 3 for s in samples]
    return counts, [(1, 1, 1 + g % 2) for g in range(sum(counts))]


def _collate_with_media(samples: list[int]) -> dict[str, Any]:
    """A collate function: sample s has ``s % 3`` images."""
    return mb.combine(len(samples), mb.qwen_images(*_counts_grids(samples))).batch


def test_wrap_takes_batch_size_from_input_ids() -> None:
    """The wrapped collate splits by dim 0 of ``input_ids``."""
    collate = wrap_vlm_collate_for_pp(_collate_with_media, 3)
    samples = [1, 2, 0, 4, 5, 2, 3]
    batch = collate(samples)
    reference = mb.combine(len(samples), mb.qwen_images(*_counts_grids(samples)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", VLM_PP_MEDIA_KEY}
    mb.assert_chunks_aligned(_media(batch), reference, 3)


def test_wrap_batch_size_key_option() -> None:
    """``batch_size_key=`` (keyword-only) names another ``[B, ...]`` tensor."""

    def collate(samples: list[int]) -> dict[str, Any]:
        batch = _collate_with_media(samples)
        batch["tokens"] = batch.pop("input_ids")
        return batch

    batch = wrap_vlm_collate_for_pp(collate, 2, batch_size_key="tokens")([0, 1, 2, 4])
    assert [chunk.shape[0] for chunk in _media(batch)["n_images_per_sample"]] == [2, 2]


def test_wrap_without_input_ids_is_a_clear_error() -> None:
    """Media but no ``input_ids``: a ValueError naming the missing key."""

    def collate(samples: list[int]) -> dict[str, Any]:
        batch = _collate_with_media(samples)
        del batch["input_ids"]
        return batch

    with pytest.raises(ValueError, match=r"no 'input_ids' tensor"):
        wrap_vlm_collate_for_pp(collate, 2)([0, 1, 2])


@pytest.mark.parametrize(
    "result",
    [
        pytest.param((torch.zeros(2), torch.ones(2)), id="tuple"),
        pytest.param([torch.zeros(2)], id="list"),
        pytest.param(torch.zeros(3, 2), id="tensor"),
    ],
)
def test_wrap_passes_non_mapping_results_through(result: Any) -> None:
    """A collate result that is not a mapping comes back as the very same object."""
    assert wrap_vlm_collate_for_pp(lambda samples: result, 2)([0, 1]) is result


def test_wrap_passes_batches_without_media_through() -> None:
    """Text-only batches come back unchanged (same object, same keys and values)."""
    text = mb.text_fields(3)
    before = dict(text)
    out = wrap_vlm_collate_for_pp(lambda samples: text, 2)([0, 1, 2])
    assert out is text
    assert list(out) == list(before)
    assert all(out[key] is before[key] for key in before)
