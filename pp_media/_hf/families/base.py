"""What a Hugging Face VLM family is, as far as stage splitting cares: a declarative adapter.

A family states where its parts live, which media fields it takes and how each becomes features,
its placeholder-token rule, and how stage 0 computes position ids. Everything else (pruning
the model into stages, the stage forward, loss, weight loading) is generic and lives once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pp_media._hf.carry import Carry, deepstack_carries, position_ids_carry
from pp_media._layouts import SEED_LAYOUT, MediaLayout


@dataclass(frozen=True)
class MediaKind:
    """One kind of media a family takes (images, videos) and how it becomes features."""

    #: Name used in messages: "image", "video".
    name: str
    #: Processor field holding the pixels: "pixel_values", "pixel_values_videos".
    pixel_field: str
    #: Config attribute with the placeholder token id: "image_token_id".
    token_id_attr: str
    #: Batch field with the items per sample, derived from the placeholders when absent.
    count_field: str
    #: Method of the family's base model (``model.model``) that returns the features.
    features_method: str
    #: Media fields passed to ``features_method`` by keyword, besides ``pixel_field``.
    feature_fields: tuple[str, ...] = ()
    #: Dim 0 of the pixels counts samples, each padded to the batch's most items (Idefics3).
    rows_per_sample: bool = False
    #: Batch fields that must come with ``pixel_field`` (the placeholder rule or the feature
    #: method reads them: Qwen-VL's ``image_grid_thw``); a batch without one is refused by name.
    requires: tuple[str, ...] = ()
    #: ``(field, needed)`` pairs: ``needed`` must come whenever ``field`` does (Step3p7's local
    #: crops and their counts per sample).
    requires_with: tuple[tuple[str, str], ...] = ()
    #: Batch field with the rows of ``pixel_field`` per item (the layout's ``CountRows``),
    #: derived by the family's ``rows_per_item`` when absent (Llama 4's tiles per image); like
    #: ``count_field`` it only aligns media and is no model input.
    rows_field: str | None = None


#: Images as most processors emit them; a family adds what its feature method takes
#: (``dataclasses.replace(IMAGES, feature_fields=("image_grid_thw",))``).
IMAGES = MediaKind(
    name="image",
    pixel_field="pixel_values",
    token_id_attr="image_token_id",
    count_field="n_images_per_sample",
    features_method="get_image_features",
)
VIDEOS = MediaKind(
    name="video",
    pixel_field="pixel_values_videos",
    token_id_attr="video_token_id",
    count_field="n_videos_per_sample",
    features_method="get_video_features",
)


def _flat(features: Any) -> torch.Tensor:
    """Per-item features (a tensor, or a list of per-item tensors) as ``[tokens, hidden]``."""
    if isinstance(features, (list, tuple)):
        return torch.cat([item.reshape(-1, item.shape[-1]) for item in features])
    return features.reshape(-1, features.shape[-1])


class FamilyAdapter:
    """Defaults shared by most families; a family overrides what differs."""

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: Paths, from the ``*ForConditionalGeneration`` root, of the vision parts (stage 0 only).
    vision_paths: tuple[str, ...] = ()
    #: Path of the text decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
    text_model_path: str = "model.language_model"
    #: Path of the base model whose methods compute features and position ids.
    base_model_path: str = "model"
    head_path: str = "lm_head"
    media: tuple[MediaKind, ...] = ()
    #: Stage 0 computes position ids and sends them downstream with the hidden states.
    sends_position_ids: bool = False
    #: Per-sample batch fields that every stage receives for its own microbatch (split by the
    #: engine as step keyword arguments), besides ``attention_mask``; ``step_fields`` picks
    #: them out of the batch.
    stage_fields: tuple[str, ...] = ()
    #: How the processor's media fields map to samples (``pp_media.MediaLayout``): the seed's
    #: layouts, or the family's own description when its processor names fields otherwise.
    media_layout: MediaLayout = SEED_LAYOUT
    #: Paths, from the ``*ForConditionalGeneration`` root, of modules besides the vision parts
    #: that only stage 0 runs (Gemma4's per-layer embeddings); later stages hold None there.
    stage0_only_paths: tuple[str, ...] = ()

    def token_id(self, config: Any, kind: MediaKind) -> int:
        return int(getattr(config, kind.token_id_attr))

    def tokens_per_item(
        self, config: Any, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Placeholder tokens of each item of ``kind`` in ``media``, as a 1-D int64 tensor."""
        raise NotImplementedError

    def rows_per_item(
        self, config: Any, kind: MediaKind, batch: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """``kind.rows_field`` for a collated ``batch`` that lacks it: rows of
        ``kind.pixel_field`` per item (1-D int64), from what the processor does emit; None when
        the batch cannot tell (the layout then takes one row per item). Called only for kinds
        with a ``rows_field``, before the items per sample are derived; raises ``ValueError``
        naming the field that disagrees."""
        return None

    def features(
        self, base_model: nn.Module, kind: MediaKind, media: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """Features of every item of ``kind`` in item order, ``[tokens, hidden]``, and the
        per-layer features the family adds inside the decoder (``layer_feature_count`` of
        them, each ``[tokens, hidden]``; Qwen3-VL's deepstack). None when the microbatch's
        media hold no item (only padding)."""
        fields = {name: media[name] for name in kind.feature_fields if name in media}
        output = getattr(base_model, kind.features_method)(
            media[kind.pixel_field], **fields, return_dict=True
        )
        return _flat(output.pooler_output), [_flat(layer) for layer in self.layer_features(output)]

    def layer_feature_count(self, config: Any) -> int:
        """How many leading decoder layers add media features to their output (0: none)."""
        return 0

    def layer_features(self, output: Any) -> list[Any]:
        """The per-layer features in a ``features_method`` output."""
        return []

    def text_model_kwargs(
        self, visual_mask: torch.Tensor, layer_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """Text-model arguments that add ``layer_features[i]`` (dense ``[b, T, hidden]``, zero
        off the media positions) after the stage's i-th decoder layer."""
        raise NotImplementedError

    def position_ids(
        self,
        base_model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """Position ids stage 0 sends downstream (only when ``sends_position_ids``), from the
        microbatch's tokens, ``stage_fields`` and media."""
        return None

    def layer_mask(
        self,
        config: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        fields: Mapping[str, torch.Tensor],
    ) -> Any:
        """What the text model gets as ``attention_mask`` on every stage: the 2-D mask itself
        (the text model builds its causal masks), or masks built as the family's base model
        builds them (a dict per layer type), from ``stage_fields`` such as ``token_type_ids``."""
        return attention_mask

    def carries(self, config: Any) -> tuple[Carry, ...]:
        """What crosses stage boundaries besides the hidden states, in the order sent
        (``pp_media._hf.carry``): position ids when ``sends_position_ids``, then the
        deepstack mask and features when ``layer_feature_count`` is non-zero. The pipeline
        appends ``router_stats`` when the router loss is on."""
        text = config.get_text_config()
        schema: list[Carry] = []
        if self.sends_position_ids:
            schema.append(position_ids_carry(self.position_ids_shape, text.num_hidden_layers))
        schema += deepstack_carries(self.layer_feature_count(config), text.hidden_size)
        return tuple(schema)

    def position_ids_shape(self, config: Any, batch: int, seq: int) -> tuple[int, ...]:
        """Shape of the position ids stage 0 sends, per microbatch (M-RoPE: ``[3, b, T]``)."""
        return (3, batch, seq)

    def first_stage_carries(
        self,
        stage: nn.Module,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        fields: Mapping[str, torch.Tensor],
        media: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Further carries stage 0 produces from its microbatch (``hidden``: the embeddings
        with the media features in place); ``stage`` reaches the family's stage-0 modules by
        path. Default none."""
        return {}

    def run_text_model(
        self,
        text_model: nn.Module,
        carried: Mapping[str, torch.Tensor],
        layers: tuple[int, ...],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run a stage's text model (holding decoder ``layers``, global indices) on ``kwargs``
        (``inputs_embeds``, ``attention_mask``, ``position_ids``, ...); the hidden states and
        the carries those layers produce (from ``carried``: what the stage holds by name).
        Default: the text model's own forward, producing none."""
        return text_model(**kwargs).last_hidden_state, {}

    def stage_config(self, config: Any, layers: tuple[int, ...]) -> Any:
        """The text config as the text model of a stage holding decoder ``layers`` sees it.
        Default: a copy with the per-layer lists (``layer_types``) cut to those layers and
        ``num_hidden_layers`` their count, as the text model's forward indexes them by
        position. A family whose layers read the full config by global index (Gemma4)
        returns it unchanged."""
        view = copy.copy(config)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            view.layer_types = [layer_types[i] for i in layers]
        view.num_hidden_layers = len(layers)
        return view

    def router(self, layer: nn.Module) -> tuple[nn.Module, int] | None:
        """For one decoder layer, the module whose forward output transformers records as
        ``router_logits`` and the index into that output; None for a layer without experts
        (the default: no router load-balancing loss)."""
        return None

    def text_model_fields(self, fields: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Text-model keyword arguments, from this microbatch's ``stage_fields``, that every
        MoE layer needs (ernie4_5_vl_moe's ``moe_mm_token_type_ids``); default none."""
        return {}

    def final_logits(self, config: Any, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's output as the family's ``forward`` returns it (e.g. soft-capped)."""
        return logits

    def head_input(self, config: Any, hidden: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden states as the family's ``forward`` feeds them to the LM
        head (Inkling divides them by its muP width multiplier first); default unchanged."""
        return hidden

    def stage_media(
        self, config: Any, media: dict[str, list[torch.Tensor]]
    ) -> dict[str, list[torch.Tensor]]:
        """The prepared per-microbatch media chunks, plus any fields the family derives from
        them for stage 0 (which never gets the alignment-only counts such as
        ``n_images_per_sample``): LLaVA-OneVision's per-microbatch ``batch_num_images``."""
        return media

    def step_fields(
        self, config: Any, batch: Mapping[str, Any], has_media: bool
    ) -> dict[str, torch.Tensor]:
        """The ``stage_fields`` of one collated batch, as every stage gets them (``has_media``:
        whether the batch carries any media); a family derives here what its collates may
        leave out. Default: those the batch has."""
        return {name: batch[name] for name in self.stage_fields if batch.get(name) is not None}
