"""The causal-LM loss, split so that pipelined microbatches add up to the unsplit model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens the shifted causal-LM loss counts: labels after the first position, not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class TokenSumCrossEntropy:
    """Per microbatch: the sum of its token losses divided by the label tokens of the *whole*
    batch. With ``scale_grads=False`` the microbatch losses and gradients then add up to
    Hugging Face's ``labels=`` loss, the mean over every label token of the batch."""

    def __init__(self) -> None:
        #: Label tokens of the whole batch of the step being run; set before each step.
        self.label_tokens = 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels[..., 1:].reshape(-1).to(logits.device)
        token_logits = logits[..., :-1, :].float().reshape(shifted.shape[0], -1)
        total = F.cross_entropy(token_logits, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / max(self.label_tokens, 1)
