"""count_items_per_sample: items per sample recovered from placeholder tokens."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pp_media

PLACEHOLDER = 7


def _ids(tokens_per_sample: list[list[int]], length: int = 40) -> torch.Tensor:
    """Each sample: its items' placeholder runs separated by one text token (1)."""
    ids = torch.ones(len(tokens_per_sample), length, dtype=torch.long)
    for row, items in enumerate(tokens_per_sample):
        position = 1
        for n_tokens in items:
            ids[row, position : position + n_tokens] = PLACEHOLDER
            position += n_tokens + 1
    return ids


@given(st.lists(st.lists(st.integers(1, 5), max_size=3), min_size=1, max_size=8))
def test_counts_are_recovered(tokens_per_sample: list[list[int]]) -> None:
    ids = _ids(tokens_per_sample)
    tokens = torch.tensor([n for items in tokens_per_sample for n in items], dtype=torch.long)
    counts = pp_media.count_items_per_sample(ids, PLACEHOLDER, tokens)
    assert counts.tolist() == [len(items) for items in tokens_per_sample]
    assert counts.dtype == torch.int64


def test_qwen_style_grid_tokens() -> None:
    grid = torch.tensor([[1, 4, 6], [1, 2, 4], [1, 4, 4]])  # 6, 2 and 4 tokens with merge 2
    ids = _ids([[6, 2], [], [4]])
    counts = pp_media.count_items_per_sample(ids, PLACEHOLDER, grid.prod(-1) // 4)
    assert counts.tolist() == [2, 0, 1]


def test_an_item_split_across_samples_is_an_error() -> None:
    ids = _ids([[3], [3]])
    message = "It has 6; per sample [3, 3]."
    with pytest.raises(ValueError, match=re.escape(message)):
        pp_media.count_items_per_sample(ids, PLACEHOLDER, torch.tensor([2, 4]))


def test_too_few_placeholders_is_an_error() -> None:
    ids = _ids([[3], []])
    with pytest.raises(ValueError, match=re.escape("expected 5 placeholder tokens (id 7)")):
        pp_media.count_items_per_sample(ids, PLACEHOLDER, torch.tensor([3, 2]))


def test_no_items_and_no_placeholders() -> None:
    counts = pp_media.count_items_per_sample(_ids([[], []]), PLACEHOLDER, torch.zeros(0))
    assert counts.tolist() == [0, 0]
