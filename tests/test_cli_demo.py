"""``pp-media demo`` run as a new user runs it: real processes, real output checked.

The default command trains a tiny Qwen2-VL on 2 gloo ranks for 20 steps beside a reference;
its table must show 20 steps whose two losses agree within the stated tolerance and end with a
PASS verdict. A saved checkpoint directory runs through the same command.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pp_media._cli.main import main
from pp_media.testing import tiny_model_types

transformers = pytest.importorskip("transformers")

_ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\S+)$", re.MULTILINE)


def _console_script() -> str:
    script = Path(sys.executable).with_name("pp-media")
    assert script.exists(), f"the pp-media console script is not installed next to {sys.executable}"
    return str(script)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _losses(stdout: str) -> list[tuple[int, float, float]]:
    return [(int(m[1]), float(m[2]), float(m[3])) for m in _ROW.finditer(stdout)]


def test_default_demo_passes() -> None:
    result = _run([_console_script(), "demo"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _losses(result.stdout)
    assert [step for step, _, _ in rows] == list(range(20))
    assert max(abs(ref - pipe) for _, ref, pipe in rows) <= 1e-5
    verdict = result.stdout.strip().splitlines()[-2]
    assert verdict.startswith("PASS: tiny random qwen2_vl, 1F1B, 2 ranks, 4 microbatches, 20 steps")
    assert "rank 0: stage 0: layers 0-1" in result.stdout
    assert "rank 1: stage 1: layers 2-3" in result.stdout
    assert result.stdout.startswith("pp-media demo: tiny random qwen2_vl, images, schedule 1F1B")
    assert "Traceback" not in result.stderr


def test_demo_from_a_saved_checkpoint_with_a_small_vocabulary(tmp_path: Path) -> None:
    """A checkpoint whose vocabulary has 300 tokens (placeholders 290-293): the demo's
    synthetic text used to draw ids up to 899, and the embedding raised IndexError."""
    from pp_media.testing import tiny_config

    torch.manual_seed(3)
    config = tiny_config("qwen2_vl", tie_word_embeddings=True)
    config.text_config.vocab_size = 300
    config.image_token_id, config.video_token_id = 290, 291
    config.vision_start_token_id, config.vision_end_token_id = 292, 293
    transformers.AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    demo = [sys.executable, "-m", "pp_media", "demo", "--model", str(tmp_path)]
    result = _run([*demo, "--steps", "3", "--schedule", "ZBVZeroBubble", "--videos"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_losses(result.stdout)) == 3
    assert result.stdout.startswith(f"pp-media demo: qwen2_vl from {tmp_path}, images and videos")
    assert f"PASS: qwen2_vl from {tmp_path}, ZBVZeroBubble" in result.stdout


def test_demo_under_torchrun() -> None:
    """What the README documents for NCCL on GPUs, here with gloo: each torchrun process is one
    pipeline rank and global rank 0 prints the table."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    result = _run([*torchrun, "--master-port", str(port), "-m", "pp_media", "demo", "--steps", "2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_losses(result.stdout)) == 2
    assert "PASS: tiny random qwen2_vl, 1F1B, 2 ranks" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--schedule", "Zigzag"],
            "unknown schedule 'Zigzag'; choose one of GPipe, 1F1B, Interleaved1F1B, LoopedBFS, "
            "InterleavedZeroBubble, ZBVZeroBubble, DualPipeV",
        ),
        (
            ["--model", "bert"],
            "--model 'bert' is neither a checkpoint directory nor one of "
            + ", ".join(tiny_model_types()),
        ),
        (
            ["--batch-size", "3"],
            "--batch-size 3 is smaller than --microbatches 4; every microbatch needs at least one "
            "sample",
        ),
        (
            ["--pp-size", "3", "--schedule", "Interleaved1F1B"],
            "6 stages but the model has 4 decoder layers; use at most 4 stages (pp_size x virtual "
            "stages).",
        ),
        (
            ["--schedule", "1F1B", "--virtual-stages", "2"],
            "schedule '1F1B' runs one stage per rank; got 2 virtual stages. Use Interleaved1F1B, "
            "LoopedBFS or InterleavedZeroBubble for more.",
        ),
        (["--model", "llava", "--videos"], "--videos: pp_media's llava adapter takes no videos"),
        (
            ["--model", "glm4v", "--videos"],
            "--videos: glm4v cannot take images and videos in one forward (a limit of the "
            "unsplit model in transformers), and the demo's batches mix them",
        ),
        (["--device", "tpu"], "unknown device 'tpu'; choose cpu or cuda"),
    ],
)
def test_impossible_options_give_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pp-media demo: error: {message}\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dtype", "int8"],
            "argument --dtype: invalid choice: 'int8' (choose from 'float32', 'bfloat16', "
            "'float16')",
        ),
        (["--lr", "-1"], "argument --lr: must be a positive finite number, got -1"),
        (["--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
        (["--lr", "inf"], "argument --lr: must be a positive finite number, got inf"),
        (["--lr", "0"], "argument --lr: must be a positive finite number, got 0"),
        (["--lr", "fast"], "argument --lr: expected a number such as 1e-3, got 'fast'"),
    ],
)
def test_unknown_option_values_are_refused_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, ``--lr -1`` / ``nan`` reached AdamW in the spawned ranks: a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"pp-media demo: error: {message}\n" in err
    assert "Traceback" not in err


def test_on_a_terminal_the_demo_says_at_once_that_it_is_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first seconds go to importing transformers and building the model: a terminal
    sees a line about it before anything else (a pipe or a log sees the table only)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["demo", "--model", "bert"]) == 2
    first, *rest = capsys.readouterr().err.splitlines()
    assert first == "pp-media demo: starting: loading transformers and the bert model ..."
    assert rest[0].startswith("pp-media demo: error: --model 'bert' is neither")


def test_demo_save_exports_a_model_that_transformers_reloads(tmp_path: Path) -> None:
    """``--save DIR``: the trained pipeline is exported, reloaded with transformers, and its
    logits are compared with the pipeline's in one more verdict line."""
    target = tmp_path / "exported"
    result = _run([_console_script(), "demo", "--steps", "2", "--save", str(target)])
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(row for row in result.stdout.splitlines() if "exported to" in row)
    assert line.startswith(
        f"PASS: exported to {target}; transformers reloads it as Qwen2VLForConditionalGeneration: "
        "max |logits difference| "
    )
    difference = float(re.search(r"logits difference\| (\S+)", line)[1])
    assert difference <= 1e-5  # measured: 0.0 (the same weights, the same per-sample forward)
    assert line.endswith("tolerance 1e-05 (float32)")
    assert sorted(path.name for path in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_demo_save_to_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["demo", "--save", str(target)]) == 2
    message = f"--save {str(target)!r} is a file; give a directory to export the model to"
    assert capsys.readouterr().err == f"pp-media demo: error: {message}\n"


_MOE_ROW = re.compile(
    r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\S+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", re.MULTILINE
)
_ROUTER_LINE = re.compile(
    r"minus the whole-batch aux: mean ([-+]\d\.\d+e[-+]\d+), largest ([-+]\d\.\d+e[-+]\d+) over "
    r"(\d+) steps; max \|difference\| from the reference's per-microbatch aux (\S+)$",
    re.MULTILINE,
)


def test_moe_demo_shows_the_router_loss_beside_the_loss() -> None:
    """The one MoE demo run (qwen3_vl_moe): both runs add the router loss per microbatch, the
    table shows the pipeline's router aux (mean over its microbatches) beside the reference's
    whole-batch aux, and the line below gives their gap, which the rows must reproduce."""
    demo = [sys.executable, "-m", "pp_media", "demo", "--model", "qwen3_vl_moe"]
    result = _run([*demo, "--steps", "2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "router aux     batch aux" in result.stdout
    rows = [tuple(float(v) for v in m.groups()) for m in _MOE_ROW.finditer(result.stdout)]
    assert [int(row[0]) for row in rows] == [0, 1]
    assert max(abs(row[1] - row[2]) for row in rows) <= 1e-5
    # Tiny random routers are near uniform: aux = E * sum(f_e * P_e) ~ top-k = 2.
    assert all(1.9 < row[4] < 2.2 and 1.9 < row[5] < 2.2 for row in rows), rows
    line = _ROUTER_LINE.search(result.stdout)
    assert line, result.stdout
    gaps = [row[4] - row[5] for row in rows]
    assert float(line[1]) == pytest.approx(sum(gaps) / 2, abs=2e-6)
    assert int(line[3]) == 2 and float(line[4]) <= 1e-5
    verdict = result.stdout.strip().splitlines()[-2]
    assert verdict.startswith("PASS: tiny random qwen3_vl_moe, 1F1B, 2 ranks, 4 microbatches")
