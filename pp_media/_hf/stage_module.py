"""The module one pipeline stage runs: generic over families, driven by the family adapter.

Stage 0 embeds the tokens, runs the vision parts on the microbatch's own media (its forward
keyword arguments, routed by ``step_with_media``), scatters the features into the placeholder
positions and computes position ids. Every stage then runs its decoder layers through the
family's own text-model forward (same masks, rotary embedding and layer calls as the unsplit
model), and the last stage applies the final norm and the LM head. Between stages travel the
hidden states ``[b, T, H]``, for M-RoPE families the position ids, and for families whose
leading decoder layers add media features (Qwen3-VL's deepstack) a media-position mask and one
dense ``[b, T, H]`` feature tensor per such layer that a later stage still runs: dense tensors of
the same shape in every microbatch, as torch's receive buffers require.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pp_media._hf.families.base import FamilyAdapter


class VLMStage(nn.Module):
    """One stage of a Hugging Face VLM; parameter names are the unsplit model's."""

    def __init__(
        self,
        pruned: nn.Module,
        adapter: FamilyAdapter,
        config: Any,
        stage_index: int,
        n_stages: int,
        layers: tuple[int, ...],
        first_layer: int,
    ) -> None:
        super().__init__()
        for name, module in pruned.named_children():
            self.add_module(name, module)
        self.adapter = adapter
        self.config = config
        self.stage_index = stage_index
        self.n_stages = n_stages
        self.layer_indices = layers
        #: Global index of this stage's first decoder layer (where it would be, if it has none).
        self.first_layer = first_layer
        self.layer_feature_count = adapter.layer_feature_count(config)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def extra_repr(self) -> str:
        held = (
            f"layers {self.layer_indices[0]}..{self.layer_indices[-1]}"
            if self.layer_indices
            else "no layers"
        )
        return f"stage {self.stage_index} of {self.n_stages}, {held}"

    def _embed(
        self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Token embeddings with the media features in place; the media-position mask and the
        dense per-layer features (zero off the media positions)."""
        adapter = self.adapter
        base = self.get_submodule(adapter.base_model_path)
        embed_tokens = self.get_submodule(adapter.text_model_path).embed_tokens
        token_ids = input_ids
        for kind in adapter.media:
            token_id = adapter.token_id(self.config, kind)
            if token_id >= embed_tokens.num_embeddings:
                # Out-of-vocabulary placeholders (Gemma, PaliGemma): their rows are overwritten
                # by features below, so any in-range id gives the same values and gradients.
                token_ids = token_ids.masked_fill(token_ids == token_id, 0)
        hidden = embed_tokens(token_ids)
        visual_mask = torch.zeros(input_ids.shape, dtype=torch.int64, device=input_ids.device)
        # Leaves that require grad, so every microbatch's outputs have the same autograd shape.
        per_layer = [
            torch.zeros_like(hidden).requires_grad_(torch.is_grad_enabled())
            for _ in range(self.layer_feature_count)
        ]
        for kind in adapter.media:
            if media.get(kind.pixel_field) is None:
                continue
            extracted = adapter.features(base, kind, media)
            if extracted is None:
                continue
            features, layer_features = extracted
            positions = input_ids == adapter.token_id(self.config, kind)
            placeholders = positions.unsqueeze(-1)
            hidden = hidden.masked_scatter(placeholders, features.to(hidden.dtype))
            visual_mask = visual_mask | positions.long()
            per_layer = [
                dense.masked_scatter(placeholders, extra.to(hidden.dtype))
                for dense, extra in zip(per_layer, layer_features, strict=True)
            ]
        return hidden, visual_mask, per_layer

    def forward(
        self,
        *inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Stage 0: ``(input_ids,)`` plus its microbatch's media as keyword arguments; later
        stages: what the previous stage returned. Every stage also gets its microbatch's
        ``attention_mask`` and the family's ``stage_fields``."""
        adapter = self.adapter
        fields = {name: kwargs.pop(name) for name in adapter.stage_fields if name in kwargs}
        position_ids: torch.Tensor | None = None
        visual_mask: torch.Tensor | None = None
        carried: list[torch.Tensor] = []
        if self.is_first:
            (input_ids,) = inputs
            hidden, visual_mask, carried = self._embed(input_ids, kwargs)
            if adapter.sends_position_ids:
                base = self.get_submodule(adapter.base_model_path)
                position_ids = adapter.position_ids(base, input_ids, attention_mask, fields, kwargs)
        else:
            hidden, *rest = inputs
            if adapter.sends_position_ids:
                position_ids, *rest = rest
            if rest:
                visual_mask, *carried = rest
        own = carried[: len(self.layer_indices)]
        text_kwargs = adapter.text_model_kwargs(visual_mask, own) if own else {}
        text = self.get_submodule(adapter.text_model_path)
        mask = adapter.layer_mask(self.config, hidden, attention_mask, position_ids, fields)
        hidden = text(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            **text_kwargs,
        ).last_hidden_state
        if self.is_last:
            logits = self.get_submodule(adapter.head_path)(adapter.head_input(self.config, hidden))
            return adapter.final_logits(self.config, logits)
        outputs = [hidden]
        if position_ids is not None:
            outputs.append(position_ids)
        passed_on = carried[len(self.layer_indices) :]
        if passed_on:
            outputs += [visual_mask, *passed_on]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
