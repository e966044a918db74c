"""Checkpoints, export and activation checkpointing of a pipelined VLM, on 4 real gloo ranks.

Two spawns, so that resuming happens in new processes: ``first_worker`` trains DP=2 x PP=2
(FSDP2) without a break (saving a checkpoint half way), exports the trained model and compares
activation-checkpointed runs with plain ones; ``second_worker`` (fresh processes) resumes from
that checkpoint, also into another data-parallel size and stage split and into a V schedule,
checks what a wrong checkpoint raises, and round-trips the export of several families. Values
too large for the JSON results (whole parameters by name) go to ``.pt`` files in the output
directory. ``test_checkpointing.py`` spawns both and asserts.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.helpers.parity import quiet_transformers
from tests.helpers.ranks import run_cases_on_rank

WORLD_SIZE = 4
DP_SIZE = 2
#: Samples per replica and step (both replicas' shares differ: other seeds).
BATCH_SIZE = 6
N_MICROBATCHES = 4
LR = 1e-2
#: Steps of the uninterrupted run; the checkpoint is taken after ``SAVE_AFTER`` of them.
STEPS, SAVE_AFTER = 4, 2
#: ``save_pretrained(max_shard_size=)`` small enough to split the tiny model into many files.
TINY_SHARD = 20_000
#: Families whose export is round-tripped through ``from_pretrained`` (their conversion
#: mappings rename keys on load differently), with tied embeddings where the family ties.
EXPORT_FAMILIES = (
    ("qwen2_vl", True),
    ("llava", False),
    ("gemma3", True),
    ("mistral3", False),
    ("glm4v", False),
)
#: Activation checkpointing cases (DP=2 x PP=2, FSDP2), by schedule.
AC_SCHEDULES = ("1F1B", "Interleaved1F1B")


def _config(model_type: str = "qwen2_vl", tied: bool = True) -> Any:
    from pp_media.testing import tiny_config

    return tiny_config(model_type, tie_word_embeddings=tied)


def _model(config: Any, seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.train()
    return model


def _batch(config: Any, seed: int) -> dict[str, torch.Tensor]:
    from pp_media.testing import default_seq_len, synthetic_batch

    return synthetic_batch(config, BATCH_SIZE, default_seq_len(config), seed=seed)


def _pipeline(model: Any, **options: Any) -> Any:
    """DP=2 x PP=2 with FSDP2 unless ``options`` say otherwise (``dp_size=None``: one pipeline
    over all 4 ranks)."""
    from pp_media._hf.pipeline import build_vlm_pipeline

    options.setdefault("schedule", "1F1B")
    options.setdefault("dp_size", DP_SIZE)
    return build_vlm_pipeline(model, n_microbatches=N_MICROBATCHES, device="cpu", **options)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient whole (an FSDP2 shard gathered within its dp group)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _values(pipe: Any) -> dict[str, torch.Tensor]:
    return {name: _whole(param) for name, param in dict(pipe.named_parameters()).items()}


def _step_batch(pipe: Any, config: Any, step: int) -> dict[str, torch.Tensor]:
    """Replica r's share of the global batch of ``step``; without data parallelism, the whole
    global batch (both shares concatenated, in replica order)."""
    shares = [_batch(config, 10 + DP_SIZE * step + r) for r in range(DP_SIZE)]
    if pipe.mesh is not None:
        return shares[pipe.dp_rank]
    return {name: torch.cat([share[name] for share in shares]) for name in shares[0]}


def _train(pipe: Any, optimizer: Any, config: Any, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = pipe.step(_step_batch(pipe, config, step))
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None:
            losses.append(loss.item())
    return losses


def _max_diff(named: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max((named[name] - reference[name]).abs().max().item() for name in named)


def _paths(out_dir: str) -> dict[str, Path]:
    """Files both spawns share: beside the spawns' own result directories."""
    root = Path(out_dir).parent
    return {
        "checkpoint": root / "checkpoint",
        "no_optimizer": root / "checkpoint_no_optimizer",
        "hf": root / "hf",
        "hf_sharded": root / "hf_sharded",
        "values": root / "values",
        "exports": root / "exports",
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 gradient (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# --- first spawn ---------------------------------------------------------------------------


def activation_case(schedule: str) -> dict[str, Any]:
    """One step of a plain and of an activation-checkpointed pipeline of the same model on
    the same batches (DP=2 x PP=2, FSDP2): loss and every gradient shard, bit for bit; and the
    bytes autograd saved for backward outside the checkpointed layers."""
    config = _config(tied=False)
    source = _model(config, seed=0)
    runs: dict[str, dict[str, Any]] = {}
    for label, checkpointed in (("plain", False), ("checkpointed", True)):
        pipe = _pipeline(
            copy.deepcopy(source), schedule=schedule, activation_checkpointing=checkpointed
        )
        saved = [0]

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = pipe.step(_step_batch(pipe, config, step=0))
        runs[label] = {
            "pipe": pipe,
            "loss": None if loss is None else loss.item(),
            "saved_bytes": saved[0],
        }
    plain, checkpointed = runs["plain"]["pipe"], runs["checkpointed"]["pipe"]
    named, other = dict(plain.named_parameters()), dict(checkpointed.named_parameters())
    grad_diff = max(
        (_local(named[name].grad) - _local(other[name].grad)).abs().max().item()
        for name in named
        if named[name].grad is not None
    )
    return {
        "dp_rank": plain.dp_rank,
        "stages": [stage.stage_index for stage in plain.stages],
        "has_vision": any(name.startswith("model.visual.") for name in named),
        "names_equal": sorted(named) == sorted(other),
        "missing_grads": sorted(
            name for name in named if (named[name].grad is None) != (other[name].grad is None)
        ),
        "loss": runs["plain"]["loss"],
        "loss_checkpointed": runs["checkpointed"]["loss"],
        "grad_diff": grad_diff,
        "saved_bytes": runs["plain"]["saved_bytes"],
        "saved_bytes_checkpointed": runs["checkpointed"]["saved_bytes"],
    }


def uninterrupted_case(rank: int, out_dir: str, shared: dict[str, Any]) -> dict[str, Any]:
    """DP=2 x PP=2 (FSDP2), AdamW for ``STEPS`` steps without a break, saving a checkpoint
    after ``SAVE_AFTER``; whole parameter values at the save and at the end go to files."""
    config = _config()
    pipe = _pipeline(_model(config, seed=0))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LR)
    losses = _train(pipe, optimizer, config, range(SAVE_AFTER))
    _paths(out_dir)["values"].mkdir(exist_ok=True)
    pipe.save_checkpoint(_paths(out_dir)["checkpoint"], optimizer=optimizer, step=SAVE_AFTER)
    torch.save(_values(pipe), _paths(out_dir)["values"] / f"saved_rank{rank}.pt")
    losses += _train(pipe, optimizer, config, range(SAVE_AFTER, STEPS))
    torch.save(_values(pipe), _paths(out_dir)["values"] / f"final_rank{rank}.pt")
    shared["pipe"], shared["config"] = pipe, config
    return {"losses": losses, "has_last_stage": pipe.has_last_stage, "dp_rank": pipe.dp_rank}


def export_case(out_dir: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The tied model trained DP x PP, exported whole and sharded; the reloaded model's logits
    against the pipeline's on a new batch (on each replica's last-stage rank, which holds them)."""
    import transformers
    from safetensors import safe_open

    from pp_media._hf.forward import forward_logits

    pipe, config = shared["pipe"], shared["config"]
    paths = _paths(out_dir)
    pipe.save_pretrained(paths["hf"])
    pipe.save_pretrained(paths["hf_sharded"], max_shard_size=TINY_SHARD)
    batch = _batch(config, seed=99)
    logits = forward_logits(pipe, batch)
    result: dict[str, Any] = {"has_last_stage": pipe.has_last_stage, "dp_rank": pipe.dp_rank}
    if logits is None:
        return result
    for label in ("hf", "hf_sharded"):
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(
            paths[label], output_loading_info=True
        )
        model.eval()
        with torch.no_grad():
            reloaded = model(**batch).logits
        files = sorted(path.name for path in paths[label].iterdir())
        keys: list[str] = []
        for name in files:
            if name.endswith(".safetensors"):
                with safe_open(str(paths[label] / name), framework="pt") as handle:
                    keys += list(handle.keys())
        result[label] = {
            "class": type(model).__name__,
            "logits_diff": (reloaded - logits).abs().max().item(),
            "logits_scale": logits.abs().max().item(),
            "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
            "files": files,
            "keys": sorted(keys),
            "tied_after_load": model.lm_head.weight is model.get_input_embeddings().weight,
        }
    return result


def first_worker(rank: int, port: int, out_dir: str) -> None:
    quiet_transformers()
    shared: dict[str, Any] = {}
    runs = [(f"activation/{s}", partial(activation_case, s)) for s in AC_SCHEDULES]
    runs += [
        ("resume/uninterrupted", partial(uninterrupted_case, rank, out_dir, shared)),
        ("export/trained", partial(export_case, out_dir, shared)),
    ]
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)


# --- second spawn --------------------------------------------------------------------------


def continue_case(rank: int, out_dir: str) -> dict[str, Any]:
    """New processes, a differently initialised model, the same DP=2 x PP=2: load, then the
    remaining steps."""
    config = _config()
    pipe = _pipeline(_model(config, seed=7))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LR)
    step = pipe.load_checkpoint(_paths(out_dir)["checkpoint"], optimizer=optimizer)
    loaded = _values(pipe)
    losses = _train(pipe, optimizer, config, range(step, STEPS))
    saved = torch.load(_paths(out_dir)["values"] / f"saved_rank{rank}.pt")
    final = torch.load(_paths(out_dir)["values"] / f"final_rank{rank}.pt")
    return {
        "step": step,
        "losses": losses,
        "names_match": sorted(loaded) == sorted(final),
        "loaded_diff": _max_diff(loaded, saved),
        "final_diff": _max_diff(_values(pipe), final),
        "has_last_stage": pipe.has_last_stage,
        "dp_rank": pipe.dp_rank,
    }


def _saved_values(out_dir: str) -> dict[str, torch.Tensor]:
    saved: dict[str, torch.Tensor] = {}
    for path in sorted(_paths(out_dir)["values"].glob("saved_rank*.pt")):
        saved.update(torch.load(path))
    return saved


def other_layout_case(out_dir: str) -> dict[str, Any]:
    """Load the DP=2 x PP=2 checkpoint into one pipeline over all 4 ranks (no data
    parallelism, 4 stages of one layer): the same values by name; then the remaining steps on
    the whole global batch, which differ from the uninterrupted run by summation order only."""
    config = _config()
    pipe = _pipeline(_model(config, seed=7), dp_size=None)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LR)
    step = pipe.load_checkpoint(_paths(out_dir)["checkpoint"], optimizer=optimizer)
    loaded = _values(pipe)
    return {
        "step": step,
        "dp_size": pipe.dp_size,
        "stages": [stage.stage_index for stage in pipe.stages],
        "loaded_diff": _max_diff(loaded, _saved_values(out_dir)),
        "losses": _train(pipe, optimizer, config, range(step, STEPS)),
        "has_last_stage": pipe.has_last_stage,
        "dp_rank": pipe.dp_rank,
    }


def v_schedule_case(out_dir: str) -> dict[str, Any]:
    """Load into DP=2 x PP=2 under ZBVZeroBubble: the first and the last stage on one rank,
    each with its own (FSDP-sharded) copy of the tied matrix; both get the saved values."""
    config = _config()
    pipe = _pipeline(_model(config, seed=7), schedule="ZBVZeroBubble")
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LR)
    step = pipe.load_checkpoint(_paths(out_dir)["checkpoint"], optimizer=optimizer)
    loaded = _values(pipe)
    saved = _saved_values(out_dir)
    head = "lm_head.weight"
    if head in loaded:
        saved[head] = saved["model.language_model.embed_tokens.weight"]
    return {
        "step": step,
        "stages": [stage.stage_index for stage in pipe.stages],
        "holds_head": head in loaded,
        "loaded_diff": _max_diff(loaded, saved),
    }


def errors_case(out_dir: str) -> dict[str, Any]:
    """What loading a wrong checkpoint raises, on every rank, before anything is read."""
    paths = _paths(out_dir)
    config = _config()
    pipe = _pipeline(_model(config, seed=0))
    pipe.save_checkpoint(paths["no_optimizer"], step=3)
    messages: dict[str, str] = {}
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=LR)
    other = _pipeline(_model(_config("llava", tied=False), seed=0))
    attempts = {
        "zero_bubble_checkpointing": lambda: _pipeline(
            _model(config, seed=0), schedule="ZBVZeroBubble", activation_checkpointing=True
        ),
        "other_model": lambda: other.load_checkpoint(paths["checkpoint"]),
        "no_optimizer_state": lambda: pipe.load_checkpoint(
            paths["no_optimizer"], optimizer=optimizer
        ),
        "not_a_checkpoint": lambda: pipe.load_checkpoint(paths["hf"]),
    }
    for label, attempt in attempts.items():
        try:
            attempt()
        except ValueError as error:
            messages[label] = str(error)
        dist.barrier()
    return {
        "messages": messages,
        "step_without_optimizer": pipe.load_checkpoint(paths["no_optimizer"]),
    }


def families_case(out_dir: str) -> dict[str, Any]:
    """Export right after building (one 4-stage pipeline: the names are the point here, the
    DP x PP gathering is the trained case's), per family: ``from_pretrained`` of the export
    equals the source model tensor for tensor, with the key names transformers itself writes
    (its ``save_pretrained`` writes only on global rank 0, so rank 0 checks)."""
    import transformers
    from safetensors import safe_open

    result: dict[str, Any] = {}
    for model_type, tied in EXPORT_FAMILIES:
        source = _model(_config(model_type, tied=tied), seed=0)
        expected = {name: value.clone() for name, value in source.state_dict().items()}
        pipe = _pipeline(copy.deepcopy(source), dp_size=None)
        path = _paths(out_dir)["exports"] / model_type
        pipe.save_pretrained(path)
        if dist.get_rank() != 0:
            continue
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(
            path, output_loading_info=True
        )
        state = model.state_dict()
        own = _paths(out_dir)["exports"] / f"{model_type}_by_transformers"
        source.save_pretrained(own)
        keys = {}
        for label, directory in (("pp_media", path), ("transformers", own)):
            with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
                keys[label] = sorted(handle.keys())
        result[model_type] = {
            "class": type(model).__name__,
            "source_class": type(source).__name__,
            "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
            "same_names": sorted(state) == sorted(expected),
            "max_diff": max(
                (state[name] - value).abs().max().item()
                for name, value in expected.items()
                if name in state
            ),
            "keys_equal": keys["pp_media"] == keys["transformers"],
            "renamed_keys": sum(key not in expected for key in keys["pp_media"]),
        }
    return result


def second_worker(rank: int, port: int, out_dir: str) -> None:
    quiet_transformers()
    runs = [
        ("resume/continue", partial(continue_case, rank, out_dir)),
        ("resume/other_layout", partial(other_layout_case, out_dir)),
        ("resume/v_schedule", partial(v_schedule_case, out_dir)),
        ("resume/errors", partial(errors_case, out_dir)),
        ("export/families", partial(families_case, out_dir)),
    ]
    run_cases_on_rank(rank, port, out_dir, runs, world_size=WORLD_SIZE)
