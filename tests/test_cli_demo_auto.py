"""``pp-media demo --layers-per-stage auto``: the split measured on the first batch, printed
with its estimated stage costs, trains at parity; a bad value is refused by the parser."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pp_media._cli.main import main

pytest.importorskip("transformers")


def test_demo_with_the_automatic_split_passes() -> None:
    command = [sys.executable, "-m", "pp_media", "demo", "--layers-per-stage", "auto"]
    result = subprocess.run(
        [*command, "--steps", "2"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"^auto split, measured on cpu, median of 5: stage costs \S+, \S+ ms per step; slowest "
        r"rank \S+ ms, ideal \S+ ms$",
        result.stdout,
        re.MULTILINE,
    ), result.stdout
    held = re.findall(r"stage (\d): (?:layers (\d)-(\d)|no layers)", result.stdout)
    counts = [0 if not first else int(last) - int(first) + 1 for _, first, last in held]
    assert len(counts) == 2 and sum(counts) == 4, result.stdout
    assert "PASS: tiny random qwen2_vl, 1F1B, 2 ranks" in result.stdout


def test_a_bad_layers_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--layers-per-stage", "most"])
    assert exit_info.value.code == 2
    assert (
        "argument --layers-per-stage: expected comma-separated layer counts such as 1,3, or "
        "auto; got 'most'" in capsys.readouterr().err
    )
