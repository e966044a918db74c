"""The README's example is the example script, and it prints what the README says."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks(language: str, section: str = "") -> list[str]:
    text = (ROOT / "README.md").read_text()
    if section:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_readme_example_is_the_example_script_and_its_output() -> None:
    script = ROOT / "examples" / "split_qwen2vl_batch.py"
    body = script.read_text().split('"""', 2)[2].lstrip("\n")
    assert body in _readme_blocks("python")
    printed = subprocess.run(
        [sys.executable, str(script)], check=True, capture_output=True, text=True
    ).stdout
    assert printed in _readme_blocks("text")


def test_readme_layout_example_is_the_example_script_and_its_output() -> None:
    script = ROOT / "examples" / "describe_media_layout.py"
    body = script.read_text().split('"""', 2)[2].lstrip("\n")
    assert body in _readme_blocks("python")
    printed = subprocess.run(
        [sys.executable, str(script)], check=True, capture_output=True, text=True
    ).stdout
    assert printed in _readme_blocks("text")


def test_readme_test_command_is_what_ci_runs() -> None:
    (command,) = (block.strip() for block in _readme_blocks("bash", section="Test"))
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_starts_with_the_set_up_and_demo_command_then_the_test_command() -> None:
    intro = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    setup, tests = (block.strip() for block in re.findall(r"```bash\n(.*?)```", intro, re.DOTALL))
    assert setup.startswith("python3 -m venv .venv && source .venv/bin/activate && pip install")
    assert setup.endswith("&& pp-media demo")
    (documented,) = (block.strip() for block in _readme_blocks("bash", section="Test"))
    assert tests == documented


def test_torchrun_training_example_runs() -> None:
    """``examples/train_hf_pipeline.py`` as the README says to run it: torchrun, two ranks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*torchrun, "--master-port", str(port), str(ROOT / "examples" / "train_hf_pipeline.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"^step \d: loss ([0-9.]+)$", result.stdout, re.M)]
    assert len(losses) == 3 and all(5.0 < loss < 8.0 for loss in losses), result.stdout
    # The forward-only evaluation equals the unsplit model on pipe.reference_batch.
    (found,) = re.findall(
        r"^eval: pipeline ([0-9.]+), unsplit model ([0-9.]+)$", result.stdout, re.M
    )
    assert abs(float(found[0]) - float(found[1])) <= 5e-6, result.stdout
    assert "rank 0 ran stage 0, stage 2" in result.stdout
    assert "rank 1 ran stage 1, stage 3" in result.stdout


def test_pipeline_example_matches_its_single_process_reference() -> None:
    printed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pipeline_step.py")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r"reference loss ([0-9.]+), pipelined loss ([0-9.]+)", printed)
    assert found, printed
    assert float(found.group(1)) == float(found.group(2))
    assert printed in _readme_blocks("text")
