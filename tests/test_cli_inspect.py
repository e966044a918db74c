"""``pp-media inspect``: the microbatch table, mismatch lines and exit codes.

A few runs go through real subprocesses (the console script and ``python -m pp_media``),
started together so that their imports overlap; the rest call ``main`` in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from pp_media._cli.inspect_batch import best_fit_counts
from pp_media._cli.main import main
from pp_media._hf.batch import prepare_step_inputs
from pp_media._hf.families import adapter_for
from pp_media.testing import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    default_seq_len,
    synthetic_batch,
    tiny_config,
    tiny_model_types,
)

QWEN = tiny_config("qwen2_vl")
#: What a new user's shell gives: the venv's console script beside its python.
CONSOLE_SCRIPT = Path(sys.executable).with_name("pp-media")


def _batch(model: str = "qwen2_vl", size: int = 6, seed: int = 0, videos: bool = False) -> Any:
    """The batch ``pp-media inspect`` builds for these options."""
    config = QWEN if model == "qwen2_vl" else tiny_config(model)
    seq_len = default_seq_len(config, videos=videos)
    return synthetic_batch(config, size, seq_len, seed=seed, videos=videos)


def _without_one_placeholder(batch: dict[str, torch.Tensor], sample: int) -> dict[str, Any]:
    """``batch`` with one image placeholder token of ``sample`` turned into text."""
    ids = batch["input_ids"].clone()
    ids[sample, int((ids[sample] == IMAGE_TOKEN).nonzero()[0, 0])] = 5
    return {**batch, "input_ids": ids}


def _image_rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Image indices of each sample, walking the placeholder runs (independent of pp_media)."""
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    rows, next_image = [], 0
    for found in (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist():
        mine = []
        while found > 0:
            mine.append(next_image)
            found -= per_image[next_image]
            next_image += 1
        rows.append(mine)
    return rows


def _torch_split(batch_size: int, n_microbatches: int) -> list[list[int]]:
    """The samples of each microbatch as torch.distributed.pipelining splits them."""
    chunks, _ = split_args_kwargs_into_chunks((torch.arange(batch_size),), {}, n_microbatches)
    return [chunk[0].tolist() for chunk in chunks]


def _table(stdout: str) -> list[dict[str, str]]:
    """The table rows of a report, keyed by column title."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mb "))
    titles = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(titles), line
        rows.append(dict(zip(titles, cells, strict=True)))
    return rows


def _samples(cell: str) -> list[int]:
    first, _, last = cell.partition("-")
    return list(range(int(first), int(last or first) + 1))


def _check_table(stdout: str, batch: dict[str, torch.Tensor], n_microbatches: int) -> None:
    """Rows: torch's split of the samples, and the images, patches and tokens of each."""
    rows = _table(stdout)
    split = _torch_split(batch["input_ids"].shape[0], n_microbatches)
    assert [_samples(row["samples"]) for row in rows] == split
    images = _image_rows(batch) if "image_grid_thw" in batch else None
    patches = batch["image_grid_thw"].prod(-1).tolist() if images else []
    placeholders = (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist()
    for k, (row, samples) in enumerate(zip(rows, split, strict=True)):
        mine = [image for sample in samples for image in images[sample]] if images else []
        assert row["mb"] == str(k)
        assert int(row["images"]) == len(mine)
        assert int(row["image patches"]) == sum(patches[i] for i in mine)
        tokens = sum(placeholders[sample] for sample in samples)
        assert int(row["image tokens"]) == int(row["image features"]) == tokens
        assert row["status"] == "ok"


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Three subprocess runs, started at once: default (console script), a batch file with a
    placeholder removed from sample 4, and a missing file."""
    folder = tmp_path_factory.mktemp("inspect")
    torch.save(_without_one_placeholder(_batch(), 4), folder / "removed.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "default": [str(CONSOLE_SCRIPT), "inspect"],
        "removed": [
            sys.executable,
            "-m",
            "pp_media",
            "inspect",
            "removed.pt",
            "--model",
            "qwen2_vl",
        ],
        "missing": [
            sys.executable,
            "-m",
            "pp_media",
            "inspect",
            "missing.pt",
            "--model",
            "qwen2_vl",
        ],
    }
    running = {
        name: subprocess.Popen(
            command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, command in commands.items()
    }
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    return results


def test_console_script_default_batch_is_consistent(cli: dict[str, Any]) -> None:
    assert CONSOLE_SCRIPT.is_file()
    run = cli["default"]
    assert run.returncode == 0, run.stderr
    assert len(_table(run.stdout)) == 4
    _check_table(run.stdout, _batch(), 4)
    assert run.stdout.splitlines()[-1].startswith("ok: 6 samples, ")


def test_module_run_names_the_sample_missing_a_placeholder(cli: dict[str, Any]) -> None:
    run = cli["removed"]
    assert run.returncode == 1, run.stderr
    statuses = [row["status"] for row in _table(run.stdout)]
    assert statuses == ["ok", "ok", "MISMATCH", "ok"]
    found = int((_batch()["input_ids"][4] == IMAGE_TOKEN).sum())
    assert run.stdout.startswith(
        "removed.pt (placeholder ids of pp-media's tiny random qwen2_vl: image 990, video 991): "
    )
    # Without n_images_per_sample the images are assigned by best fit: a guess, and said so.
    assert (
        f"MISMATCH microbatch 2, sample 4: {found - 1} image placeholder tokens (id {IMAGE_TOKEN}) "
        f"in input_ids, but its images give {found} features (best-fit guess)"
    ) in run.stdout.splitlines()
    assert run.stdout.splitlines()[-1].startswith(
        "MISMATCH: sample 4 (1 of 6) in microbatch 2 (1 of 4) (which samples: a best-fit guess): "
    )
    mismatches = [line for line in run.stdout.splitlines() if line.startswith("MISMATCH micro")]
    assert len(mismatches) == 1
    assert "Traceback" not in run.stderr
    assert "not split into whole images per sample" in run.stdout


def test_module_run_missing_file_is_one_line(cli: dict[str, Any]) -> None:
    run = cli["missing"]
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == "pp-media inspect: error: no such file: missing.pt\n"


@pytest.mark.parametrize(("batch_size", "n_microbatches"), [(6, 4), (7, 3), (5, 5), (9, 1)])
def test_rows_follow_torch_split(
    capsys: pytest.CaptureFixture[str], batch_size: int, n_microbatches: int
) -> None:
    argv = ["inspect", "--batch-size", str(batch_size), "--microbatches", str(n_microbatches)]
    assert main([*argv, "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert len(_table(stdout)) == n_microbatches
    _check_table(stdout, _batch(size=batch_size, seed=3), n_microbatches)


def test_videos(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--videos", "--microbatches", "3"]) == 0
    stdout = capsys.readouterr().out
    batch = _batch(videos=True)
    _check_table(stdout, batch, 3)
    videos = (batch["input_ids"] == VIDEO_TOKEN).sum(dim=1)
    grid = batch["video_grid_thw"]
    assert grid.shape[0] == 2  # samples 1 and 4 carry one video each
    rows = _table(stdout)
    assert [int(row["videos"]) for row in rows] == [1, 0, 1]
    assert [int(row["video patches"]) for row in rows] == [
        int(grid[0].prod()),
        0,
        int(grid[1].prod()),
    ]
    tokens = [int(videos[start : start + 2].sum()) for start in (0, 2, 4)]
    assert [int(row["video tokens"]) for row in rows] == tokens
    assert [int(row["video features"]) for row in rows] == tokens
    assert "videos: from placeholder tokens (id 991)" in stdout


def test_llava_and_checkpoint_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["inspect", "--model", "llava", "--batch-size", "5"]) == 0
    stdout = capsys.readouterr().out
    batch = _batch("llava", size=5)
    rows = _table(stdout)
    assert list(rows[0]) == [
        "mb",
        *("samples", "images", "image patches", "image tokens", "image features", "status"),
    ]
    assert [_samples(row["samples"]) for row in rows] == _torch_split(5, 4)
    placeholders = (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1)
    images = [int(placeholders[_samples(row["samples"])].sum()) // 16 for row in rows]
    assert [int(row["images"]) for row in rows] == images
    assert [int(row["image patches"]) for row in rows] == images  # one row per image
    assert sum(images) == batch["pixel_values"].shape[0]

    tiny_config("llava").save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--batch-size", "5"]) == 0
    assert _table(capsys.readouterr().out) == rows


def _swapped_grid_rows() -> tuple[dict[str, Any], int, int, int]:
    """The default batch with the image_grid_thw rows of an image of sample 4 and one of
    sample 5 swapped (the patch total stays), its n_images_per_sample, and the placeholders of
    samples 4 and 5 and how many more features sample 4's images now give."""
    batch = _batch()
    rows = _image_rows(batch)
    tokens = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    a, b = next((a, b) for a in rows[4] for b in rows[5] if tokens[a] != tokens[b])
    grid = batch["image_grid_thw"].clone()
    grid[[a, b]] = grid[[b, a]]
    found = (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist()
    altered = {**batch, "image_grid_thw": grid}
    altered["n_images_per_sample"] = torch.tensor([len(row) for row in rows])
    return altered, found[4], found[5], tokens[b] - tokens[a]


@pytest.mark.parametrize("counts_given", [True, False])
def test_altered_grid_rows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, counts_given: bool
) -> None:
    batch, found_4, found_5, shift = _swapped_grid_rows()
    if not counts_given:
        del batch["n_images_per_sample"]
    torch.save(batch, tmp_path / "batch.pt")
    assert main(["inspect", str(tmp_path / "batch.pt"), "--model", "qwen2_vl"]) == 1
    stdout = capsys.readouterr().out
    assert [row["status"] for row in _table(stdout)] == ["ok", "ok", "MISMATCH", "MISMATCH"]
    mismatches = [line for line in stdout.splitlines() if line.startswith("MISMATCH micro")]
    guess = "" if counts_given else " (best-fit guess)"
    assert mismatches == [
        f"MISMATCH microbatch 2, sample 4: {found_4} image placeholder tokens (id 990) in "
        f"input_ids, but its images give {found_4 + shift} features{guess}",
        f"MISMATCH microbatch 3, sample 5: {found_5} image placeholder tokens (id 990) in "
        f"input_ids, but its images give {found_5 - shift} features{guess}",
    ]
    summary = "" if counts_given else " (which samples: a best-fit guess)"
    assert stdout.splitlines()[-1].startswith(
        f"MISMATCH: samples 4, 5 (2 of 6) in microbatches 2, 3 (2 of 4){summary}: "
    )
    assert ("best fit" in stdout) is not counts_given


def test_check_placeholders_raises_on_the_first_mismatch() -> None:
    """The shared per-sample checks leave prepare_step_inputs' error as it was."""
    batch, found_4, _, shift = _swapped_grid_rows()
    message = (
        f"pp_media: microbatch 2, sample 4 of the batch: {found_4} image placeholder tokens (id "
        f"990) in input_ids, but its images give {found_4 + shift} features. Check that the "
        "processor's image token expansion matches the model config."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        prepare_step_inputs(batch, adapter_for(QWEN), QWEN, 4)


def test_best_fit_counts() -> None:
    tokens = [6, 6, 6, 9, 8, 6, 6, 8, 9, 6]
    assert best_fit_counts([0, 18, 9, 0, 20, 23], tokens) == [0, 3, 1, 0, 3, 3]  # exact
    assert best_fit_counts([0, 18, 9, 0, 19, 23], tokens) == [0, 3, 1, 0, 3, 3]  # one short
    assert best_fit_counts([0, 18, 9, 0, 12, 31], tokens) == [0, 3, 1, 0, 2, 4]  # moved
    assert best_fit_counts([5, 0], []) == [0, 0]
    assert best_fit_counts([0, 0], [3]) == [0, 1]


NOT_A_DICT = "is not a dict of tensors saved with torch.save"


def _bad_inputs(folder: Path) -> dict[str, tuple[list[str], str]]:
    """argv and the exact error line of each bad input."""
    good = _batch()
    torch.save([good["input_ids"]], folder / "list.pt")
    torch.save({"input_ids": good["input_ids"], "n": 3}, folder / "value.pt")
    (folder / "text.pt").write_text("not a tensor file")
    torch.save({k: v for k, v in good.items() if k != "input_ids"}, folder / "no_ids.pt")
    torch.save({k: v for k, v in good.items() if k != "image_grid_thw"}, folder / "no_grid.pt")
    short = {**good, "pixel_values": good["pixel_values"][:-4]}
    torch.save(short, folder / "short.pt")
    torch.save(good, folder / "good.pt")
    (folder / "empty").mkdir()
    keys = sorted(k for k in good if k != "input_ids")
    return {
        "list": (
            ["list.pt", "--model", "qwen2_vl"],
            f"list.pt {NOT_A_DICT} (it holds a value of type list)",
        ),
        "value": (
            ["value.pt", "--model", "qwen2_vl"],
            f"value.pt {NOT_A_DICT} (key 'n' holds a value of type int)",
        ),
        "text": (["text.pt", "--model", "qwen2_vl"], f"text.pt {NOT_A_DICT} (torch.load failed: "),
        "no_ids": (
            ["no_ids.pt", "--model", "qwen2_vl"],
            f"the batch has no 'input_ids' tensor (keys: {keys})",
        ),
        "no_grid": (
            ["no_grid.pt", "--model", "qwen2_vl"],
            "the batch has 'pixel_values' (shape (280, 1176), dtype torch.float32) but no "
            "'image_grid_thw', which qwen2_vl needs with its images to count their placeholder "
            "tokens and compute their features.",
        ),
        "no_model": (
            ["good.pt"],
            "good.pt: a saved batch needs --model, the checkpoint directory (or model_type) "
            "whose placeholder token ids and rule it follows; pp-media does not guess them",
        ),
        "core": (
            ["short.pt", "--model", "qwen2_vl"],
            "'pixel_values' (shape (276, 1176), dtype torch.float32): expected dim 0 of size 280:",
        ),
        "model": (
            ["--model", "nope"],
            f"unknown model 'nope': choose one of {', '.join(tiny_model_types())}, or a "
            "checkpoint directory containing config.json",
        ),
        "directory": (["--model", "empty"], "empty is a directory without a config.json"),
        "videos": (
            ["--model", "llava", "--videos"],
            "--videos needs a family with videos; llava has none",
        ),
        "synthetic_size": (
            ["--batch-size", "3"],
            "batch_size 3 is smaller than n_microbatches 4; torch.distributed.pipelining needs "
            "at least one sample per microbatch. Use a larger batch or fewer microbatches.",
        ),
        "file_size": (
            ["good.pt", "--model", "qwen2_vl", "--microbatches", "7"],
            "batch_size 6 is smaller than n_microbatches 7; torch.distributed.pipelining needs "
            "at least one sample per microbatch. Use a larger batch or fewer microbatches.",
        ),
    }


def test_bad_inputs_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, (argv, expected) in _bad_inputs(tmp_path).items():
        assert main(["inspect", *argv]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "", name
        assert captured.err.startswith(f"pp-media inspect: error: {expected}"), captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, name
