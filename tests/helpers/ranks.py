"""Running a test's cases on real gloo ranks and reading back what every rank recorded.

The protocol: a worker module defines ``worker(rank, port, out_dir)``, which calls
``run_cases_on_rank``; that joins a gloo process group on localhost, runs the cases in the same
order on every rank and writes ``{case key: result}`` as JSON to ``out_dir/rank{rank}.json``. The
test's module-scoped fixture calls ``spawn_ranks(worker, out_dir, ...)`` once and asserts on the
per-rank results, picking one case out with ``case_results``.

``spawn`` pickles the worker function by its module's name, so that module must import in the
child too: the worker modules live in ``tests/`` (no ``__init__.py``), which pytest puts on
``sys.path`` for the test modules, and a spawned child starts with its parent's ``sys.path``;
this module itself imports as ``tests.helpers.ranks`` through the repository root that
``tests/conftest.py`` puts there.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: What one rank records per case (JSON-serialisable); ``{"error": traceback}`` if it raised.
Result = dict[str, Any]
#: ``worker(rank, port, out_dir)``: the entry point of one spawned rank.
Worker = Callable[[int, int, str], None]
#: How long a collective may wait for the peer before gloo gives up.
GROUP_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_results_path(out_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its results."""
    return Path(out_dir, f"rank{rank}.json")


# --- the spawned ranks -----------------------------------------------------------------------


def run_cases_on_rank(
    rank: int,
    port: int,
    out_dir: str,
    cases: Iterable[tuple[str, Callable[[], Result]]],
    *,
    world_size: int,
) -> None:
    """Join the gloo group (``MASTER_ADDR`` 127.0.0.1, ``MASTER_PORT`` ``port``, one intra-op
    thread), run ``cases`` (key, run) in order with a barrier after each, and record each
    result with its ``seconds``. The first case that raises records ``{"error": traceback}``
    and ends the run on this rank, since its peer may now wait in a send, recv or collective
    that will never come: both ranks stop there. The results are written after every case and
    once more on the way out, so that a hung or killed run leaves what it finished."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
    results: dict[str, Result] = {}
    out = rank_results_path(out_dir, rank)
    try:
        for key, run in cases:
            started = time.perf_counter()
            try:
                results[key] = run()
            except Exception:
                results[key] = {"error": traceback.format_exc()}
                break
            results[key]["seconds"] = time.perf_counter() - started
            out.write_text(json.dumps(results))
            dist.barrier()
    finally:
        out.write_text(json.dumps(results))
        dist.destroy_process_group()


# --- the test process ------------------------------------------------------------------------


def spawn_ranks(
    worker: Worker,
    out_dir: str | Path,
    *,
    world_size: int,
    timeout_s: int,
    what: str = "the distributed run",
) -> list[dict[str, Result]]:
    """Run ``worker(rank, port, out_dir)`` on ``world_size`` spawned processes and return, per
    rank, the ``{case key: result}`` it wrote. A rank that raises outside its cases fails the
    join (``ProcessRaisedException``); a run still going after ``timeout_s`` seconds is killed
    and fails the test, saying ``what`` did not finish."""
    context = mp.start_processes(
        worker,
        args=(free_port(), str(out_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    for _ in range(timeout_s):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail(f"{what} did not finish within {timeout_s} s")
    return [json.loads(rank_results_path(out_dir, rank).read_text()) for rank in range(world_size)]


def case_results(results: list[dict[str, Result]], key: str) -> list[Result]:
    """Per rank, the result of case ``key``; asserts that every rank ran it without error."""
    per_rank: list[Result] = []
    for rank, rank_results in enumerate(results):
        result = rank_results.get(key)
        assert result is not None, f"rank {rank} did not run {key} (an earlier case failed?)"
        assert "error" not in result, f"rank {rank} failed {key}:\n{result['error']}"
        per_rank.append(result)
    return per_rank
