"""The router stats tensor through torch's own schedules on 2 gloo ranks (toy MoE stack).

Proves the carry the MoE families will use (``docs/moe_survey.md``, proposal): each stage
returns ``(hidden, stats [2E + 1])``, the last stage's loss adds ``coef * aux / M``, and the
pipelined loss and every gradient equal a single-process reference that applies the formula per
microbatch; for GPipe, 1F1B (also with a first stage that has no router, whose stats tensor
carries no gradient) and Interleaved1F1B (4 stages on 2 ranks).

Tolerances, fp32: the pipeline sums the two microbatch losses in another order than the
reference (measured up to 4.8e-7 on a loss near 9); gradients measured equal.
"""

from __future__ import annotations

from typing import Any

import pytest
import router_stats_worker as worker_module

from tests.helpers.ranks import case_results, spawn_ranks

CASES = [f"{s}/{n}/{r}" for s, n, r in worker_module.CASES]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(
        worker_module.worker,
        tmp_path_factory.mktemp("router_stats"),
        world_size=worker_module.WORLD,
        timeout_s=120,
    )


@pytest.mark.parametrize("case", CASES)
def test_stats_carry_matches_per_microbatch_reference(
    results: list[dict[str, Any]], case: str
) -> None:
    per_rank = case_results(results, case)
    losses = [r["loss"] for r in per_rank if r["loss"] is not None]
    assert len(losses) == 1, "exactly one rank holds the last stage"
    assert losses[0] == pytest.approx(per_rank[0]["ref_loss"], abs=2e-6)
    for result in per_rank:
        assert result["grad_diff"] <= 1e-6
