"""A tiny VLM on two pipeline stages (two gloo ranks on the CPU), checked against one process.

Stage 0 embeds the tokens and puts each image's patch features on its placeholder tokens; stage
1 runs a block and the head. B=6 samples in M=4 microbatches (2, 2, 1, 1 samples), text-only
samples first. Run: ``python examples/pipeline_step.py`` (it starts its two ranks itself).
"""

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

import pp_media

VOCAB, HIDDEN, PATCH, IMAGE_TOKEN, SEQ = 32, 16, 12, 3, 24
IMAGES_PER_SAMPLE = [0, 0, 2, 1, 0, 3]
N_MICROBATCHES = 4


class Embed(nn.Module):
    """Stage 0: token embedding; image placeholders get the image's patch features."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.vision = nn.Linear(PATCH, HIDDEN)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        media = pp_media.current_media(self)  # this microbatch's, or None in a plain forward
        pixel_values = self.pixel_values if media is None else media["pixel_values"]
        hidden = self.tokens(input_ids)
        placeholders = (input_ids == IMAGE_TOKEN).unsqueeze(-1)
        return hidden.masked_scatter(placeholders, self.vision(pixel_values))


class Head(nn.Module):
    """Stage 1: one residual block and the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden + F.gelu(self.block(hidden)))


def make_batch() -> dict[str, torch.Tensor]:
    """Collated batch: 4 patches (= 4 placeholder tokens) per image, labels -100 on images."""
    generator = torch.Generator().manual_seed(0)
    batch_size = len(IMAGES_PER_SAMPLE)
    input_ids = torch.randint(4, VOCAB, (batch_size, SEQ), generator=generator)
    for sample, n_images in enumerate(IMAGES_PER_SAMPLE):
        input_ids[sample, 1 : 1 + 4 * n_images] = IMAGE_TOKEN
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    n_images = sum(IMAGES_PER_SAMPLE)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.randn(4 * n_images, PATCH, generator=generator),
        "image_grid_thw": torch.tensor([[1, 2, 2]] * n_images),
        "n_images_per_sample": torch.tensor(IMAGES_PER_SAMPLE),
    }


def token_loss(total_tokens: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sum of token losses / label tokens of the whole batch: microbatch losses add up."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, VOCAB)
        return F.cross_entropy(flat, labels.reshape(-1), reduction="sum") / total_tokens

    return loss_fn


def run(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    embed, head = Embed(), Head()
    batch = make_batch()
    loss_fn = token_loss(int((batch["labels"] != -100).sum()))

    # Reference: the whole model on the whole batch in this process.
    embed.pixel_values = batch["pixel_values"]
    reference = loss_fn(head(embed(batch["input_ids"])), batch["labels"])
    del embed.pixel_values

    # Pipeline: prepare as the collate function would, pad microbatches to equal size, step.
    batch_size = len(IMAGES_PER_SAMPLE)
    pp_media.prepare_vlm_media_for_pp(batch, batch_size, N_MICROBATCHES)
    pp_media.pad_to_even_microbatches(batch, batch_size, N_MICROBATCHES)
    stage = PipelineStage([embed, head][rank], rank, 2, torch.device("cpu"))
    schedule = Schedule1F1B(stage, N_MICROBATCHES, loss_fn=loss_fn, scale_grads=False)
    losses: list[torch.Tensor] = []
    with pp_media.stage_vlm_media_for_pp(schedule, [[embed, head][rank]], batch):
        if rank == 0:
            schedule.step(batch["input_ids"])
        else:
            schedule.step(target=batch["labels"], losses=losses)
    if rank == 1:
        pipelined = sum(loss.item() for loss in losses)
        print(f"reference loss {reference.item():.6f}, pipelined loss {pipelined:.6f}")
        print("microbatch losses:", [round(loss.item(), 6) for loss in losses])
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    mp.spawn(run, args=(free_port,), nprocs=2)
