"""Media layouts described as data: which fields a batch's media have and how they map to samples.

In the spirit of torch's ``TensorChunkSpec``, a ``MediaGroup`` says, per field, what its dim 0
counts: samples, items (images, videos, crops) or rows of the pixel tensor (patches, frames).
How many items each sample has (``items``: a ``[B]`` count field, or ``missing_items`` each)
and how many rows each item has (``rows``: a grid product, a count, or one) is all the core
needs to keep every field with its samples. The core interprets these descriptions and knows no
field name of its own; ``SEED_LAYOUT`` is the one it ships (the seed API's processor fields),
and families whose processors name their fields otherwise describe their own instead of
renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class GridRows:
    """Item i has ``prod(grid[i])`` rows of pixels; the grid is the first of ``fields`` present
    (the others travel with the items). A pixel tensor with one row per item is also taken
    (per-image layouts, whose grid is an image size or position ids). ``flat`` names the grid
    that flat patches come with, in the hint of an error (default: the first of ``fields``)."""

    fields: tuple[str, ...]
    flat: str = ""

    @property
    def flat_grid(self) -> str:
        return self.flat or self.fields[0]


@dataclass(frozen=True)
class CountRows:
    """Item i has ``field[i]`` rows of pixels (a 1-D integer tensor, one entry per item)."""

    field: str


@dataclass(frozen=True)
class OneRow:
    """Each item is one row of the pixel tensor."""


ONE_ROW = OneRow()

Rows = GridRows | CountRows | OneRow


@dataclass(frozen=True)
class MediaGroup:
    """One group of media fields that travel together, e.g. the images or the videos.

    ``pixels``: the group's pixel tensor; the group applies when it is present (and, with
    ``when``, one of those fields too; groups of the same ``pixels`` are tried in order).
    ``items``: per-sample item counts (``[B]`` integers); when absent each sample has
    ``missing_items`` items. ``rows``: rows of ``pixels`` per item. ``pixels_per_sample``: the
    pixel tensor may instead hold one row per sample (told apart by dim 0 == B; Step3's full
    image beside its crops). ``per_item``: further fields with one row per item;
    ``item_pixels``: those of them that are pixels (they add to the default balancing cost).
    ``per_sample``: fields with one row per sample. ``per_row``: fields whose dim 0 follows the
    pixel tensor's, row for row, whatever those rows are (Gemma4's ``video_position_ids``: one
    row per frame of ``pixel_values_videos``). ``extras``: per-item fields that travel with
    the group when it applies but alone do not make a batch a media batch (left in the batch
    otherwise). ``noun`` and ``label`` only word error messages.
    """

    pixels: str
    items: str | None = None
    missing_items: int = 1
    rows: Rows = ONE_ROW
    pixels_per_sample: bool = False
    per_item: tuple[str, ...] = ()
    item_pixels: tuple[str, ...] = ()
    per_sample: tuple[str, ...] = ()
    per_row: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    when: tuple[str, ...] = ()
    noun: str = "item"
    label: str = ""

    def __post_init__(self) -> None:
        if self.missing_items not in (0, 1):
            raise ValueError(
                f"pp_media: MediaGroup({self.pixels!r}).missing_items must be 0 or 1, "
                f"got {self.missing_items!r}."
            )
        stray = set(self.item_pixels) - set(self.per_item)
        if stray:
            raise ValueError(
                f"pp_media: MediaGroup({self.pixels!r}).item_pixels {sorted(stray)} must also be "
                "listed in per_item."
            )

    @property
    def row_fields(self) -> tuple[str, ...]:
        """The fields that say how many rows each item has."""
        if isinstance(self.rows, GridRows):
            return self.rows.fields
        if isinstance(self.rows, CountRows):
            return (self.rows.field,)
        return ()

    @property
    def media_fields(self) -> tuple[str, ...]:
        """Every field of the group but the extras: present without the group, an error."""
        fields = (self.pixels, *self.row_fields, *self.per_item, *self.per_sample, *self.per_row)
        return fields + ((self.items,) if self.items is not None else ())


@dataclass(frozen=True, eq=False)
class MediaLayout:
    """The media groups of a batch. ``field_order`` (optional) orders the media fields that are
    checked for a group, first error first; by default the groups' own order. Compared by
    identity (the core caches what it derives from a layout)."""

    groups: tuple[MediaGroup, ...]
    field_order: tuple[str, ...] = ()
    media_fields: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, None] = dict.fromkeys(self.field_order)
        for group in self.groups:
            seen.update(dict.fromkeys(group.media_fields))
        stray = len(seen) - len({name for group in self.groups for name in group.media_fields})
        if stray:
            raise ValueError(
                f"pp_media: MediaLayout.field_order {list(self.field_order)} names fields that no "
                "group has; list only the groups' media fields."
            )
        object.__setattr__(self, "media_fields", tuple(seen))

    def group_fields(self) -> dict[str, frozenset[str]]:
        """Every field of each pixel tensor's groups, extras included (keyed by ``pixels``)."""
        fields: dict[str, set[str]] = {}
        for group in self.groups:
            fields.setdefault(group.pixels, set()).update(group.media_fields, group.extras)
        return {pixels: frozenset(names) for pixels, names in fields.items()}


# --- the seed's layouts ---------------------------------------------------------------------

_IMAGE_GRIDS = ("image_grid_hws", "image_grid_thw", "image_sizes", "image_position_ids")
#: Per-image fields some processors emit beside the media (Gemma3, Gemma4, Idefics3).
_IMAGE_EXTRAS = ("num_crops", "num_soft_tokens_per_image", "pixel_attention_mask")
_STEP3_CROPS = ("patch_pixel_values", "patch_newline_mask")

#: Images mapped by a grid (flat patches, or one row per image), counted per sample.
GRID_IMAGES = MediaGroup(
    "pixel_values",
    items="n_images_per_sample",
    rows=GridRows(_IMAGE_GRIDS, flat="image_grid_thw"),
    extras=_IMAGE_EXTRAS,
    when=_IMAGE_GRIDS,
    label="image grid",
)
#: Step3-style: one full image per sample (or flat crops) plus crops mapped by ``num_patches``.
STEP3_IMAGES = MediaGroup(
    "pixel_values",
    items="num_patches",
    missing_items=0,
    pixels_per_sample=True,
    per_item=_STEP3_CROPS,
    item_pixels=("patch_pixel_values",),
    per_sample=("n_images_per_sample",),
    when=("num_patches", *_STEP3_CROPS),
    noun="crop",
    label="Step3-style crops",
)
#: The same without a grid: one row per image (one image per sample unless counted).
ROW_IMAGES = replace(GRID_IMAGES, when=())
#: Videos: flat patches with ``video_grid_thw``, or one row per video.
VIDEOS = MediaGroup(
    "pixel_values_videos",
    items="n_videos_per_sample",
    rows=GridRows(("video_grid_thw",)),
    extras=("second_per_grid_ts",),
)

#: The layouts the seed API splits (``prepare_vlm_media_for_pp``'s default).
SEED_LAYOUT = MediaLayout(
    (GRID_IMAGES, STEP3_IMAGES, ROW_IMAGES, VIDEOS),
    field_order=(
        "pixel_values",
        *_STEP3_CROPS[:1],
        "num_patches",
        *_STEP3_CROPS[1:],
        *_IMAGE_GRIDS,
        "n_images_per_sample",
        "pixel_values_videos",
        "video_grid_thw",
        "n_videos_per_sample",
    ),
)

#: Gemma4: one row per image, padded to the batch's most patches, with its patch positions
#: (``image_position_ids [images, max_patches, 2]``, -1 at padding) as a per-image field.
GEMMA4_IMAGES = MediaGroup(
    "pixel_values",
    items="n_images_per_sample",
    per_item=("image_position_ids",),
    extras=("num_soft_tokens_per_image",),
    label="Gemma4 images",
)
#: Gemma4 videos: every video's frames concatenated into one pixel row each
#: (``pixel_values_videos [frames, max_patches, patch_pixels]``), ``num_frames_per_video`` rows
#: per video, and each frame's patch positions (``video_position_ids [frames, max_patches, 2]``)
#: following the pixel rows.
GEMMA4_VIDEOS = MediaGroup(
    "pixel_values_videos",
    items="n_videos_per_sample",
    rows=CountRows("num_frames_per_video"),
    per_row=("video_position_ids",),
    noun="video",
    label="Gemma4 videos",
)
GEMMA4_LAYOUT = MediaLayout((GEMMA4_IMAGES, GEMMA4_VIDEOS))
