"""``pp-media inspect``: how a batch's samples and media fall into microbatches.

The split is the engine's (``torch.tensor_split`` of the samples, media following their
samples as ``prepare_vlm_media_for_pp`` cuts them), and the placeholder check is the one
``prepare_step_inputs`` runs before a step (``placeholder_checks``), reported per sample
instead of raised on the first mismatch.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pp_media._core.bounds import sample_bounds
from pp_media._core.errors import check_microbatches, require_int_tensor
from pp_media._core.prepare import prepare_vlm_media_for_pp
from pp_media._hf.batch import (
    PlaceholderCheck,
    _items_per_sample,
    add_rows_per_item,
    check_required_fields,
    placeholder_checks,
)
from pp_media._hf.families import FamilyAdapter, adapter_for
from pp_media._keys import VLM_PP_MEDIA_KEY

PROG = "pp-media inspect"
#: The model of the synthetic batch when ``--model`` is not given.
DEFAULT_MODEL = "qwen2_vl"
#: Largest samples x items**2 that ``best_fit_counts`` takes on (about a second); beyond it
#: a batch whose placeholders are not whole items gets the step's own error instead.
BEST_FIT_SIZE = 2**24


class InspectError(Exception):
    """A bad input, reported as one line and exit status 2."""


@dataclass
class MicrobatchRow:
    """One microbatch of the table; the per-kind dicts are keyed by media kind name."""

    index: int
    samples: range
    items: dict[str, int]
    patches: dict[str, int]
    placeholders: dict[str, int]
    features: dict[str, int]
    ok: bool


@dataclass
class Inspection:
    """Everything ``pp-media inspect`` prints about one batch and microbatch count."""

    kinds: tuple[str, ...]
    rows: list[MicrobatchRow]
    checks: list[PlaceholderCheck]
    #: How each kind's items per sample were found ("n_images_per_sample", ...).
    count_sources: dict[str, str]
    notes: list[str] = field(default_factory=list)
    #: Kinds whose items were assigned to samples by best fit: which samples the mismatches
    #: are in is a guess.
    guessed: set[str] = field(default_factory=set)

    @property
    def mismatches(self) -> list[PlaceholderCheck]:
        return [check for check in self.checks if not check.ok]


def best_fit_counts(placeholders: Sequence[int], tokens: Sequence[int]) -> list[int]:
    """Items per sample, every item assigned in order, leaving the fewest samples whose
    placeholder count differs from their items' tokens, then the smallest total difference.

    With no such sample this is what ``count_items_per_sample`` finds; it is used only to
    report on a batch whose placeholders do not split into whole items.
    """
    prefix = torch.tensor([0, *itertools.accumulate(tokens)], dtype=torch.int64)
    # given[a, b]: tokens of items a..b-1 (a sample taking them); a > b is no assignment.
    given = prefix.view(1, -1) - prefix.view(-1, 1)
    impossible = given < 0
    # A mismatch outweighs any sum of differences.
    weight = int(prefix[-1]) + sum(placeholders) + 1
    cost = torch.full_like(prefix, weight * (len(placeholders) + 1))
    cost[0] = 0
    steps: list[list[int]] = []
    for wanted in placeholders:
        difference = (given - wanted).abs()
        total = cost.view(-1, 1) + difference + weight * (difference != 0)
        cost, came_from = total.masked_fill(impossible, torch.iinfo(torch.int64).max).min(dim=0)
        steps.append(came_from.tolist())
    counts: list[int] = []
    end = len(tokens)
    for came_from in reversed(steps):
        counts.append(end - came_from[end])
        end = came_from[end]
    return counts[::-1]


def _derive_counts(
    work: dict[str, Any],
    adapter: FamilyAdapter,
    config: Any,
    n_microbatches: int,
    notes: list[str],
    refusals: list[ValueError],
    guessed: set[str],
) -> dict[str, str]:
    """Fill in missing rows per item and per-sample item counts as ``prepare_step_inputs``
    does; where the placeholders are not whole items, keep the refusal, assign items by best
    fit, mark the kind as guessed and add a note. Returns how each kind's counts were found."""
    sources: dict[str, str] = {}
    input_ids = work["input_ids"]
    for kind in adapter.media:
        token_id = adapter.token_id(config, kind)
        add_rows_per_item(work, adapter, config, kind)
        if work.get(kind.pixel_field) is None:
            sources[kind.name] = f"none ({kind.pixel_field} absent)"
        elif work.get(kind.count_field) is not None:
            sources[kind.name] = f"from {kind.count_field}"
        else:
            sources[kind.name] = f"from placeholder tokens (id {token_id})"
            try:
                work[kind.count_field] = _items_per_sample(
                    work, adapter, config, kind, n_microbatches
                )
            except ValueError as refusal:
                refusals.append(refusal)
                tokens = adapter.tokens_per_item(config, kind, work)
                size = input_ids.shape[0] * (tokens.numel() + 1) ** 2
                if tokens.dim() != 1 or size > BEST_FIT_SIZE:
                    raise
                placeholders = (input_ids == token_id).sum(dim=1).tolist()
                work[kind.count_field] = torch.tensor(
                    best_fit_counts(placeholders, tokens.tolist()), dtype=torch.int64
                )
                guessed.add(kind.name)
                notes.append(
                    f"note: the {kind.name} placeholder tokens (id {token_id}) do not split into "
                    f"whole {kind.name}s per sample, so prepare_step_inputs would refuse this "
                    f"batch; below, {kind.name}s are assigned to samples by best fit, so which "
                    f"samples are flagged is a guess (without {kind.count_field}, which sample "
                    "lost or gained placeholder tokens cannot be known)."
                )
    return sources


def inspect_batch(
    batch: Mapping[str, Any], adapter: FamilyAdapter, config: Any, n_microbatches: int
) -> Inspection:
    """Split ``batch`` as a pipeline step would and check every sample's placeholders.

    Raises ``InspectError`` or ``ValueError`` (the core's own message) for batches that cannot
    be split at all.
    """
    if not isinstance(batch.get("input_ids"), torch.Tensor):
        raise InspectError(f"the batch has no 'input_ids' tensor (keys: {sorted(batch)})")
    input_ids = require_int_tensor("input_ids", batch["input_ids"], 2)
    batch_size = input_ids.shape[0]
    check_microbatches(batch_size, n_microbatches)
    check_required_fields(batch, adapter, config)
    work: dict[str, Any] = dict(batch)
    notes: list[str] = []
    refusals: list[ValueError] = []
    guessed: set[str] = set()
    try:
        sources = _derive_counts(work, adapter, config, n_microbatches, notes, refusals, guessed)
        if any(work.get(kind.pixel_field) is not None for kind in adapter.media):
            try:
                prepare_vlm_media_for_pp(
                    work, batch_size, n_microbatches, layout=adapter.media_layout
                )
            except ValueError:
                if refusals:  # best-fit counts cannot split it either: the step's own error
                    raise refusals[0] from None
                raise
        media: dict[str, list[torch.Tensor]] = work.pop(VLM_PP_MEDIA_KEY, {})
        checks = list(placeholder_checks(input_ids, media, adapter, config, n_microbatches))
    except KeyError as error:
        raise InspectError(
            f"the batch has no {error.args[0]!r}, which {config.model_type} needs to count "
            "the features of its media"
        ) from None

    bounds = sample_bounds(batch_size, n_microbatches)
    rows = []
    for k in range(n_microbatches):
        own = [check for check in checks if check.microbatch == k]
        items: dict[str, int] = {}
        patches: dict[str, int] = {}
        placeholders: dict[str, int] = {}
        features: dict[str, int] = {}
        for kind in adapter.media:
            chunks, counts = media.get(kind.pixel_field), media.get(kind.count_field)
            patches[kind.name] = 0 if chunks is None else chunks[k].shape[0]
            if chunks is None:
                items[kind.name] = 0
            elif counts is None:  # one item per sample
                items[kind.name] = bounds[k + 1] - bounds[k]
            else:
                items[kind.name] = int(counts[k].sum())
            mine = [check for check in own if check.kind == kind.name]
            placeholders[kind.name] = sum(check.placeholders for check in mine)
            features[kind.name] = sum(check.features for check in mine)
        rows.append(
            MicrobatchRow(
                index=k,
                samples=range(bounds[k], bounds[k + 1]),
                items=items,
                patches=patches,
                placeholders=placeholders,
                features=features,
                ok=all(check.ok for check in own),
            )
        )
    kinds = tuple(kind.name for kind in adapter.media)
    return Inspection(kinds, rows, checks, sources, notes, guessed)


def _samples_text(samples: range) -> str:
    if len(samples) == 1:
        return str(samples.start)
    return f"{samples.start}-{samples.stop - 1}"


def format_table(inspection: Inspection) -> list[str]:
    """The per-microbatch table, header first."""
    kinds = inspection.kinds
    columns: list[tuple[str, list[str]]] = [
        ("mb", [str(row.index) for row in inspection.rows]),
        ("samples", [_samples_text(row.samples) for row in inspection.rows]),
    ]
    for title, values in (
        ("{}s", "items"),
        ("{} patches", "patches"),
        ("{} tokens", "placeholders"),
        ("{} features", "features"),
    ):
        for kind in kinds:
            column = [str(getattr(row, values)[kind]) for row in inspection.rows]
            columns.append((title.format(kind), column))
    columns.append(("status", ["ok" if row.ok else "MISMATCH" for row in inspection.rows]))
    widths = [max(len(title), *(len(value) for value in values)) for title, values in columns]
    left = {"samples", "status"}

    def line(cells: Sequence[str], header: bool = False) -> str:
        parts = []
        for (title, _), width, cell in zip(columns, widths, cells, strict=True):
            parts.append(cell.ljust(width) if title in left or header else cell.rjust(width))
        return "  ".join(parts).rstrip()

    lines = [line([title for title, _ in columns], header=True)]
    for i in range(len(inspection.rows)):
        lines.append(line([values[i] for _, values in columns]))
    return lines


def format_report(inspection: Inspection, heading: str) -> str:
    """Heading, count sources, table, one line per mismatch and a summary line."""
    counts = "; ".join(f"{kind}s: {source}" for kind, source in inspection.count_sources.items())
    lines = [heading, f"items per sample: {counts}", "", *format_table(inspection), ""]
    lines += inspection.notes
    mismatches = inspection.mismatches
    for check in mismatches:
        guess = " (best-fit guess)" if check.kind in inspection.guessed else ""
        lines.append(
            f"MISMATCH microbatch {check.microbatch}, sample {check.sample}: "
            f"{check.placeholders} {check.kind} placeholder tokens (id {check.token_id}) in "
            f"input_ids, but its {check.kind}s give {check.features} features{guess}"
        )
    n_samples = sum(len(row.samples) for row in inspection.rows)
    n_microbatches = len(inspection.rows)
    if not mismatches:
        totals = ", ".join(
            f"{sum(row.items[kind] for row in inspection.rows)} {kind}s"
            for kind in inspection.kinds
        )
        lines.append(
            f"ok: {n_samples} samples, {totals} in {n_microbatches} microbatches; every "
            "sample's placeholder tokens match its media's features"
        )
    else:
        samples = sorted({check.sample for check in mismatches})
        bad = sorted({check.microbatch for check in mismatches})
        guess = (
            " (which samples: a best-fit guess)"
            if any(check.kind in inspection.guessed for check in mismatches)
            else ""
        )
        lines.append(
            f"MISMATCH: {_plural('sample', samples)} ({len(samples)} of {n_samples}) in "
            f"{_plural('microbatch', bad)} ({len(bad)} of {n_microbatches}){guess}: placeholder "
            "tokens differ from the media's features; a pipeline step would raise ValueError"
        )
    return "\n".join(lines)


def _plural(noun: str, numbers: Sequence[int]) -> str:
    """``sample 4`` or ``samples 3, 4``."""
    suffix = "" if len(numbers) == 1 else ("es" if noun.endswith("h") else "s")
    return f"{noun}{suffix} {', '.join(map(str, numbers))}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_config(model: str) -> tuple[Any, FamilyAdapter]:
    """``--model``: a tiny model type, or a checkpoint directory with a config.json."""
    from pp_media.testing import canonical_model_type, tiny_config, tiny_model_types

    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise InspectError(f"{model} is a directory without a config.json")
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise InspectError(f"cannot read the config in {model}: {_first_line(error)}") from None
    elif canonical_model_type(model) in tiny_model_types():
        config = tiny_config(model)
    else:
        raise InspectError(
            f"unknown model {model!r}: choose one of {', '.join(tiny_model_types())}, or a "
            "checkpoint directory containing config.json"
        )
    return config, adapter_for(config)


def load_batch(path: str) -> dict[str, torch.Tensor]:
    """A dict of tensors saved with ``torch.save``."""
    file = Path(path)
    if not file.is_file():
        raise InspectError(f"no such file: {path}")
    try:
        batch = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip and weights-only refusals alike
        raise InspectError(
            f"{path} is not a dict of tensors saved with torch.save (torch.load failed: "
            f"{type(error).__name__}: {_first_line(error)[:160]})"
        ) from None
    if not isinstance(batch, dict):
        raise InspectError(
            f"{path} is not a dict of tensors saved with torch.save (it holds a value of type "
            f"{type(batch).__name__})"
        )
    for key, value in batch.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InspectError(
                f"{path} is not a dict of tensors saved with torch.save (key {key!r} holds a "
                f"value of type {type(value).__name__})"
            )
    return batch


def _synthetic(
    config: Any, adapter: FamilyAdapter, args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    from pp_media.testing import default_seq_len, synthetic_batch

    if args.videos and not any(kind.name == "video" for kind in adapter.media):
        raise InspectError(f"--videos needs a family with videos; {config.model_type} has none")
    check_microbatches(args.batch_size, args.microbatches)
    seq_len = default_seq_len(config, videos=args.videos)
    return synthetic_batch(config, args.batch_size, seq_len, seed=args.seed, videos=args.videos)


def _model_text(model: str, config: Any, adapter: FamilyAdapter) -> str:
    """How the heading names the model a saved batch is checked against: a tiny model type
    says that its placeholder ids are the demo's."""
    if Path(model).is_dir():
        return f"{config.model_type} from {model}"
    ids = ", ".join(f"{kind.name} {adapter.token_id(config, kind)}" for kind in adapter.media)
    return f"placeholder ids of pp-media's tiny random {config.model_type}: {ids}"


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report; 0 when consistent, 1 on any mismatch, 2 on a bad input."""
    try:
        if args.batch is not None and args.model is None:
            raise InspectError(
                f"{args.batch}: a saved batch needs --model, the checkpoint directory (or "
                "model_type) whose placeholder token ids and rule it follows; pp-media does not "
                "guess them"
            )
        config, adapter = load_config(args.model or DEFAULT_MODEL)
        if args.batch is None:
            batch = _synthetic(config, adapter, args)
            source = f"synthetic {config.model_type} batch (seed {args.seed})"
        else:
            batch = load_batch(args.batch)
            source = f"{args.batch} ({_model_text(args.model, config, adapter)})"
        inspection = inspect_batch(batch, adapter, config, args.microbatches)
    except (InspectError, ValueError) as error:
        message = _first_line(error).removeprefix("pp_media: ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    batch_size, seq_len = batch["input_ids"].shape
    heading = f"{source}: {batch_size} samples x {seq_len} tokens, {args.microbatches} microbatches"
    print(format_report(inspection, heading))
    return 1 if inspection.mismatches else 0
