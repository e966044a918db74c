"""The one reading of a batch's media: which groups a layout finds, and every check on them.

``read_media`` interprets a ``MediaLayout`` (``pp_media._layouts``) against a batch: it picks the
group of each pixel tensor, checks types and shapes, and returns one ``GroupReading`` per group:
the tensors, what dim 0 of the pixel tensor counts, the per-sample item counts and per-item row
counts that the host must see, and the checks of those values. Splitting (``row_maps``) and
balancing (``media_plan``) both start here, so both accept and refuse the same batches with the
same messages; neither reads a field name of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from pp_media._core.errors import media_error, require_int_tensor, require_tensor
from pp_media._layouts import CountRows, GridRows, MediaGroup, MediaLayout

#: What dim 0 of a group's pixel tensor counts.
PixelRows = Literal["rows", "items", "samples"]


def _require_rows(field: str, tensor: torch.Tensor, rows: int, meaning: str, fix: str = "") -> None:
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise media_error(field, tensor, f"dim 0 of size {rows} ({meaning})", fix)


@dataclass
class GroupReading:
    """One media group of a batch, checked as far as shapes go.

    ``counts`` ([B] items per sample) is None when each sample has one item; ``sizes`` (rows of
    the pixel tensor per item, 1-D) is None unless the pixels are flat (``pixel_rows == "rows"``).
    ``anchor`` names the field whose dim 0 counts the items (``n_items`` of them); None when
    only the sum of the counts says how many there are (``check_counts`` then checks the fields).
    """

    group: MediaGroup
    batch_size: int
    pixels: torch.Tensor
    pixel_rows: PixelRows
    counts: torch.Tensor | None
    counts_given: bool
    row_field: str | None
    row_tensor: torch.Tensor | None
    sizes: torch.Tensor | None
    anchor: str | None
    n_items: int | None
    #: Fields with one row per item (the pixels excluded), in output order.
    item_fields: list[tuple[str, torch.Tensor]]
    #: Fields with one row per sample (the counts excluded).
    sample_fields: list[tuple[str, torch.Tensor]]
    #: Fields whose dim 0 follows the pixel tensor's, row for row (``MediaGroup.per_row``).
    per_row_fields: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def counts_name(self) -> str:
        return self.group.items or f"{self.group.pixels} items"

    @property
    def names(self) -> list[str]:
        """Every field of the batch this group takes, in output order."""
        names = [self.group.pixels]
        names += [self.row_field] if self.row_field is not None else []
        names += [self.counts_name] if self.counts_given else []
        names += [name for name, _ in self.item_fields]
        names += [name for name, _ in self.sample_fields]
        names += [name for name, _ in self.per_row_fields]
        return names

    def check_counts(self, total: int, minimum: int) -> None:
        """Checks on the item counts' sum and minimum (read on the host)."""
        group, counts = self.group, self.counts
        if minimum < 0:
            raise media_error(
                self.counts_name,
                counts,
                f"non-negative {group.noun} counts",
                f"Its minimum is {minimum}.",
            )
        if self.anchor is not None:
            if total != self.n_items:
                anchor = self.row_tensor if self.anchor == self.row_field else self.pixels
                raise media_error(
                    self.counts_name,
                    counts,
                    f"counts that sum to {self.n_items}, the rows of '{self.anchor}' "
                    f"(shape {tuple(anchor.shape)})",
                    f"They sum to {total}." + self._missing_grid_hint(),
                )
            return
        if self.pixel_rows == "items" and self.pixels.shape[0] != total:
            raise media_error(
                group.pixels,
                self.pixels,
                f"dim 0 of size {self.batch_size} (one image per sample) or {total} (the sum of "
                f"'{self.counts_name}', a flat {group.noun} tensor)",
            )
        for name, tensor in self.item_fields:
            if tensor.shape[0] != total:
                raise media_error(
                    name, tensor, f"dim 0 of size {total}, the sum of '{self.counts_name}'"
                )

    def check_sizes(self, total: int, minimum: int) -> None:
        """Checks on the per-item row counts' sum and minimum (flat pixels only)."""
        grid = isinstance(self.group.rows, GridRows)
        if minimum < 0:
            what = "non-negative grid entries" if grid else "non-negative row counts"
            raise media_error(self.row_field, self.row_tensor, what)
        if total != self.pixels.shape[0]:
            described = "sum over rows of the row product" if grid else "the sum of its entries"
            raise media_error(
                self.group.pixels,
                self.pixels,
                f"dim 0 of size {total}: the patches described by '{self.row_field}' "
                f"(shape {tuple(self.row_tensor.shape)}, {described}), or {self.n_items}: one "
                "row per item",
                "Check that the grid belongs to these pixel values.",
            )

    def raise_negative(self) -> None:
        """Name the field with a negative entry (error path: an extra host read is fine)."""
        if self.counts is not None:
            minimum = int(self.counts.min()) if self.counts.numel() else 0
            if minimum < 0:
                self.check_counts(0, minimum)
        self.check_sizes(0, -1)

    def _missing_grid_hint(self) -> str:
        """Counts that miss the rows of a grid-less group often mean flat patches lost their
        grid."""
        rows = self.group.rows
        if self.row_field is not None or not isinstance(rows, GridRows):
            return ""
        return f" Flat patches need their grid beside them ('{rows.flat_grid}')."


class MediaReading(NamedTuple):
    """Every group of a batch and the keys that leave it with the media."""

    groups: list[GroupReading]
    removed: tuple[str, ...]


class _Resolved(NamedTuple):
    """A layout's groups for one set of present keys (cached: batches of a loader share it)."""

    groups: tuple[MediaGroup, ...]
    unaligned: tuple[str, str] | None
    removed: tuple[str, ...]


@functools.lru_cache(maxsize=256)
def _resolve(layout: MediaLayout, keys: frozenset[str]) -> _Resolved:
    chosen: dict[str, MediaGroup] = {}
    for group in layout.groups:
        applies = not group.when or not keys.isdisjoint(group.when)
        if applies and group.pixels in keys and group.pixels not in chosen:
            chosen[group.pixels] = group
    consumed: set[str] = set()
    for group in chosen.values():
        consumed.update(group.media_fields, group.extras)
    unaligned = None
    for key in layout.media_fields:
        if key in keys and key not in consumed:
            unaligned = (key, _needs(layout, key))
            break
    extras = [key for group in chosen.values() for key in group.extras if key in keys]
    return _Resolved(tuple(chosen.values()), unaligned, (*layout.media_fields, *extras))


def _needs(layout: MediaLayout, key: str) -> str:
    """What a media field needs beside it: the pixels of its first group, and no earlier
    alternative of those pixels."""
    groups = list(layout.groups)
    index = next(i for i, group in enumerate(groups) if key in group.media_fields)
    group = groups[index]
    earlier = [g for g in groups[:index] if g.pixels == group.pixels and g.when]
    needs = f"'{group.pixels}'"
    if earlier:
        needs += "".join(f" and no {g.label}" for g in earlier) + f" ({group.label})"
    return needs


@functools.lru_cache(maxsize=128)
def flat_counted_fields(layout: MediaLayout, keys: frozenset[str]) -> tuple[str, str, str] | None:
    """(pixels, grid, counts) when the batch is exactly flat pixels, a grid and counts."""
    for group in layout.groups:
        if group.pixels not in keys:
            continue
        if not (isinstance(group.rows, GridRows) and group.items is not None):
            return None
        grid = next((name for name in group.rows.fields if name in keys), None)
        if grid is None or keys != {group.pixels, grid, group.items}:
            return None
        return group.pixels, grid, group.items
    return None


def present_media(batch: Mapping[str, Any], layout: MediaLayout) -> dict[str, Any]:
    """The layout's fields that the batch holds (not None); extras only beside media."""
    get = batch.get
    present = {key: value for key in layout.media_fields if (value := get(key)) is not None}
    if present:
        for group in layout.groups:
            for key in group.extras:
                if key not in present and (value := get(key)) is not None:
                    present[key] = value
    return present


def read_media(present: Mapping[str, Any], batch_size: int, layout: MediaLayout) -> MediaReading:
    """Check the present media fields' types and shapes; values are checked after the read."""
    resolved = _resolve(layout, frozenset(present))
    groups = [_read_group(group, present, batch_size) for group in resolved.groups]
    if resolved.unaligned is not None:
        key, needs = resolved.unaligned
        raise media_error(
            key,
            present[key],
            f"to come with {needs}",
            "Without it there is nothing to align this field with; drop it or keep its media.",
        )
    return MediaReading(groups, resolved.removed)


def _read_group(group: MediaGroup, present: Mapping[str, Any], b: int) -> GroupReading:
    pixels = require_tensor(group.pixels, present[group.pixels])
    if pixels.dim() == 0:
        raise media_error(group.pixels, pixels, "at least one dimension")
    row_field = next((name for name in group.row_fields if name in present), None)
    row_tensor = None
    if row_field is not None and isinstance(group.rows, GridRows):
        row_tensor = require_tensor(row_field, present[row_field])
        if (
            row_tensor.dim() < 2
            or row_tensor.dtype.is_floating_point
            or row_tensor.dtype == torch.bool
        ):
            raise media_error(
                row_field,
                row_tensor,
                "a 2-D integer tensor with one row per item (per-image layouts also accept "
                "more dims, such as Gemma's [n_images, P, 2] image_position_ids)",
            )
    elif row_field is not None:
        row_tensor = require_int_tensor(row_field, present[row_field], 1)

    per_sample = group.pixels_per_sample and pixels.shape[0] == b
    if row_tensor is not None:
        anchor, n_items = row_field, row_tensor.shape[0]
    elif not group.pixels_per_sample:
        anchor, n_items = group.pixels, pixels.shape[0]
    else:
        anchor, n_items = None, None

    item_fields: list[tuple[str, torch.Tensor]] = []
    if isinstance(group.rows, GridRows):
        item_fields += [
            (name, require_tensor(name, present[name]))
            for name in group.rows.fields
            if name != row_field and name in present
        ]
    item_fields += [
        (name, require_tensor(name, present[name]))
        for name in (*group.per_item, *group.extras)
        if name in present
    ]
    if anchor is not None:
        for name, tensor in item_fields:
            _require_rows(name, tensor, n_items, f"one row per row of '{anchor}'")

    counts_name = group.items
    counts_given = counts_name is not None and present.get(counts_name) is not None
    counts = None
    if counts_given:
        counts = require_int_tensor(counts_name, present[counts_name], 1)
        noun = "" if group.noun == "item" else f"{group.noun} "
        _require_rows(counts_name, counts, b, f"one {noun}count per sample")
    elif group.missing_items == 0:
        counts = torch.zeros(b, dtype=torch.int64, device=pixels.device)
    elif n_items != b:
        items = row_tensor if anchor == row_field and row_tensor is not None else pixels
        raise media_error(
            anchor,
            items,
            f"{b} rows (one item per sample) when '{counts_name}' is not given",
            f"The batch has {b} samples and {n_items} items: pass "
            f"'{counts_name}' (shape [{b}]) with each sample's item count.",
        )
    if anchor is None:
        for name, tensor in item_fields:
            if tensor.dim() == 0:
                raise media_error(name, tensor, "at least one dimension")

    if per_sample:
        pixel_rows: PixelRows = "samples"
    elif row_tensor is None or (pixels.shape[0] == n_items and isinstance(group.rows, GridRows)):
        pixel_rows = "items"
    else:
        pixel_rows = "rows"
    sizes = None
    if pixel_rows == "rows":
        if isinstance(group.rows, CountRows):
            sizes = row_tensor.to(torch.int64)
        else:
            if row_tensor.dim() != 2:
                raise media_error(
                    row_field,
                    row_tensor,
                    f"a 2-D integer tensor (one patch-grid row per item) for the flat "
                    f"'{group.pixels}' of shape {tuple(pixels.shape)}",
                    f"Or give '{group.pixels}' one row per item ({n_items} rows).",
                )
            sizes = row_tensor.prod(dim=1)

    sample_fields = []
    for name in group.per_sample:
        if present.get(name) is not None:
            tensor = require_tensor(name, present[name])
            _require_rows(name, tensor, b, "one row per sample")
            sample_fields.append((name, tensor))
    per_row_fields = []
    for name in group.per_row:
        if present.get(name) is not None:
            tensor = require_tensor(name, present[name])
            if tensor.dim() == 0 or tensor.shape[0] != pixels.shape[0]:
                raise media_error(
                    name,
                    tensor,
                    f"dim 0 of size {pixels.shape[0]}, the rows of '{group.pixels}' (shape "
                    f"{tuple(pixels.shape)}): it follows the pixel rows",
                    f"Pass the '{name}' that the processor emitted with these '{group.pixels}'.",
                )
            per_row_fields.append((name, tensor))
    return GroupReading(
        group,
        b,
        pixels,
        pixel_rows,
        counts,
        counts_given,
        row_field,
        row_tensor,
        sizes,
        anchor,
        n_items,
        item_fields,
        sample_fields,
        per_row_fields,
    )


_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def flat_grid_types_fit(pixels: Any, grid: Any, counts: Any) -> bool:
    """Whether flat pixels, a grid and per-sample counts have the types, ranks and dtypes the
    short split and planning paths take (``[rows, ...]``, ``[items, k]`` integer, ``[B]``
    integer, grid and counts on one device). False sends the batch to the general path, which
    splits it or names the field that is wrong."""
    return (
        isinstance(pixels, torch.Tensor)
        and isinstance(grid, torch.Tensor)
        and isinstance(counts, torch.Tensor)
        and grid.dim() == 2
        and counts.dim() == 1
        and pixels.dim() != 0
        and grid.dtype in _INT_DTYPES
        and counts.dtype in _INT_DTYPES
        and counts.device == grid.device
    )
