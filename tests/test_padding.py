"""pad_to_even_microbatches: equal microbatch shapes, each real sample where the engine puts it."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

import pp_media


@pytest.mark.parametrize(
    ("batch_size", "n_microbatches"), [(6, 4), (7, 3), (5, 5), (9, 2), (13, 4)]
)
def test_padded_microbatches_hold_the_engines_samples_then_padding(
    batch_size: int, n_microbatches: int
) -> None:
    ids = torch.arange(1, batch_size + 1).view(-1, 1).repeat(1, 5)
    batch = {
        "input_ids": ids.clone(),
        "labels": ids.clone(),
        "attention_mask": torch.zeros(batch_size, 5, dtype=torch.long),
        "position_ids": torch.zeros(3, batch_size, 5),  # dim 0 is not the batch: untouched
        "pixel_values": torch.randn(batch_size, 2),
    }
    pp_media.prepare_vlm_media_for_pp(batch, batch_size, n_microbatches)
    media = batch[pp_media.VLM_PP_MEDIA_KEY]
    pp_media.pad_to_even_microbatches(batch, batch_size, n_microbatches)

    _, unpadded = split_args_kwargs_into_chunks((), {"input_ids": ids}, n_microbatches)
    _, padded = split_args_kwargs_into_chunks((), {"input_ids": batch["input_ids"]}, n_microbatches)
    rows = -(-batch_size // n_microbatches)
    for k in range(n_microbatches):
        real = unpadded[k]["input_ids"]
        chunk = padded[k]["input_ids"]
        assert chunk.shape[0] == rows
        assert torch.equal(chunk[: real.shape[0]], real)
        assert torch.all(chunk[real.shape[0] :] == 0)
    pad_rows = batch["input_ids"][:, 0] == 0
    assert torch.all(batch["labels"][pad_rows] == -100)
    assert torch.all(batch["attention_mask"][pad_rows] == 1)
    assert batch["position_ids"].shape == (3, batch_size, 5)
    assert batch[pp_media.VLM_PP_MEDIA_KEY] is media


def test_even_batches_are_left_alone() -> None:
    ids = torch.arange(8).view(8, 1)
    batch = {"input_ids": ids}
    assert pp_media.pad_to_even_microbatches(batch, 8, 4) is batch
    assert batch["input_ids"] is ids


def test_custom_pad_values() -> None:
    batch = {"input_ids": torch.ones(3, 2, dtype=torch.long)}
    pp_media.pad_to_even_microbatches(batch, 3, 2, pad_values={"input_ids": 7})
    assert batch["input_ids"][:, 0].tolist() == [1, 1, 1, 7]


def test_keys_limit_the_padding() -> None:
    position_ids = torch.zeros(3, 3, 4)  # M-RoPE [3, B, T] with B=3: dim 0 is not the batch
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long), "position_ids": position_ids}
    pp_media.pad_to_even_microbatches(batch, 3, 2, keys={"input_ids"})
    assert batch["input_ids"].shape == (4, 4)
    assert batch["position_ids"] is position_ids


def test_the_wrapped_collate_pads_when_asked() -> None:
    def collate(samples: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(samples).view(-1, 1)
        return {"input_ids": ids, "pixel_values": ids.float().repeat(1, 2)}

    wrapped = pp_media.wrap_vlm_collate_for_pp(collate, 4, even_microbatches=True)
    batch = wrapped([1, 2, 3, 4, 5, 6])
    assert batch["input_ids"].view(-1).tolist() == [1, 2, 3, 4, 5, 0, 6, 0]
    media = batch[pp_media.VLM_PP_MEDIA_KEY]["pixel_values"]
    assert [chunk[:, 0].tolist() for chunk in media] == [[1, 2], [3, 4], [5], [6]]
    text_only = pp_media.wrap_vlm_collate_for_pp(
        lambda samples: {"input_ids": torch.ones(len(samples), 1)}, 2, even_microbatches=True
    )([1, 2, 3])
    assert text_only["input_ids"].shape == (4, 1)
