"""A writer process killed with SIGKILL at a random moment leaves a trace that opens, says it
is not complete, and returns every committed position bit-exact (or, if it died before the
trace was moved into place, no trace at all).

The writer runs in a process forked from a forkserver that has already imported tracekit,
so a trial costs the recording, not the interpreter start-up.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tracegen
from conftest import DISK_BACKENDS, SUFFIX

import tracekit
from tracekit.validate import validate

TRIALS = 20  # per on-disk backend in the default run (the issue asks for at least 20)
SLOW_TRIALS = 200


@pytest.fixture(scope="module")
def ctx():
    ctx = multiprocessing.get_context("forkserver")
    # "__main__" too: otherwise every child re-imports the main module (pytest) on start.
    ctx.set_forkserver_preload(["__main__", "tracekit", "tracekit.storage._zarr",
                                "tracekit.storage._hdf5", "tracekit.validate", "tracegen"])
    return ctx


def run_writer(ctx, path: Path, seed: int, kill_after: float | None,
               die_at_io: int | None = None) -> float:
    """Start a writer process; SIGKILL it ``kill_after`` seconds after it starts recording
    (None: let it finish, or die at its ``die_at_io``-th write). Returns how long it ran."""
    started = ctx.Event()
    proc = ctx.Process(target=tracegen.record_in_child, args=(str(path), seed, started),
                       kwargs={"die_at_io": die_at_io}, daemon=True)
    proc.start()
    assert started.wait(30), "writer process did not start"
    t0 = time.monotonic()
    if kill_after is None:
        proc.join(60)
        expected = 0 if die_at_io is None else -9
        assert proc.exitcode == expected, f"writer ended with exit code {proc.exitcode}"
    else:
        proc.join(kill_after)
        proc.kill()
        proc.join(10)
    return time.monotonic() - t0


def check_after_kill(path: Path, seed: int) -> str:
    """Everything a killed recording must guarantee; returns what state it was left in."""
    if not path.exists():
        return "absent"  # died while laying out, under its temporary name
    plan = tracegen.kill_plan()
    with tracekit.open(path) as trace:
        n = trace.n_positions
        sizes = tracegen.step_sizes(seed, plan.max_positions)
        ends = np.cumsum(sizes)
        assert n == 0 or n in ends, f"committed {n} positions, not at a step end {ends}"
        steps = int(np.searchsorted(ends, n, side="right"))
        if trace.status == "complete":
            assert n == plan.max_positions
            state = "complete"
        else:
            assert trace.status == "recording"
            assert not trace.complete
            state = "recording"
        tracegen.assert_trace_matches(
            trace, tracegen.expected_contents(plan, seed, n, sizes[:steps]))
    assert validate(path) == []
    return state


def kill_trials(ctx, tmp_path: Path, kind: str, trials: int, seed0: int) -> Counter:
    rng = random.Random(seed0)
    full = run_writer(ctx, tmp_path / f"full{SUFFIX[kind]}", seed0, None)
    assert check_after_kill(tmp_path / f"full{SUFFIX[kind]}", seed0) == "complete"
    states: Counter = Counter()
    for trial in range(trials):
        seed = seed0 + 1 + trial
        path = tmp_path / f"killed{trial}{SUFFIX[kind]}"
        kill_after = rng.uniform(0, 1.15 * full)
        run_writer(ctx, path, seed, kill_after)
        try:
            states[check_after_kill(path, seed)] += 1
        except Exception as exc:
            raise AssertionError(f"trial {trial} (seed {seed}, killed after {kill_after:.3f} s "
                                 f"of {full:.3f} s): {exc!r}") from exc
    return states


@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_sigkill_at_random_moments(ctx, tmp_path, kind) -> None:
    states = kill_trials(ctx, tmp_path, kind, TRIALS, seed0=1000 * len(kind))
    assert sum(states.values()) == TRIALS
    assert states["recording"] >= 1, f"no kill landed mid-recording: {dict(states)}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_sigkill_at_random_moments_many(ctx, tmp_path, kind) -> None:
    states = kill_trials(ctx, tmp_path, kind, SLOW_TRIALS, seed0=int(time.time()))
    assert states["recording"] >= SLOW_TRIALS // 4, dict(states)


def io_kill_trials(ctx, tmp_path: Path, points: list[int]) -> Counter:
    """A zarr recording killed just before each of its writes in ``points`` (0-based) is
    left in a valid state every time: a random instant rarely lands inside the few writes
    that create a file."""
    states: Counter = Counter()
    for i in points:
        path = tmp_path / f"io{i}.zarr"
        run_writer(ctx, path, 7, None, die_at_io=i)
        try:
            states[check_after_kill(path, 7)] += 1
        except Exception as exc:
            raise AssertionError(f"killed before write {i}: {exc!r}") from exc
    return states


def count_writes(ctx, tmp_path: Path) -> int:
    """How many writes the recording makes: kill points past it leave a complete trace."""
    lo, hi = 0, 4096
    while lo < hi:  # first kill point that the recording never reaches
        mid = (lo + hi) // 2
        path = tmp_path / f"count{mid}.zarr"
        started = ctx.Event()
        proc = ctx.Process(target=tracegen.record_in_child, args=(str(path), 7, started),
                           kwargs={"die_at_io": mid}, daemon=True)
        proc.start()
        proc.join(60)
        if proc.exitcode == 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_sigkill_before_every_early_write(ctx, tmp_path) -> None:
    # The first writes lay out the trace, rename it into place and make the first commits.
    states = io_kill_trials(ctx, tmp_path, list(range(80)))
    assert states["absent"] >= 1 and states["recording"] >= 1, dict(states)


@pytest.mark.slow
def test_sigkill_before_every_write(ctx, tmp_path) -> None:
    total = count_writes(ctx, tmp_path)
    assert total > 80
    states = io_kill_trials(ctx, tmp_path, list(range(total)))
    assert states["complete"] >= 1 and states["recording"] >= total // 2, dict(states)
