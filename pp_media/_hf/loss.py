"""The pipeline's loss: the causal-LM loss split so that pipelined microbatches add up to the
unsplit model's, plus, when the router loss is on, each microbatch's router load-balancing term.

The auxiliary-loss channel: with the router loss on, the last stage returns ``(logits,
router_stats)`` and this loss callable, and nothing else, adds ``coef * aux / n_terms`` of the
microbatch (``RouterLoss.loss_term``), so the router loss is neither dropped nor counted twice.
It records each microbatch's detached ``aux`` (without the coefficient) in ``router_losses``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens the shifted causal-LM loss counts: labels after the first position, not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class TokenSumCrossEntropy:
    """Per microbatch: the sum of its token losses divided by the label tokens of the *whole*
    batch. With ``scale_grads=False`` the microbatch losses and gradients then add up to
    Hugging Face's ``labels=`` loss, the mean over every label token of the batch.

    ``router_loss`` (a ``RouterLoss``): the output is ``(logits, router_stats)`` and the
    microbatch's loss gains ``router_loss.loss_term(stats, n_terms)``; ``n_terms`` is the
    number of microbatches the global batch is computed in (microbatches x data-parallel
    replicas), so the step keeps the unsplit model's scale."""

    def __init__(self, router_loss: Any = None, n_terms: int = 1) -> None:
        #: Label tokens of the whole batch of the step being run; set before each step.
        self.label_tokens = 1
        self.router_loss = router_loss
        self.n_terms = n_terms
        #: Each microbatch's detached router ``aux`` since the last reset, in call order.
        self.router_losses: list[torch.Tensor] = []

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        if self.router_loss is None:
            return self.token_loss(output, labels)
        logits, stats = output
        self.router_losses.append(self.router_loss.aux_loss(stats.detach()))
        return self.token_loss(logits, labels) + self.router_loss.loss_term(stats, self.n_terms)

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels[..., 1:].reshape(-1).to(logits.device)
        token_logits = logits[..., :-1, :].float().reshape(shifted.shape[0], -1)
        total = F.cross_entropy(token_logits, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / max(self.label_tokens, 1)
