"""LLaVA-NeXT and LLaVA-OneVision: anyres crops, ``[n_images, max_crops, C, H, W]`` with the
true ``image_sizes``; one row per image, so the core splits them like any per-image field.

The placeholders of an image are counted by the processor's own rule (``replace_image_token``
of ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor``, run on a tokenizer-free stand-in built
from the model config), and the features come from the model's own ``get_image_features``,
which also packs them (base crop, unpadded grid, ``image_newline``) exactly as its forward does.

LLaVA-OneVision cuts an image into crops only when it is the only image of its sample: the
processor's and the model's ``batch_num_images`` (images of each image-bearing sample) decides.
A microbatch has its own samples, so the adapter rebuilds that field per microbatch from the
microbatch's ``n_images_per_sample`` chunk (zeros dropped, as the processor drops image-less
samples) in ``stage_media``: the counts themselves are alignment-only and never reach stage 0.
The whole batch's ``batch_num_images`` is no model input of any stage (``prepare_step_inputs``
hands the engine only the text fields), so it is never split by rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind, _flat
from pp_media._hf.families.registry import family

IMAGES = replace(base.IMAGES, feature_fields=("image_sizes",), requires=("image_sizes",))
VIDEOS = base.VIDEOS

#: A one-character placeholder string: the length of ``replace_image_token``'s result is then
#: the image's token count.
_TOKEN = "\x00"


def _next_counter(config: Any) -> Any:
    """A stand-in for ``LlavaNextProcessor`` with what its token rule reads, from the config:
    pinpoints, patch size, feature strategy and ``num_additional_image_tokens`` (1: the CLS
    token that the ``"default"`` strategy drops, as in the checkpoints' processor configs)."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    class Counter:
        replace_image_token = LlavaNextProcessor.replace_image_token
        _get_number_of_features = LlavaNextProcessor._get_number_of_features
        _get_unpadded_features = LlavaNextProcessor._get_unpadded_features

    counter = Counter()
    counter.image_processor = SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints)
    counter.patch_size = config.vision_config.patch_size
    counter.vision_feature_select_strategy = config.vision_feature_select_strategy
    counter.num_additional_image_tokens = int(config.vision_feature_select_strategy == "default")
    counter.image_token = _TOKEN
    return counter


def _onevision_counter(config: Any) -> Any:
    """A stand-in for ``LlavaOnevisionProcessor``: ``num_image_tokens`` is what the vision
    tower returns per crop (plus the CLS token under ``"default"``, which drops it)."""
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor,
    )

    class Counter:
        replace_image_token = LlavaOnevisionProcessor.replace_image_token
        _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
        _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    vision = config.vision_config
    counter = Counter()
    counter.image_processor = SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints)
    counter.num_image_tokens = (vision.image_size // vision.patch_size) ** 2 + int(
        config.vision_feature_select_strategy == "default"
    )
    counter.vision_feature_select_strategy = config.vision_feature_select_strategy
    counter.vision_aspect_ratio = config.vision_aspect_ratio
    counter.image_token = _TOKEN
    return counter


def _tokens(counter: Any, media: Mapping[str, Any], kind: MediaKind) -> torch.Tensor:
    """The processor's placeholder count of every image in ``media``, int64 ``[n_images]``."""
    inputs = {**media, "image_sizes": media["image_sizes"].tolist()}
    n_images = media[kind.pixel_field].shape[0]
    counts = [len(counter.replace_image_token(inputs, index)) for index in range(n_images)]
    return torch.tensor(counts, dtype=torch.int64)


@family
class LlavaNextAdapter(FamilyAdapter):
    """Every image: a base crop plus its anyres grid, unpadded to the image's aspect ratio, one
    ``image_newline`` per row; ``get_image_features`` returns the packed per-image features."""

    model_types = ("llava_next",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")
    media = (IMAGES,)

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return _tokens(_next_counter(config), media, kind)


def batch_num_images(media: Mapping[str, torch.Tensor], kind: MediaKind) -> torch.Tensor | None:
    """LLaVA-OneVision's ``batch_num_images`` for these media: the images of each sample that
    has any (the processor skips image-less samples), from the per-sample counts; the batch's
    own ``batch_num_images`` without counts; None (every image alone, the model's default)
    without either. Counts and a given ``batch_num_images`` must agree."""
    counts = media.get(kind.count_field)
    given = media.get("batch_num_images")
    if counts is None:
        return None if given is None else torch.as_tensor(given, dtype=torch.int64)
    counts = torch.as_tensor(counts, dtype=torch.int64)
    derived = counts[counts > 0]
    if given is not None and derived.tolist() != torch.as_tensor(given).tolist():
        raise ValueError(
            f"pp_media: batch_num_images {torch.as_tensor(given).tolist()} does not match the "
            f"images per sample {counts.tolist()} (LLaVA-OneVision's processor gives one entry "
            "per sample with images: pass the images grouped by sample)."
        )
    return derived


@family
class LlavaOnevisionAdapter(FamilyAdapter):
    """As LLaVA-NeXT (SigLIP, anyres with ``vision_aspect_ratio`` down-sampling), except that an
    image sharing its sample with others is one crop: ``num_image_tokens + 1`` placeholders.
    The count of an image thus depends on its sample's image count, which ``tokens_per_item``
    and ``features`` take from ``n_images_per_sample`` (the microbatch's chunk of it, which the
    core splits per sample) or, on the whole batch before counts exist, from the processor's
    ``batch_num_images``; stage 0, which gets no counts, reads the microbatch's own
    ``batch_num_images`` that ``stage_media`` adds. Videos are one row per video,
    ``[n_videos, frames, C, H, W]``, each giving ``frames * ceil(side / 2)**2 + 1``
    placeholders (pooled patches plus a newline)."""

    model_types = ("llava_onevision",)
    vision_paths = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")
    media = (IMAGES, VIDEOS)
    #: The processor learns which images share a sample only from images grouped by sample.

    def stage_media(
        self, config: Any, media: dict[str, list[torch.Tensor]]
    ) -> dict[str, list[torch.Tensor]]:
        """Each microbatch's ``batch_num_images``, from its chunk of the per-sample counts."""
        counts = media.get(IMAGES.count_field)
        if counts is None:  # one image per sample: the model's default (each image alone)
            return media
        return {**media, "batch_num_images": [chunk[chunk > 0] for chunk in counts]}

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        if kind.name == "video":
            vision = config.vision_config
            pooled = math.ceil(vision.image_size // vision.patch_size / 2)
            frames = media[kind.pixel_field].shape[1]
            videos = media[kind.pixel_field].shape[0]
            return torch.full((videos,), frames * pooled * pooled + 1, dtype=torch.int64)
        per_sample = batch_num_images(media, kind)
        n_images = media[kind.pixel_field].shape[0]
        if per_sample is None:
            per_sample = torch.ones(n_images, dtype=torch.int64)
        if int(per_sample.sum()) != n_images:
            raise ValueError(
                f"pp_media: {n_images} images but batch_num_images {per_sample.tolist()} "
                f"sums to {int(per_sample.sum())}."
            )
        inputs = {**media, "batch_num_images": per_sample.tolist()}
        return _tokens(_onevision_counter(config), inputs, kind)

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if kind.name == "video":
            return super().features(base_model, kind, media)
        output = base_model.get_image_features(
            media[kind.pixel_field],
            media["image_sizes"],
            batch_num_images=batch_num_images(media, kind),
            return_dict=True,
        )
        return _flat(output.pooler_output), []
