"""``pp-media`` argument parsing; each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from pp_media._hf.partition import SCHEDULE_NAMES
from pp_media.testing import tiny_model_types

DTYPES = ("float32", "bfloat16", "float16")
#: Top-level modules of the ``hf`` extra, named when one is missing.
_HF_EXTRA_MODULES = frozenset({"transformers", "safetensors", "PIL", "tqdm", "numpy"})


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _learning_rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e-3, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return number


def _layer_counts(value: str) -> tuple[int, ...] | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts such as 1,3, or auto; got {value!r}"
        ) from None
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pp-media",
        description="Vision-language models under torch pipeline parallelism, media kept aligned.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,inspect}")

    demo = commands.add_parser(
        "demo",
        help="train a VLM pipelined beside a single-process reference and compare the losses",
        description=(
            "Train a VLM split into pipeline stages (one local process per rank, or one "
            "torchrun process per rank) beside a single-process reference run of the same "
            "model, data and optimizer; print both losses per step and a PASS/FAIL verdict."
        ),
    )
    demo.add_argument(
        "--model",
        default="qwen2_vl",
        help=f"a model_type for a tiny random model ({', '.join(tiny_model_types())}) or a "
        "local checkpoint directory (default: qwen2_vl)",
    )
    demo.add_argument("--pp-size", type=_positive, default=2, help="pipeline ranks (default 2)")
    demo.add_argument(
        "--dp-size",
        type=_positive,
        default=1,
        help="data-parallel replicas, each a pipeline of --pp-size ranks on its share of the "
        "batch, FSDP-sharded over the replicas (default 1)",
    )
    demo.add_argument(
        "--virtual-stages",
        type=_positive,
        default=None,
        help="stages per rank (default: 1, or 2 for interleaved and V schedules)",
    )
    demo.add_argument(
        "--layers-per-stage",
        type=_layer_counts,
        default=None,
        help="decoder layers of each stage, comma-separated, or auto: chosen from the stage "
        "costs measured on the first batch (default: balanced)",
    )
    demo.add_argument("--microbatches", type=_positive, default=4, help="default 4")
    demo.add_argument(
        "--schedule", default="1F1B", help=f"one of {', '.join(SCHEDULE_NAMES)} (default 1F1B)"
    )
    demo.add_argument("--steps", type=_positive, default=20, help="optimizer steps (default 20)")
    demo.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="samples per step, over all replicas (default 6 per replica)",
    )
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    demo.add_argument("--seed", type=int, default=0, help="default 0")
    demo.add_argument(
        "--lr", type=_learning_rate, default=1e-3, help="AdamW learning rate (default 1e-3)"
    )
    demo.add_argument(
        "--videos",
        action="store_true",
        help="add videos beside the images (families that take videos)",
    )
    demo.add_argument(
        "--save",
        metavar="DIR",
        default=None,
        help="after training, export the pipelined model to DIR as a Hugging Face directory, "
        "reload it with transformers and compare its logits with the pipeline's",
    )

    inspect = commands.add_parser(
        "inspect",
        help="show how a batch's samples and media fall into microbatches",
        description=(
            "For a batch (synthetic by default, or a dict of tensors saved with torch.save) and "
            "a microbatch count, print each microbatch's samples, images, videos, patches and "
            "placeholder tokens, and flag every mismatch."
        ),
    )
    inspect.add_argument("batch", nargs="?", help="a torch.save'd dict of tensors (optional)")
    inspect.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (or model_type) whose placeholder token ids and rule "
        "apply; required with a saved batch (synthetic batch default: qwen2_vl)",
    )
    inspect.add_argument("--microbatches", type=_positive, default=4, help="default 4")
    inspect.add_argument(
        "--batch-size", type=_positive, default=6, help="synthetic batch size (default 6)"
    )
    inspect.add_argument("--seed", type=int, default=0, help="synthetic batch seed (default 0)")
    inspect.add_argument("--videos", action="store_true", help="synthetic batch with videos")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from pp_media._cli.demo import run_demo

            return run_demo(args)
        from pp_media._cli.inspect_batch import run_inspect

        return run_inspect(args)
    except ModuleNotFoundError as error:
        if error.name not in _HF_EXTRA_MODULES:
            raise
        print(
            f"pp-media: {error.name} is not installed; the command needs the hf extra: "
            "pip install 'pp-media[hf]'",
            file=sys.stderr,
        )
        return 2


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
