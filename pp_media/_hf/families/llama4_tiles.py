"""Llama 4's tiles per image: how many rows of ``pixel_values`` each image has.

The image processor cuts an image into an ``h x w`` grid of ``[3, S, S]`` tiles and appends one
global tile (the whole image at ``S x S``) when ``h * w > 1``; ``pixel_values`` is every image's
tiles in batch order and ``aspect_ratios [n_images, 2]`` holds ``(h, w)``. The processor drops
``aspect_ratios`` from its output, so a batch from it says how many tiles an image has only in
its tokens: ``_prompt_split_image`` writes ``<|image_start|>``, ``per_tile`` ``<|patch|>``
placeholders per grid tile (with tile separators), ``<|image|>``, ``per_tile`` more for the
global (or only) tile, and ``<|image_end|>``. So an image's tiles are its placeholders between
its start and end tokens divided by ``per_tile``, counted here without a loop over tokens.
"""

from __future__ import annotations

import torch

from pp_media._core.errors import media_error, require_int_tensor

#: The processor's ``(tiles down, tiles across)`` of each image, when a collate keeps it.
ASPECT_RATIOS = "aspect_ratios"
#: Rows of ``pixel_values`` (tiles) of each image: derived from ``aspect_ratios`` or the tokens.
TILES = "n_tiles_per_image"


def tiles_from_aspect_ratios(ratios: torch.Tensor) -> torch.Tensor:
    """``h * w`` tiles per image, plus the global tile when ``h * w > 1``, as int64."""
    ratios = require_int_tensor(ASPECT_RATIOS, ratios, 2)
    if ratios.shape[1] != 2 or (ratios.numel() and int(ratios.min()) < 1):
        raise media_error(
            ASPECT_RATIOS,
            ratios,
            "one row (tiles down, tiles across), each at least 1, per image",
            "Pass the image processor's 'aspect_ratios' unchanged.",
        )
    grid = ratios.to(torch.int64).prod(-1)
    return grid + (grid > 1).to(torch.int64)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class ImageTokens:
    """The image structure of one batch's ``input_ids``: placeholder (``patch``), image start and
    end token ids and the placeholders of one tile."""

    def __init__(
        self, input_ids: torch.Tensor, patch: int, start: int, end: int, per_tile: int
    ) -> None:
        self.ids = require_int_tensor("input_ids", input_ids, 2)
        self.patch, self.start, self.end, self.per_tile = patch, start, end, per_tile

    @property
    def markers(self) -> str:
        """An image's start and end tokens, for messages."""
        return f"start and end tokens (ids {self.start}, {self.end})"

    def tiles(self) -> torch.Tensor | None:
        """Tiles of each image in batch order (int64), from its placeholders between its start
        and end tokens; None when ``input_ids`` hold no image start or end token (the images'
        tiles cannot be told apart then). A few small host reads (the number of images is
        data-dependent)."""
        ids = self.ids
        starts, ends, patches = ids == self.start, ids == self.end, ids == self.patch
        # Open images at each position: 1 from an image's start token up to (not at) its end.
        depth = starts.long().cumsum(1) - ends.long().cumsum(1)
        last = depth[:, -1:] if ids.shape[1] else depth.new_zeros(ids.shape[0], 1)
        bad = (depth < 0) | (depth > 1) | (patches & (depth == 0)) | (last != 0)
        n_starts, n_ends, broken = torch.stack(
            (starts.sum(), ends.sum(), bad.any(1).sum())
        ).tolist()
        if n_starts == n_ends == 0:
            return None
        if broken:
            raise self._structure_error(depth, patches)
        reached = patches.flatten().long().cumsum(0)
        # Placeholders up to each end token minus those up to its start token.
        placeholders = reached[ends.flatten()] - reached[starts.flatten()]
        tiles = placeholders // self.per_tile
        whole = (placeholders % self.per_tile == 0) & (tiles > 0)
        if not bool(whole.all()):
            image = int((~whole).nonzero()[0, 0])
            raise self._tile_error(image, int(placeholders[image]))
        return tiles

    def samples(self) -> list[int]:
        """The sample of each image, in batch order (for messages)."""
        return (self.ids == self.start).nonzero()[:, 0].tolist()

    def _structure_error(self, depth: torch.Tensor, patches: torch.Tensor) -> ValueError:
        """The first sample whose image tokens are not start, placeholders, end."""
        outside = patches & (depth == 0)
        for sample in range(depth.shape[0]):
            row = depth[sample]
            if bool((row < 0).any()):
                found = f"an image end token (id {self.end}) without a start token before it"
                fix = "Check that no image token was altered or dropped."
            elif bool((row > 1).any()):
                found = (
                    f"an image start token (id {self.start}) inside another image (two starts "
                    "without an end between them)"
                )
                fix = "Check that no image token was altered or dropped."
            elif row.numel() and int(row[-1]) != 0:
                found = (
                    f"an image start token (id {self.start}) without its end token (id "
                    f"{self.end}): its sequence ends inside an image"
                )
                fix = (
                    "The sample was truncated inside an image: truncate before an image, not "
                    "inside one (or raise the maximum length)."
                )
            elif bool(outside[sample].any()):
                found = (
                    f"{_plural(int(outside[sample].sum()), 'placeholder token')} (id "
                    f"{self.patch}) outside any image's start and end tokens"
                )
                fix = (
                    "Write every image as the Llama 4 processor does (<|image_start|>, its "
                    "tiles' placeholders, <|image_end|>), or pass 'n_tiles_per_image'."
                )
            else:
                continue
            return media_error(
                "input_ids",
                self.ids,
                f"each image's placeholder tokens (id {self.patch}) between its image "
                f"{self.markers}, in one sample; sample {sample} has {found}",
                fix,
            )
        raise AssertionError("no sample is broken")  # pragma: no cover

    def _tile_error(self, image: int, placeholders: int) -> ValueError:
        sample = self.samples()[image]
        return media_error(
            "input_ids",
            self.ids,
            f"a whole number (at least 1) of tiles of {self.per_tile} placeholder tokens (id "
            f"{self.patch}) between each image's {self.markers}; image {image} of the batch "
            f"(sample {sample}) has {placeholders}",
            "A tile has (vision_config.image_size // patch_size)**2 * pixel_shuffle_ratio**2 "
            "placeholders: check that the processor's patch_size and pixel_shuffle_ratio and the "
            "image processor's size match the model's vision_config.",
        )

    def agreement_error(
        self, ratios: torch.Tensor, from_ratios: torch.Tensor, from_tokens: torch.Tensor
    ) -> ValueError:
        """``aspect_ratios`` whose tiles (``from_ratios``) differ from the tokens' ones."""
        if from_ratios.shape[0] != from_tokens.shape[0]:
            return media_error(
                ASPECT_RATIOS,
                ratios,
                f"one row per image of input_ids: {from_tokens.shape[0]} (their image "
                f"{self.markers})",
                "Check that 'aspect_ratios' belong to these samples' images, in batch order.",
            )
        image = int((from_ratios != from_tokens).nonzero()[0, 0])
        h, w = ratios[image].tolist()
        got = int(from_ratios[image])
        tiles = int(from_tokens[image])
        return media_error(
            ASPECT_RATIOS,
            ratios,
            "each image's tiles (h * w, plus a global tile when h * w > 1) to be those of its "
            f"placeholder tokens (id {self.patch}, {self.per_tile} per tile): image {image} of "
            f"the batch (sample {self.samples()[image]}) has {tiles * self.per_tile}, "
            f"{_plural(tiles, 'tile')}, but its row [{h}, {w}] gives {_plural(got, 'tile')}",
            "Check that 'aspect_ratios' belong to these images, in batch order, and that the "
            "processor expanded each image's tokens from its own aspect ratio.",
        )


def tiles_per_image(
    tokens: ImageTokens, ratios: torch.Tensor | None, pixels: torch.Tensor
) -> torch.Tensor | None:
    """Each image's rows of ``pixels``: from ``aspect_ratios`` when given (checked against the
    tokens when they mark images), else from the tokens; None when neither tells (no
    ``aspect_ratios`` and no image start tokens: each row is then taken as an image)."""
    from_tokens = tokens.tiles()
    if ratios is not None:
        tiles = tiles_from_aspect_ratios(ratios)
        if from_tokens is not None and (
            tiles.shape != from_tokens.shape or bool((tiles != from_tokens).any())
        ):
            raise tokens.agreement_error(ratios, tiles, from_tokens)
        source = f"'{ASPECT_RATIOS}' counts them"
    elif from_tokens is None:
        return None
    else:
        tiles = from_tokens
        source = f"their placeholder tokens (id {tokens.patch}) count them"
    total = int(tiles.sum())
    if total != pixels.shape[0]:
        shown = tiles.tolist()
        shown_text = str(shown) if len(shown) <= 16 else f"{shown[:16]} ..."
        raise media_error(
            "pixel_values",
            pixels,
            f"{total} rows: the tiles of the batch's {len(shown)} images, as {source} "
            f"({shown_text} per image: h * w tiles, plus a global one when h * w > 1)",
            "Check that 'pixel_values' holds exactly these images' tiles, in batch order (the "
            "image processor's output for all of the batch's images).",
        )
    return tiles
