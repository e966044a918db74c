"""The README's example is the example script, and it prints what the README says."""

from __future__ import annotations

import re
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


def test_readme_test_command_is_what_ci_runs() -> None:
    (command,) = (block.strip() for block in _readme_blocks("bash", section="Test"))
    assert command in (ROOT / ".ci" / "run").read_text()


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
