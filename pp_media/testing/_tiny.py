"""Sizes and token ids every tiny family shares, and the family registry of ``pp_media.testing``.

A family's test fixture is a ``TinyFamily`` subclass in ``pp_media/testing/families/``,
registered with ``@tiny_family``: the tiny random config, the image processor (or a stand-in
for one that needs torchvision) and the rules ``synthetic_batch`` follows to lay out a batch
as the family's processor and collate emit it. Sizes are small enough that 20 training steps
on 2 CPU processes take seconds. Nothing here imports transformers until a config or a
processor is built.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 990, 991, 992, 993
VOCAB = 1000
#: The text model every tiny family starts from (``text_config``).
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def text_config(num_layers: int, tie_word_embeddings: bool) -> dict[str, Any]:
    """The shared tiny text model, ``num_layers`` decoder layers."""
    return {**_TEXT, "num_hidden_layers": num_layers, "tie_word_embeddings": tie_word_embeddings}


def small_vision(**extra: Any) -> dict[str, Any]:
    """A 2-layer vision tower of width 32, plus the family's own fields."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **extra,
    }


def alternating(first: str, second: str, num_layers: int) -> list[str]:
    """``layer_types`` alternating two kinds, starting with ``first``."""
    return [first, second] * (num_layers // 2) + [first] * (num_layers % 2)


def pil_processor(name: str) -> Any:
    """The PIL backend of a transformers image processor when it has one (what it falls back
    to without torchvision anyway, minus the warning), else the processor class itself."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


class TinyFamily:
    """One family's test fixture; a family overrides what differs."""

    #: ``config.model_type`` values this fixture builds.
    model_types: tuple[str, ...] = ()
    #: Other names ``tiny_config`` and ``--model`` take for the first of ``model_types``
    #: (Inkling's family name ``inkling`` for its model_type ``inkling_mm_model``).
    aliases: tuple[str, ...] = ()
    #: The image processor takes the images grouped by sample (a list per sample).
    images_by_sample: bool = False
    #: Images every sample carries when the layout fixes it (Step3: one), else None.
    images_per_sample: int | None = None
    #: How ``synthetic_batch(videos=True)`` lays out videos: "patches" (flat patch rows with a
    #: ``video_grid_thw``, as Qwen-VL's video processor), "rows" (one ``[frames, C, H, W]`` row
    #: per video), "frames" (the fixture's own ``video_frames``: Gemma4's one row per frame),
    #: None (it cannot).
    video_layout: str | None = None
    #: Each video frame has its own placeholder run after a timestamp (Qwen3-VL, GLM-4V).
    video_frames_separately: bool = False
    #: The config's start and end token attributes around a video's placeholders when they
    #: differ from an image's (ERNIE-4.5-VL), else None: the image ones.
    video_separators: tuple[str, str] | None = None
    #: Whether the unsplit model accepts images and videos in one forward.
    mixes_images_and_videos: bool = True

    def config(self, model_type: str, text: dict[str, Any], tie_word_embeddings: bool) -> Any:
        """The tiny ``model_type`` config around the shared ``text`` model."""
        raise NotImplementedError

    def processor(self, config: Any) -> Any:
        """The family's image processor for ``config``, built offline."""
        raise NotImplementedError

    def video_frames(
        self, config: Any, generator: torch.Generator, n_videos: int, longest: bool = False
    ) -> dict[str, torch.Tensor]:
        """``n_videos`` videos in the video processor's output layout (``video_layout ==
        "frames"``), including ``num_frames_per_video``; ``longest``: each as long as any the
        fixture draws (for sizing sequences)."""
        raise NotImplementedError

    def text_fields(
        self, config: Any, batch: dict[str, torch.Tensor], prefix_lengths: list[int]
    ) -> None:
        """Add, in place, the per-sample fields the family's processor emits beside
        ``input_ids`` (``prefix_lengths``: each sample's media and prompt tokens, before its
        answer text); may relabel. Default: none."""

    def image_runs(self, config: Any, media: dict[str, torch.Tensor]) -> list[list[int]] | None:
        """Each image's tokens in order, as the family's processor expands them from ``media``
        (the image processor's output), when they are more than its placeholders between the
        config's start and end tokens (Llama 4: tile separators); None: those. Default None."""
        return None

    def make_checkable(self, model: Any, seed: int) -> None:
        """Give weights whose initial value would make a gradient check vacuous small random
        values from a generator seeded with ``seed``, in place. Default: none."""

    def reference_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unsplit model's ``labels=`` loss on ``batch``, what a pipelined step must equal.
        Default: ``model(**batch).loss``; a family whose ``forward`` is broken upstream
        computes it from the model's own parts, exactly as ``forward`` would (Llama 4)."""
        return model(**batch).loss


_FAMILIES: dict[str, TinyFamily] = {}
_ALIASES: dict[str, str] = {}


def tiny_family(cls: type[TinyFamily]) -> type[TinyFamily]:
    """Class decorator: register an instance of ``cls`` for each of its ``model_types``."""
    fixture = cls()
    for model_type in cls.model_types:
        _FAMILIES[model_type] = fixture
    for alias in cls.aliases:
        _ALIASES[alias] = cls.model_types[0]
    return cls


def canonical_model_type(name: str) -> str:
    """The model_type ``name`` stands for: an alias's, else ``name`` itself."""
    return _ALIASES.get(name, name)


def tiny_model_types() -> tuple[str, ...]:
    """Every ``model_type`` with a tiny fixture."""
    return tuple(_FAMILIES)


def fixture_for(model_type: str) -> TinyFamily:
    """The fixture of ``model_type``; a one-line error naming the known ones."""
    fixture = _FAMILIES.get(canonical_model_type(model_type))
    if fixture is None:
        raise ValueError(
            f"pp_media: no tiny config for model_type {model_type!r}; choose one of "
            f"{', '.join(tiny_model_types())}, or pass a checkpoint directory."
        )
    return fixture


def tiny_config(model_type: str, *, num_layers: int = 4, tie_word_embeddings: bool = False) -> Any:
    """A small config of ``model_type`` with ``num_layers`` decoder layers."""
    model_type = canonical_model_type(model_type)
    text = text_config(num_layers, tie_word_embeddings)
    return fixture_for(model_type).config(model_type, text, tie_word_embeddings)


def reference_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unsplit ``model``'s loss on ``batch`` (its fixture's ``reference_loss``;
    ``model(**batch).loss`` for a model type without a fixture)."""
    fixture = _FAMILIES.get(model.config.model_type)
    return model(**batch).loss if fixture is None else fixture.reference_loss(model, batch)


def image_processor(config: Any) -> Any:
    """The family's image processor for ``config`` (PIL backend, or a layout stand-in)."""
    if config.model_type not in _FAMILIES:
        raise ValueError(
            f"pp_media: no image processor known for model_type {config.model_type!r}."
        )
    return _FAMILIES[config.model_type].processor(config)
