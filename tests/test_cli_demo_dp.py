"""``pp-media demo --dp-size 2 --pp-size 2``: 4 local processes, data parallel x pipeline.

Run as a new user runs it (the console script, real processes): two replicas, each a 2-rank
pipeline on its own 6-sample share of a 12-sample global batch, FSDP-sharded over the replicas,
beside the single-process reference on the global batch; the table and the PASS verdict must
come out as without data parallelism, each rank reporting its replica and its shard.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pp_media._cli.main import main

pytest.importorskip("transformers")

_ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\S+)$", re.MULTILINE)


def test_dp_demo_passes_on_four_processes() -> None:
    script = str(Path(sys.executable).with_name("pp-media"))
    command = [script, "demo", "--dp-size", "2", "--pp-size", "2", "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(
        "pp-media demo: tiny random qwen2_vl, images, schedule 1F1B, 2 data-parallel x 2 pipeline "
        "ranks, 4 microbatches of a 6-sample share of a 12-sample global batch, 2 steps"
    )
    rows = [(int(m[1]), float(m[2]), float(m[3])) for m in _ROW.finditer(result.stdout)]
    assert [step for step, _, _ in rows] == [0, 1]
    assert max(abs(ref - pipe) for _, ref, pipe in rows) <= 1e-5
    verdict = result.stdout.strip().splitlines()[-2]
    assert verdict.startswith(
        "PASS: tiny random qwen2_vl, 1F1B, 2 x 2 ranks (DP x PP), 4 microbatches, 2 steps"
    )
    shares = re.findall(
        r"rank (\d): replica (\d), stage (\d): .*; ([\d.]+) MB of the model's "
        r"([\d.]+) MB",
        result.stdout,
    )
    assert [(rank, replica, stage) for rank, replica, stage, _, _ in shares] == [
        ("0", "0", "0"),
        ("1", "0", "1"),
        ("2", "1", "0"),
        ("3", "1", "1"),
    ]
    # FSDP: the four shards add up to the model (each printed to 0.01 MB).
    held = [float(mb) for _, _, _, mb, _ in shares]
    assert abs(sum(held) - float(shares[0][4])) <= 0.03
    assert max(held) < float(shares[0][4]) / 3
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dp-size", "2", "--batch-size", "9"],
            "--batch-size 9 is not divisible by --dp-size 2; every replica gets an equal share "
            "of the global batch",
        ),
        (
            ["--dp-size", "2", "--batch-size", "6"],
            "--batch-size 6's share per replica (3) is smaller than --microbatches 4; every "
            "microbatch needs at least one sample",
        ),
    ],
)
def test_impossible_dp_options_give_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pp-media demo: error: {message}\n"
    assert captured.out == ""
