"""Synthetic image-text batches laid out exactly as the family's processor and collate emit.

Images (0..3 per sample, several sizes, text-only samples included) go through the family's
real image processor. Videos, whose processors need torchvision (not importable beside the CPU
build of torch used here), are built directly in the Qwen-VL video processor's output layout:
``pixel_values_videos [sum(t*h*w), C * temporal_patch * patch**2]`` with ``video_grid_thw``
rows ``[frames // temporal_patch, H // patch, W // patch]``; in one ``[frames, C, H, W]`` row per
video (LLaVA-OneVision); or by the family fixture (``video_frames``: Gemma4's one row per frame).
"""

from __future__ import annotations

from typing import Any

import torch

from pp_media._hf.families import adapter_for
from pp_media.testing._tiny import fixture_for, image_processor

#: Image sizes (height, width) the batches draw from; all multiples of 28 (Qwen patch x merge).
IMAGE_SIZES = ((56, 56), (56, 84), (84, 56), (112, 56), (56, 112), (84, 84))
#: Text token ids are drawn from this range, cut to the vocabulary.
TEXT_IDS = (10, 900)


def _special_token_ids(config: Any) -> set[int]:
    """Every ``*_token_id`` / ``*_token_index`` of the config and its text config (placeholders,
    separators, padding), which synthetic text must not contain."""
    special: set[int] = set()
    for part in (config, config.get_text_config()):
        for name, value in vars(part).items():
            is_token = name.endswith(("_token_id", "_token_index"))
            if is_token and isinstance(value, int) and not isinstance(value, bool):
                special.add(value)
    return special


def text_token_ids(config: Any) -> torch.Tensor:
    """The ids synthetic text draws from: ``TEXT_IDS`` cut to the checkpoint's vocabulary,
    without its special tokens (the whole vocabulary's ordinary ids if that leaves few)."""
    vocab = int(config.get_text_config().vocab_size)
    special = _special_token_ids(config)
    ids = [i for i in range(TEXT_IDS[0], min(TEXT_IDS[1], vocab)) if i not in special]
    if len(ids) < 8:
        ids = [i for i in range(vocab) if i not in special]
    if not ids:
        raise ValueError(
            f"pp_media: the vocabulary of {vocab} tokens has no id left for synthetic text "
            f"besides the special tokens {sorted(special)}; use a checkpoint with a larger "
            "vocabulary."
        )
    return torch.tensor(ids, dtype=torch.int64)


def _image(generator: torch.Generator, height: int, width: int) -> Any:
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _separators(config: Any, video: bool = False) -> tuple[int | None, int | None]:
    """The tokens around a placeholder run (Qwen: vision start/end; GLM-4V: image start/end;
    Inkling: an ``image_bos`` before the run and nothing after it; a video's own where the
    fixture names them, ``video_separators``)."""
    names = fixture_for(config.model_type).video_separators if video else None
    if names is not None:
        return tuple(getattr(config, name) for name in names)
    for prefix in ("vision", "image"):
        start = getattr(config, f"{prefix}_start_token_id", None)
        if start is not None:
            return start, getattr(config, f"{prefix}_end_token_id", None)
    return getattr(config, "image_bos_token_id", None), None


def _image_row_shape(config: Any) -> tuple[int, ...]:
    """Shape of one row of the image processor's ``pixel_values``."""
    probe = _image(torch.Generator().manual_seed(0), *IMAGE_SIZES[0])
    return tuple(
        image_processor(config)(images=[probe], return_tensors="pt")["pixel_values"].shape[1:]
    )


def _merge(vision: Any) -> int:
    """Patches merged along one side into a feature (Qwen-VL ``spatial_merge_size``, Kimi's
    ``merge_kernel_size``)."""
    if hasattr(vision, "spatial_merge_size"):
        return vision.spatial_merge_size
    return vision.merge_kernel_size[0]


def _flat_videos(config: Any) -> bool:
    """Videos as flat patches with a ``video_grid_thw`` (Qwen-VL, Kimi-K2.5)."""
    return fixture_for(config.model_type).video_layout == "patches"


def builds_videos(config: Any) -> bool:
    """Whether ``synthetic_batch(..., videos=True)`` can lay out this family's videos: flat
    patches with a ``video_grid_thw`` (Qwen-VL, Kimi-K2.5), one ``[frames, C, H, W]`` row per
    video (LLaVA-OneVision), or the fixture's own frames (Gemma4)."""
    return fixture_for(config.model_type).video_layout is not None


#: Frames of every per-row video (the OneVision video processor samples a fixed count).
VIDEO_FRAMES = 2


def _video_rows(config: Any, generator: torch.Generator, n_videos: int) -> dict[str, torch.Tensor]:
    """Videos one row each, ``[n_videos, frames, C, S, S]`` at the vision tower's size, as
    LLaVA-OneVision's video processor emits them (it needs torchvision; built directly)."""
    size = config.vision_config.image_size
    pixels = torch.randn(n_videos, VIDEO_FRAMES, 3, size, size, generator=generator)
    return {"pixel_values_videos": pixels}


def _grid_side(pixels: int, vision: Any) -> int:
    """Patches along one side of a video frame: a whole number of merge windows, as the video
    processor resizes to."""
    merge = _merge(vision)
    return max(merge, pixels // vision.patch_size // merge * merge)


def _videos(
    config: Any, generator: torch.Generator, n_videos: int, row_shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Videos in the video processor's layout: one patch row of ``row_shape`` (the image
    processor's, as Qwen-VL and Kimi-K2.5 share it) per ``t*h*w`` grid cell."""
    vision = config.vision_config
    # Grid frames: 1 or 2 temporal patches, times the frames the tower merges (ERNIE: 2).
    merged = getattr(vision, "temporal_merge_size", 1)
    grids = []
    for _ in range(n_videos):
        frames = merged * int(torch.randint(1, 3, (1,), generator=generator))
        height, width = IMAGE_SIZES[int(torch.randint(len(IMAGE_SIZES), (1,), generator=generator))]
        grids.append([frames, _grid_side(height, vision), _grid_side(width, vision)])
    grid = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    rows = int(grid.prod(-1).sum())
    pixels = torch.randn(rows, *row_shape, generator=generator)
    return {"pixel_values_videos": pixels, "video_grid_thw": grid}


def synthetic_batch(
    config: Any,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    max_images: int = 3,
    videos: bool = False,
) -> dict[str, torch.Tensor]:
    """A collated batch: ``input_ids``, ``attention_mask`` (right padding to ``seq_len``),
    ``labels`` (-100 on padding and media tokens), the processor's media fields and the
    per-sample fields it emits beside ``input_ids`` (the family fixture's ``text_fields``).
    Sample 0 is always text-only; with ``videos``, every third sample also carries one video.
    Deterministic in ``seed``."""
    adapter = adapter_for(config)
    fixture = fixture_for(config.model_type)
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_images + 1, (batch_size,), generator=generator)
    counts[0] = 0
    if fixture.images_per_sample is not None:  # layouts with a fixed count (Step3: one each)
        counts.fill_(fixture.images_per_sample)
    images = [
        [
            _image(generator, *IMAGE_SIZES[int(i)])
            for i in torch.randint(len(IMAGE_SIZES), (int(n),), generator=generator)
        ]
        for n in counts
    ]
    batch: dict[str, torch.Tensor] = {}
    flat = [image for sample in images for image in sample]
    image_kind = adapter.media[0]
    if flat:
        grouped = images if fixture.images_by_sample else flat
        batch.update(image_processor(config)(images=grouped, return_tensors="pt"))
    video_counts = torch.zeros(batch_size, dtype=torch.int64)
    if videos:
        video_counts[1::3] = 1
        if int(video_counts.sum()):
            n_videos = int(video_counts.sum())
            if _flat_videos(config):
                row_shape = _image_row_shape(config)
                batch.update(_videos(config, generator, n_videos, row_shape))
            elif fixture.video_layout == "frames":
                batch.update(fixture.video_frames(config, generator, n_videos))
            else:
                batch.update(_video_rows(config, generator, n_videos))

    image_tokens = adapter.tokens_per_item(config, image_kind, batch).tolist() if flat else []
    if image_kind.rows_per_sample and flat:
        # One count per sample: share it out over the sample's images.
        image_tokens = [
            tokens // int(n)
            for tokens, n in zip(image_tokens, counts, strict=True)
            for _ in range(n)
        ]
    video_tokens: list[tuple[int, int]] = []
    if int(video_counts.sum()):
        tokens = adapter.tokens_per_item(config, adapter.media[1], batch).tolist()
        grid = batch.get("video_grid_thw")
        if grid is not None:
            frames = grid[:, 0].tolist()
        elif "num_frames_per_video" in batch:
            frames = batch["num_frames_per_video"].tolist()
        else:
            frames = [VIDEO_FRAMES] * len(tokens)
        video_tokens = list(zip(frames, tokens, strict=True))
    start, end = _separators(config)
    video_separators = _separators(config, video=True)
    image_runs = fixture.image_runs(config, batch) if flat else None

    def placeholder_run(token: int, n_tokens: int, video: bool = False) -> list[int]:
        run = [token] * n_tokens
        first, last = video_separators if video else (start, end)
        if first is None:
            return run
        return [first, *run] if last is None else [first, *run, last]

    text_ids = text_token_ids(config)

    def text(n_tokens: int) -> list[int]:
        return text_ids[torch.randint(len(text_ids), (n_tokens,), generator=generator)].tolist()

    rows: list[list[int]] = []
    prefix_lengths: list[int] = []
    image_iter, video_iter = iter(image_tokens), iter(video_tokens)
    run_iter = iter(image_runs or ())
    for i in range(batch_size):
        row = text(3)
        for _ in range(int(counts[i])):
            n_tokens = next(image_iter)
            if image_runs is not None:
                row += next(run_iter)
            else:
                row += placeholder_run(adapter.token_id(config, image_kind), n_tokens)
            row += text(2)
        for _ in range(int(video_counts[i])):
            video_token, (frames, n_tokens) = (
                adapter.token_id(config, adapter.media[1]),
                next(video_iter),
            )
            if not fixture.video_frames_separately:
                row += placeholder_run(video_token, n_tokens, video=True)
                continue
            for _ in range(frames):  # a timestamp token before each frame's own run
                row += text(1)
                row += placeholder_run(video_token, n_tokens // frames, video=True)
        prefix_lengths.append(len(row))  # media and prompt; the answer text follows
        text_len = int(torch.randint(4, 12, (1,), generator=generator))
        row += text(text_len)
        if len(row) > seq_len:
            raise ValueError(
                f"pp_media: synthetic sample {i} needs {len(row)} tokens but seq_len is "
                f"{seq_len}; use a longer sequence or fewer images."
            )
        rows.append(row)

    input_ids = torch.full((batch_size, seq_len), config.get_text_config().pad_token_id or 0)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    media_tokens = torch.zeros_like(input_ids, dtype=torch.bool)
    for kind in adapter.media:
        media_tokens |= input_ids == adapter.token_id(config, kind)
    run_tokens = {token for run in image_runs or () for token in run}
    for token in (start, end, *video_separators, *run_tokens):
        if token is not None:
            media_tokens |= input_ids == token
    labels = input_ids.masked_fill(media_tokens | (attention_mask == 0), -100)
    batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    fixture.text_fields(config, batch, prefix_lengths)
    return batch


def default_seq_len(config: Any, *, max_images: int = 3, videos: bool = False) -> int:
    """A sequence length that fits any sample ``synthetic_batch`` draws, rounded up to 16."""
    adapter = adapter_for(config)
    generator = torch.Generator().manual_seed(0)
    media = image_processor(config)(
        images=[_image(generator, h, w) for h, w in IMAGE_SIZES], return_tensors="pt"
    )
    per_image = int(adapter.tokens_per_item(config, adapter.media[0], media).max())
    separators = 2 if _separators(config)[0] is not None else 0
    runs = fixture_for(config.model_type).image_runs(config, media)
    if runs is not None:
        per_image, separators = max(len(run) for run in runs), 0
    longest = 3 + max_images * (per_image + separators + 2) + 11
    if videos and _flat_videos(config):
        vision = config.vision_config
        frames = 2 * getattr(vision, "temporal_merge_size", 1)
        grid = torch.tensor(
            [[frames, _grid_side(h, vision), _grid_side(w, vision)] for h, w in IMAGE_SIZES]
        )
        per_video = adapter.tokens_per_item(config, adapter.media[1], {"video_grid_thw": grid})
        longest += int(per_video.max()) + 2 * (separators + 1)
    elif videos and fixture_for(config.model_type).video_layout == "frames":
        probe = fixture_for(config.model_type).video_frames(config, generator, 1, longest=True)
        per_video = adapter.tokens_per_item(config, adapter.media[1], probe)
        # Each frame's run after its timestamp, between its separators.
        n_frames = int(probe["num_frames_per_video"][0])
        longest += int(per_video.max()) + n_frames * (1 + 2)
    elif videos:
        probe = _video_rows(config, generator, 1)
        per_video = adapter.tokens_per_item(config, adapter.media[1], probe)
        longest += int(per_video.max()) + 2 * (separators + 1)
    return -(-longest // 16) * 16
