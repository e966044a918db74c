"""Your own training loop over a Hugging Face VLM split into pipeline stages.

Run one process per pipeline rank with torchrun (gloo on the CPU here; NCCL on GPUs):

    torchrun --nproc-per-node 2 examples/train_hf_pipeline.py

or data parallel x pipeline, two replicas of a 2-rank pipeline (FSDP over the replicas):

    torchrun --nproc-per-node 4 examples/train_hf_pipeline.py --dp-size 2

Rank 0 saves a tiny random Qwen2-VL checkpoint (a stand-in for a real one), every rank loads
only its own stage's tensors from it, and each step's batch is what a Qwen2-VL collate
function returns: the real image processor's ``pixel_values`` and ``image_grid_thw``, token ids
with the image placeholders expanded, labels and an attention mask, padded to a fixed length.
A ``DataLoader`` with ``pipe.replica_sampler`` gives every rank of one pipeline the same
samples and each replica its own share; the gradients are clipped by the whole model's norm.
(``Qwen2VLProcessor`` itself cannot be built without torchvision, which its video processor
needs, so the collate expands the placeholders as the processor would: ``t*h*w // merge**2``
image tokens per image, between the vision start and end tokens.)

Before training, the pipeline evaluates a held-out batch forward-only, and rank 0 compares that
loss with the unsplit model's ``model(**pipe.reference_batch(batch)).loss``; every loss reaches
every rank through ``pipe.broadcast_loss``, and rank 0 alone prints.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers
from PIL import Image

import pp_media

IMAGE, START, END, SEQ_LEN, BATCH, MICROBATCHES = 990, 992, 993, 48, 6, 4


def tiny_checkpoint(path: str) -> None:
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=1000)
    text.update(num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, spatial_merge_size=2)
    config = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=991,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(path)


def sample(index: int) -> tuple[list[Image.Image], list[int]]:
    """Sample ``index``: ``index % 3`` images of 56x56 pixels (4 placeholder tokens each)."""
    generator = torch.Generator().manual_seed(index)
    images = []
    row = torch.randint(10, 900, (4,), generator=generator).tolist()
    for _ in range(index % 3):
        pixels = torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
        row += [START, IMAGE, IMAGE, IMAGE, IMAGE, END]
    return images, row + torch.randint(10, 900, (8,), generator=generator).tolist()


def collate(samples: list[tuple[list[Image.Image], list[int]]]) -> dict[str, torch.Tensor]:
    """A Qwen2-VL collate function: the image processor, then padded token rows."""
    images = [image for sample_images, _ in samples for image in sample_images]
    rows = [row for _, row in samples]
    processor = transformers.Qwen2VLImageProcessorPil()
    batch = dict(processor(images=images, return_tensors="pt"))
    input_ids = torch.zeros(len(rows), SEQ_LEN, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids >= IMAGE), -100)
    batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp-size", type=int, default=1, help="data-parallel replicas")
    dp_size = parser.parse_args().dp_size
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(1)
    checkpoint = os.path.join(
        tempfile.gettempdir(), f"pp_media_example_{os.environ['MASTER_PORT']}"
    )
    if dist.get_rank() == 0:
        tiny_checkpoint(checkpoint)
    dist.barrier()

    pipe = pp_media.build_vlm_pipeline(
        checkpoint,
        schedule="Interleaved1F1B",
        n_microbatches=MICROBATCHES,
        dp_size=dp_size if dp_size > 1 else None,  # None: one pipeline over every rank
    )
    dataset = [sample(index) for index in range(3 * BATCH * dp_size)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, sampler=pipe.replica_sampler(dataset), collate_fn=collate
    )
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-3)

    held_out = collate([sample(1000 + index) for index in range(BATCH)])
    loss = pipe.eval_step(held_out)  # forward only, on every rank; no gradients
    loss = pipe.broadcast_loss(loss)  # from pipe.last_stage_rank to every rank
    if dist.get_rank() == 0:  # compare with the unsplit model on the same batch
        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            reference = model(**pipe.reference_batch(held_out)).loss
        print(f"eval: pipeline {loss.item():.6f}, unsplit model {reference.item():.6f}")

    for step, batch in enumerate(loader):  # this replica's share of each global batch
        loss = pipe.step(batch)  # forward and backward on every rank
        pipe.clip_grad_norm_(1.0)  # the norm over all stages and replicas
        optimizer.step()
        optimizer.zero_grad()
        loss = pipe.broadcast_loss(loss)  # the global batch's loss, now on every rank
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    held: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(held, [stage.stage_index for stage in pipe.stages])
    if dist.get_rank() == 0:  # one process prints, so that lines do not interleave
        for rank, stages in enumerate(held):
            print(f"rank {rank} ran {', '.join(f'stage {index}' for index in stages)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
