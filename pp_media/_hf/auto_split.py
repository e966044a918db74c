"""Choosing how many decoder layers each stage runs, from per-part costs.

The cost model is additive, per training step (forward and backward of every microbatch): stage
s with n decoder layers costs ``stage + n * layer``, plus ``first`` on stage 0 (embeddings,
vision tower, projector, position ids) and ``last`` on the last stage (final norm, LM head,
loss). Decoder layers are taken as equally costly. The split minimises the largest load of a
rank, the sum of its stages' costs (one stage per rank for GPipe / 1F1B, several for the
interleaved and V schedules), and then, within each rank, its most costly stage. Stage 0 may
get no decoder layer at all when the vision tower alone outweighs a rank's share.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pp_media._hf.partition import (
    StageLayout,
    default_stages_per_rank,
    plan_stages,
    schedule_class,
)


@dataclass(frozen=True)
class StageCosts:
    """Per-step forward+backward cost of each part of the model, in ``unit``."""

    #: Stage 0's own work besides its decoder layers: embeddings, vision tower, projector.
    first: float
    #: One decoder layer.
    layer: float
    #: The last stage's own work besides its decoder layers: final norm, LM head and loss.
    last: float
    #: Work every stage does whatever it holds (rotary embedding, attention masks).
    stage: float = 0.0
    #: "seconds" (measured) or "flop" (the FLOP model).
    unit: str = "flop"
    #: How the costs were obtained, in words.
    source: str = ""

    def stage_cost(self, stage: int, n_stages: int, n_layers: int) -> float:
        """Cost of stage ``stage`` of ``n_stages`` holding ``n_layers`` decoder layers."""
        cost = self.stage + n_layers * self.layer
        if stage == 0:
            cost += self.first
        if stage == n_stages - 1:
            cost += self.last
        return cost


@dataclass(frozen=True)
class SplitEstimate:
    """A split's estimated costs: what ``pipe.layout.costs`` shows."""

    #: The per-part costs the split was chosen from.
    parts: StageCosts
    #: Estimated cost of each stage, in ``parts.unit``.
    stages: tuple[float, ...]
    #: Estimated cost of each rank (the sum of its stages).
    ranks: tuple[float, ...]

    @property
    def bottleneck(self) -> float:
        """The slowest rank's cost: what bounds the step time."""
        return max(self.ranks)

    @property
    def ideal(self) -> float:
        """The bound no split can beat: all the work shared out evenly over the ranks."""
        return sum(self.stages) / len(self.ranks)


def estimate(
    costs: StageCosts, counts: Sequence[int], rank_of: Callable[[int], int], pp_size: int
) -> SplitEstimate:
    """The costs of the split ``counts`` (decoder layers per stage) with stage s on rank
    ``rank_of(s)``."""
    n_stages = len(counts)
    stages = tuple(costs.stage_cost(s, n_stages, n) for s, n in enumerate(counts))
    ranks = [0.0] * pp_size
    for s, cost in enumerate(stages):
        ranks[rank_of(s)] += cost
    return SplitEstimate(costs, stages, tuple(ranks))


def _fill(loads: list[float], n_items: int, weight: float) -> list[int]:
    """Give ``n_items`` items of ``weight`` one at a time to the least loaded bin (the lowest
    index among equals); returns the items per bin. For identical items this minimises the
    largest load (each item goes where it raises the maximum least)."""
    loads = list(loads)
    given = [0] * len(loads)
    for _ in range(n_items):
        target = min(range(len(loads)), key=lambda i: (loads[i], i))
        loads[target] += weight
        given[target] += 1
    return given


def auto_layers_per_stage(
    costs: StageCosts,
    n_layers: int,
    n_stages: int,
    rank_of: Callable[[int], int],
    pp_size: int,
) -> tuple[int, ...]:
    """Decoder layers per stage minimising the slowest rank's cost, then each rank's slowest
    stage. Deterministic: equal costs give the same split on every rank."""
    if costs.layer <= 0:
        raise ValueError(
            f"pp_media: a decoder layer's estimated cost is {costs.layer}; the automatic split "
            "needs a positive cost per layer. Pass layers_per_stage explicitly."
        )
    base = [costs.stage_cost(s, n_stages, 0) for s in range(n_stages)]
    stages_of = [[s for s in range(n_stages) if rank_of(s) == r] for r in range(pp_size)]
    rank_loads = [sum(base[s] for s in held) for held in stages_of]
    per_rank = _fill(rank_loads, n_layers, costs.layer)
    counts = [0] * n_stages
    for held, n_rank in zip(stages_of, per_rank, strict=True):
        for s, n in zip(held, _fill([base[s] for s in held], n_rank, costs.layer), strict=True):
            counts[s] = n
    return tuple(counts)


#: ``layers_per_stage`` value asking for the cost-based split.
AUTO = "auto"


def layers_option(value: Sequence[int] | str | None) -> tuple[int, ...] | str | None:
    """``layers_per_stage`` as given: None (balanced), "auto", a sequence of ints, or a string
    of comma-separated ints ("1,3"); anything else is refused naming what was got."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO:
            return AUTO
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(
                f"pp_media: layers_per_stage {value!r} is neither 'auto' nor comma-separated "
                "integers; pass e.g. layers_per_stage='1,3', [1, 3] or 'auto'."
            ) from None
    try:
        if not any(isinstance(n, bool) for n in value):
            return tuple(operator.index(n) for n in value)
    except TypeError:
        pass
    raise TypeError(
        f"pp_media: layers_per_stage must be a sequence of ints, a string like '1,3', or "
        f"'auto'; got {value!r} ({type(value).__name__})."
    )


def choose_layout(
    model: Any,
    adapter: Any,
    config: Any,
    schedule: str,
    pp_size: int,
    stages_per_rank: int | None,
    layers_per_stage: Sequence[int] | str | None,
    *,
    sample_batch: Mapping[str, Any] | None,
    n_microbatches: int,
    group: Any,
    device: Any,
    dtype: Any,
) -> StageLayout:
    """The stage layout for ``build_vlm_pipeline``: balanced, explicit, or with
    ``layers_per_stage="auto"`` chosen from costs measured on ``sample_batch`` by the group's
    rank 0 and broadcast (every rank gets the same split), or from the FLOP model."""
    option = layers_option(layers_per_stage)
    n_layers = len(model.get_submodule(adapter.text_model_path).layers)
    if option != AUTO:
        if sample_batch is not None:
            raise ValueError(
                "pp_media: sample_batch is only used by layers_per_stage='auto' (to measure the "
                f"parts' costs); got layers_per_stage={layers_per_stage!r}. Drop one of them."
            )
        return plan_stages(schedule, pp_size, n_layers, stages_per_rank, option)
    per_rank = stages_per_rank or default_stages_per_rank(schedule_class(schedule))
    n_stages = pp_size * per_rank
    # Validates the combination and gives the stage -> rank placement.
    placement = plan_stages(
        schedule, pp_size, n_layers, stages_per_rank, [n_layers] + [0] * (n_stages - 1)
    )
    from pp_media._hf import stage_costs

    if sample_batch is None:
        costs = stage_costs.flop_stage_costs(model, adapter, config)
    else:
        costs = _measured_on_rank0(
            model, adapter, config, sample_batch, n_microbatches, group, device, dtype
        )
    counts = auto_layers_per_stage(costs, n_layers, n_stages, placement.rank_of, pp_size)
    layout = plan_stages(schedule, pp_size, n_layers, stages_per_rank, counts)
    return replace(layout, costs=estimate(costs, counts, layout.rank_of, pp_size))


def _measured_on_rank0(
    model: Any,
    adapter: Any,
    config: Any,
    batch: Mapping[str, Any],
    n_microbatches: int,
    group: Any,
    device: Any,
    dtype: Any,
) -> StageCosts:
    """Costs measured by the group's rank 0 and broadcast; an error there is raised on every
    rank (a bad batch raises the same error everywhere before any collective)."""
    import torch
    import torch.distributed as dist

    from pp_media._hf.batch import prepare_step_inputs
    from pp_media._hf.stage_costs import measure_stage_costs

    prepare_step_inputs(batch, adapter, config, n_microbatches)
    result: list[Any] = [None]
    if dist.get_rank(group) == 0:
        try:
            result[0] = measure_stage_costs(
                model, adapter, config, batch, n_microbatches, torch.device(device), dtype
            )
        except Exception as error:  # re-raised on every rank below
            result[0] = RuntimeError(f"pp_media: measuring the stage costs failed: {error!r}")
    on = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    dist.broadcast_object_list(result, group=group, group_src=0, device=on)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]
