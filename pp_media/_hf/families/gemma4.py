"""Gemma4: per-layer inputs from stage 0 and keys/values shared across layers, sent on with
their gradients; stages keep the full text config and run their layers by global index.

What crosses a stage boundary, besides the hidden states, and why it is sent rather than
recomputed or kept on one stage:

- **Per-layer inputs.** Every decoder layer ``i`` adds ``per_layer_inputs[:, :, i]``
  (``[b, T, hidden_size_per_layer_input]``), which stage 0 computes from the token ids
  (``embed_tokens_per_layer``, media placeholders read as padding) and from the embeddings with
  the image features in place (``per_layer_model_projection``, ``per_layer_projection_norm``).
  A later layer's slice is sent with its gradient, which flows back into those three modules
  and, through the embeddings, into the vision tower. Recomputing it on the stage that needs it
  would need the embeddings with their gradient anyway plus a copy of
  ``embed_tokens_per_layer`` (262144 x 7680 = 2.0e9 parameters at ``Gemma4TextConfig()``'s
  sizes), so those three modules live on stage 0 only.
- **Shared keys and values.** The last ``num_kv_shared_layers`` layers have no key/value
  projections: they attend with the keys and values the last earlier layer of their type stored
  (``kv_sharing_modes``). When a reuse layer runs on a later stage than its store layer, that
  type's keys and values (``[b, kv_heads, T, head_dim]`` each, head sizes per type from
  ``per_layer_config``) are sent with their gradients. Constraining the split instead (each
  reuse layer on its store layer's stage) would force the whole shared block onto one stage
  together with the last non-shared layer of each type, however many layers that is: with
  many shared layers no balanced split would be left. The keys and values cost
  ``2 * kv_heads * head_dim`` numbers per token and layer type, once per boundary.

The text config is heterogeneous (``per_layer_config`` keyed by global layer index) and
``kv_sharing_modes`` is derived from ``num_hidden_layers``: a stage's view of the config cut to
its layers would describe other layers. So every stage keeps the full config and runs its
layers by their global indices, with the masks, rotary embeddings and layer calls of
``Gemma4TextModel.forward``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pp_media._core.errors import media_error, require_int_tensor
from pp_media._hf.carry import EMBEDDING, Carry
from pp_media._hf.families import base
from pp_media._hf.families.base import FamilyAdapter, MediaKind
from pp_media._hf.families.registry import family
from pp_media._layouts import GEMMA4_LAYOUT

IMAGES = replace(
    base.IMAGES, feature_fields=("image_position_ids",), requires=("image_position_ids",)
)
#: Videos: ``get_video_features`` takes every frame's patch positions and the frames of each
#: video (it splits the features per video by them).
_VIDEO_FIELDS = ("video_position_ids", "num_frames_per_video")
VIDEOS = replace(base.VIDEOS, feature_fields=_VIDEO_FIELDS, requires=_VIDEO_FIELDS)
#: Text-model modules only stage 0 runs: the per-layer input embedding and projection.
PER_LAYER_INPUT_MODULES = (
    "embed_tokens_per_layer",
    "per_layer_model_projection",
    "per_layer_projection_norm",
)
#: Config attributes of the placeholder tokens ``Gemma4Model`` reads as padding for the
#: per-layer embedding.
_MEDIA_TOKENS = ("image_token_id", "video_token_id", "audio_token_id")


def media_positions(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Where ``input_ids`` holds a media placeholder of any kind (``get_placeholder_mask``)."""
    found = torch.zeros_like(input_ids, dtype=torch.bool)
    for name in _MEDIA_TOKENS:
        token = getattr(config, name, None)
        if token is not None:
            found |= input_ids == token
    return found


def per_layer_inputs(
    text: nn.Module, config: Any, input_ids: torch.Tensor, inputs_embeds: torch.Tensor
) -> torch.Tensor:
    """``[b, T, num_hidden_layers, hidden_size_per_layer_input]``, as ``Gemma4Model.forward``
    and ``Gemma4TextModel.forward`` compute them: token part from the ids with placeholders as
    padding, projected part from ``inputs_embeds`` (the image features in place)."""
    pad = config.get_text_config().pad_token_id
    token_ids = input_ids.masked_fill(media_positions(config, input_ids), pad)
    return text.project_per_layer_inputs(inputs_embeds, text.get_per_layer_inputs(token_ids))


def store_layers(text_config: Any) -> dict[str, int]:
    """Layer type -> the layer that stores its keys and values, for the types that reuse
    layers read."""
    modes, types = text_config.kv_sharing_modes, text_config.layer_types
    read = {types[i] for i, mode in enumerate(modes) if mode == "reuse"}
    return {types[i]: i for i, mode in enumerate(modes) if mode == "store" and types[i] in read}


def reuse_layers(text_config: Any) -> dict[str, tuple[int, ...]]:
    """Layer type -> the layers that attend with its shared keys and values."""
    found: dict[str, list[int]] = {}
    for i, mode in enumerate(text_config.kv_sharing_modes):
        if mode == "reuse":
            found.setdefault(text_config.layer_types[i], []).append(i)
    return {kind: tuple(layers) for kind, layers in found.items()}


def per_layer_input_name(layer: int) -> str:
    return f"per_layer_input.{layer}"


def shared_kv_names(layer_type: str) -> tuple[str, str]:
    """The carries of one layer type's shared keys and values."""
    return f"kv.{layer_type}.key", f"kv.{layer_type}.value"


def per_layer_input_carries(text_config: Any) -> tuple[Carry, ...]:
    """One ``[b, T, hidden_size_per_layer_input]`` carry per decoder layer, from stage 0 to
    that layer, with gradient; none without per-layer inputs."""
    size = text_config.hidden_size_per_layer_input
    if not size:
        return ()
    return tuple(
        Carry(
            per_layer_input_name(i),
            EMBEDDING,
            (i,),
            lambda config, batch, seq, size=size: (batch, seq, size),
            grad=True,
        )
        for i in range(text_config.num_hidden_layers)
    )


def shared_kv_carries(text_config: Any) -> tuple[Carry, ...]:
    """Per layer type with reuse layers, its keys and values ``[b, kv_heads, T, head_dim]``
    (sizes of the store layer, from ``per_layer_config``), from the store layer to the reuse
    layers, with gradient."""
    reuse = reuse_layers(text_config)
    carries: list[Carry] = []
    for kind, store in store_layers(text_config).items():
        layer = text_config.per_layer_config[store]

        def shape(
            config: Any,
            batch: int,
            seq: int,
            heads: int = layer.num_key_value_heads,
            size: int = layer.head_dim,
        ) -> tuple[int, ...]:
            return (batch, heads, seq, size)

        carries += [
            Carry(name, store, reuse[kind], shape, grad=True) for name in shared_kv_names(kind)
        ]
    return tuple(carries)


def run_layers(
    text: nn.Module,
    layer_indices: Sequence[int],
    hidden: torch.Tensor,
    masks: Mapping[str, Any],
    own_inputs: Sequence[torch.Tensor | None],
    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The stage's decoder layers by global index, as ``Gemma4TextModel.forward`` calls them
    (its per-type rotary embeddings and masks, one shared key/value dict), then the text
    model's final norm (an identity before the last stage): ``own_inputs[j]`` is the per-layer
    input of the stage's ``j``-th layer; ``shared_kv`` holds the received keys and values and
    gets those the stage's store layers write."""
    from transformers.cache_utils import KVSharingDict

    text_config = text.config
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    kinds = sorted({text_config.layer_types[i] for i in layer_indices})
    rotary = {kind: text.rotary_emb(hidden, position_ids, kind) for kind in kinds}
    shared = KVSharingDict(shared_kv)
    for index, layer, own in zip(layer_indices, text.layers, own_inputs, strict=True):
        kind = text_config.layer_types[index]
        hidden = layer(
            hidden,
            own,
            shared_kv_states=shared,
            position_embeddings=rotary[kind],
            attention_mask=masks[kind],
            position_ids=position_ids,
        )
    shared_kv.update(shared)
    return text.norm(hidden)


@family
class Gemma4Adapter(FamilyAdapter):
    """Images one row each, padded to the batch's most patches, with ``image_position_ids``
    (-1 at padding); placeholders per image = real patches / ``pooling_kernel_size**2``.
    Videos: one row per frame, every video's frames concatenated (``pixel_values_videos``,
    ``video_position_ids`` following the frame rows), ``num_frames_per_video`` rows per video;
    placeholders per video = the sum over its frames of real patches / ``pooling_kernel_size**2``
    (one run per frame, after its timestamp). Image and video blocks attend bidirectionally in
    sliding layers (``use_bidirectional_attention="vision"``): every stage builds the masks from
    its microbatch's ``mm_token_type_ids`` (1 at image, 2 at video placeholders), as the model.
    Audio is not wired."""

    model_types = ("gemma4",)
    vision_paths = ("model.vision_tower", "model.embed_vision")
    media = (IMAGES, VIDEOS)
    media_layout = GEMMA4_LAYOUT
    stage_fields = ("mm_token_type_ids",)
    stage0_only_paths = tuple(f"model.language_model.{name}" for name in PER_LAYER_INPUT_MODULES)

    def stage_config(self, config: Any, layers: tuple[int, ...]) -> Any:
        """The full text config: its layers read it by global index (see the module)."""
        return config

    def carries(self, config: Any) -> tuple[Carry, ...]:
        text_config = config.get_text_config()
        return (
            *super().carries(config),
            *per_layer_input_carries(text_config),
            *shared_kv_carries(text_config),
        )

    def first_stage_carries(
        self,
        stage: nn.Module,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Every layer's per-layer input (stage 0's own layers read theirs from here too)."""
        config = stage.config
        if not config.get_text_config().hidden_size_per_layer_input:
            return {}
        text = stage.get_submodule(self.text_model_path)
        inputs = per_layer_inputs(text, config, input_ids, hidden)
        # Contiguous: sent point to point as they are.
        return {
            per_layer_input_name(i): inputs[:, :, i].contiguous() for i in range(inputs.shape[2])
        }

    def run_text_model(
        self,
        text_model: nn.Module,
        carried: Mapping[str, torch.Tensor],
        layers: tuple[int, ...],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage's layers by global index with their per-layer inputs and the received
        shared keys and values; produces the keys and values its store layers write."""
        text_config = text_model.config
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind in reuse_layers(text_config):
            key, value = shared_kv_names(kind)
            if key in carried:
                shared[kind] = (carried[key], carried[value])
        hidden = run_layers(
            text_model,
            layers,
            kwargs["inputs_embeds"],
            kwargs["attention_mask"],
            [carried.get(per_layer_input_name(i)) for i in layers],
            shared,
        )
        produced: dict[str, torch.Tensor] = {}
        for kind, store in store_layers(text_config).items():
            if store in layers:
                for name, tensor in zip(shared_kv_names(kind), shared[kind], strict=True):
                    produced[name] = tensor.contiguous()
        return hidden, produced

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per image: its real patches (``*_position_ids`` not -1) pooled; per video: the sum
        of its frames' (``get_image_features`` / ``get_video_features`` split so)."""
        positions = media[kind.feature_fields[0]]
        real = (positions != -1).all(dim=-1).sum(dim=-1)
        tokens = real.to(torch.int64) // config.vision_config.pooling_kernel_size**2
        if kind.name != "video":
            return tokens
        frames = require_int_tensor("num_frames_per_video", media["num_frames_per_video"], 1)
        counts = frames.tolist()
        if sum(counts) != tokens.shape[0] or min(counts, default=0) < 0:
            raise media_error(
                "num_frames_per_video",
                frames,
                f"non-negative frame counts that sum to {tokens.shape[0]}, the frame rows of "
                f"'{kind.feature_fields[0]}' (shape {tuple(positions.shape)})",
                f"They sum to {sum(counts)}; pass the counts the video processor emitted.",
            )
        ends = torch.tensor([0, *itertools.accumulate(counts)], device=tokens.device)
        sums = torch.cat((tokens.new_zeros(1), tokens.cumsum(0)))
        return sums[ends[1:]] - sums[ends[:-1]]

    def layer_mask(
        self,
        config: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
    ) -> Any:
        from transformers import Gemma4ForConditionalGeneration

        return Gemma4ForConditionalGeneration.create_masks_for_generate(
            config,
            hidden,
            attention_mask,
            None,
            torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0),
            mm_token_type_ids=fields.get("mm_token_type_ids"),
        )

    def final_logits(self, config: Any, logits: torch.Tensor) -> torch.Tensor:
        cap = config.get_text_config().final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
