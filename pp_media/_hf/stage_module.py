"""The module one pipeline stage runs: generic over families, driven by the family adapter.

Stage 0 embeds the tokens, runs the vision parts on the microbatch's own media (its forward
keyword arguments, routed by ``step_with_media``), scatters the features into the placeholder
positions and computes position ids. Every stage then runs its decoder layers through the
family's own text-model forward (same masks, rotary embedding and layer calls as the unsplit
model), and the last stage applies the final norm and the LM head. Between stages travel the
hidden states ``[b, T, H]`` and the family's named carries that a later stage still reads
(``pp_media._hf.carry``: M-RoPE position ids, Qwen3-VL's deepstack mask and features, the
router statistics when the router loss is on), packed and unpacked by name in schema order.

The router load-balancing loss (``RouterLoss``): stage 0 starts ``router_stats`` from zeros,
every stage adds its own MoE layers' recorded router logits (the adapter's ``router(layer)``,
hooked by ``recording_router_logits``), weighted by the microbatch's attention mask with the
rows that only pad the microbatch zeroed (``ROUTER_MASK``); the last stage returns the stats
beside its logits, and the pipeline's loss adds ``coef * aux`` of the microbatch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pp_media._hf import carry
from pp_media._hf.families.base import FamilyAdapter
from pp_media._hf.router_loss import RouterLoss, recording_router_logits

#: Name of the router statistics carry.
ROUTER_STATS = "router_stats"
#: Step keyword argument (every stage): the microbatch's attention mask with the rows that pad
#: it to the even microbatch size zeroed, for the router statistics; sent only when the router
#: loss is on and the batch was padded (else the attention mask itself counts).
ROUTER_MASK = "pp_router_mask"


def stage_schema(
    adapter: FamilyAdapter, config: Any, router_loss: RouterLoss | None
) -> tuple[carry.Carry, ...]:
    """The family's carries, plus ``router_stats`` when the router loss is on."""
    schema = adapter.carries(config)
    if router_loss is None:
        return schema
    return (*schema, carry.router_stats_carry(ROUTER_STATS, router_loss.size))


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
        *,
        router_loss: RouterLoss | None = None,
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
        #: The load-balancing loss whose statistics this stage adds to; None: off.
        self.router_loss = router_loss
        #: What crosses stage boundaries (the same on every stage of the pipeline).
        self.schema = stage_schema(adapter, config, router_loss)
        routers = [
            found
            for layer in self.get_submodule(adapter.text_model_path).layers
            if (found := adapter.router(layer)) is not None
        ]
        indices = {index for _, index in routers}
        if len(indices) > 1:
            raise ValueError(
                f"pp_media: the {type(adapter).__name__} routers record different output "
                f"indices {sorted(indices)}; one index per family is supported."
            )
        # Plain list: the routers stay registered under their decoder layers only.
        self._routers = [module for module, _ in routers] if router_loss is not None else []
        self._router_index = indices.pop() if indices else 0

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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token embeddings with the media features in place; for families with per-layer
        media features, the named media-position mask and dense per-layer features (zero off
        the media positions)."""
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
        # Sent requiring grad (``carry.pack``), so every microbatch has the same autograd shape.
        per_layer = [torch.zeros_like(hidden) for _ in range(self.layer_feature_count)]
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
        if not per_layer:
            return hidden, {}
        named = {carry.deepstack_name(i): dense for i, dense in enumerate(per_layer)}
        return hidden, {"visual_mask": visual_mask, **named}

    def forward(
        self,
        *inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Stage 0: ``(input_ids,)`` plus its microbatch's media as keyword arguments; later
        stages: ``(hidden, *carries)`` as the previous stage packed them. Every stage also gets
        its microbatch's ``attention_mask``, the family's ``stage_fields`` and, when the
        router loss is on and the batch was padded, ``ROUTER_MASK``. Returns ``(hidden,
        *carries)`` for the next stage; the last stage its logits, or ``(logits,
        router_stats)`` when the router loss is on."""
        adapter = self.adapter
        fields = {name: kwargs.pop(name) for name in adapter.stage_fields if name in kwargs}
        router_mask = kwargs.pop(ROUTER_MASK, attention_mask)
        if self.is_first:
            (input_ids,) = inputs
            hidden, named = self._embed(input_ids, kwargs)
            base = self.get_submodule(adapter.base_model_path)
            if adapter.sends_position_ids:
                named["position_ids"] = adapter.position_ids(
                    base, input_ids, attention_mask, fields, kwargs
                )
            named.update(adapter.first_stage_carries(self, input_ids, hidden, fields, kwargs))
            if self.router_loss is not None:
                named[ROUTER_STATS] = self.router_loss.zeros(hidden.device)
        else:
            hidden, *received = inputs
            named = carry.unpack(self.schema, self.first_layer, received)
        hidden, produced = self._run_layers(hidden, named, attention_mask, fields, router_mask)
        named.update(produced)
        if self.is_last:
            logits = self.get_submodule(adapter.head_path)(hidden)
            logits = adapter.final_logits(self.config, logits)
            for_loss = [named[c.name] for c in carry.loss_carries(self.schema)]
            return (logits, *for_loss) if for_loss else logits
        cut = self.first_layer + len(self.layer_indices)
        sent = carry.pack(self.schema, cut, named, self.config, hidden)
        return (hidden, *sent) if sent else hidden

    def _run_layers(
        self,
        hidden: torch.Tensor,
        named: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None,
        fields: dict[str, torch.Tensor],
        router_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This stage's decoder layers through the family's text model: the hidden states and
        the carries the layers produce (the router stats with this stage's layers added)."""
        adapter = self.adapter
        position_ids = named.get("position_ids")
        features = [
            named[name]
            for name in (carry.deepstack_name(i) for i in self.layer_indices)
            if name in named
        ]
        text_kwargs = adapter.text_model_kwargs(named["visual_mask"], features) if features else {}
        text_kwargs.update(adapter.text_model_fields(fields))
        text = self.get_submodule(adapter.text_model_path)
        mask = adapter.layer_mask(self.config, hidden, attention_mask, position_ids, fields)
        with recording_router_logits(self._routers, self._router_index) as recorded:
            hidden, produced = adapter.run_text_model(
                text,
                named,
                self.layer_indices,
                inputs_embeds=hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
                **text_kwargs,
            )
        if self.router_loss is not None:
            stats = named[ROUTER_STATS]
            # A stage without MoE layers must not hand on the very tensor it received.
            produced[ROUTER_STATS] = (
                self.router_loss.accumulate(stats, recorded, router_mask)
                if recorded
                else stats.clone()
            )
        return hidden, produced
