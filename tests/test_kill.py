"""A writer process killed with SIGKILL at a random moment leaves a trace that opens, says it
is not complete, returns every committed position bit-exact and passes ``validate --deep``
(every chunk within the committed rows matches its checksum), or, if it died before the trace
was moved into place, no trace at all.

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
               die_at_io: int | None = None, after_steps: int = 0) -> tuple[float, float]:
    """Start a writer process; SIGKILL it ``kill_after`` seconds after it has handed
    ``after_steps`` steps to its writer (0: after it starts recording), a point set by the
    recording's progress, so that a loaded machine, which slows the recording down, does not
    move the kills it aims at mid-recording into the layout. ``kill_after`` None: let it
    finish, or die at its ``die_at_io``-th write. Returns how long it ran, and how long it
    took to lay out the trace and hand over its first step."""
    started = ctx.Event()
    progress = ctx.Value("i", 0)
    proc = ctx.Process(target=tracegen.record_in_child, args=(str(path), seed, started),
                       kwargs={"die_at_io": die_at_io, "progress": progress}, daemon=True)
    proc.start()
    assert started.wait(30), "writer process did not start"
    t0 = time.monotonic()
    first_step = None
    if kill_after is None:
        while proc.is_alive() and progress.value < 1 and time.monotonic() - t0 < 60:
            time.sleep(0.001)
        first_step = time.monotonic() - t0
        proc.join(60)
        expected = 0 if die_at_io is None else -9
        assert proc.exitcode == expected, f"writer ended with exit code {proc.exitcode}"
    else:
        while proc.is_alive() and progress.value < after_steps and time.monotonic() - t0 < 60:
            time.sleep(0.001)
        proc.join(kill_after)
        proc.kill()
        proc.join(10)
    return time.monotonic() - t0, first_step or 0.0


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
    # Every chunk within the committed rows (every chunk, once finalized) verifies.
    assert validate(path, deep=True) == []
    return state


def kill_trials(ctx, tmp_path: Path, kind: str, trials: int, seed0: int) -> Counter:
    """Kills spread over a whole recording by its progress: a tenth while it lays out the
    trace, the rest at a uniformly random point of its steps (a random step, then a random
    fraction of a step's time), a few after it has finished."""
    rng = random.Random(seed0)
    full, layout = run_writer(ctx, tmp_path / f"full{SUFFIX[kind]}", seed0, None)
    assert check_after_kill(tmp_path / f"full{SUFFIX[kind]}", seed0) == "complete"
    plan = tracegen.kill_plan()
    states: Counter = Counter()
    for trial in range(trials):
        seed = seed0 + 1 + trial
        path = tmp_path / f"killed{trial}{SUFFIX[kind]}"
        steps = len(tracegen.step_sizes(seed, plan.max_positions))
        point = rng.uniform(-0.1, 1.05) * steps
        if point < 0:  # while laying out, by the clock: no step to wait for
            after, kill_after = 0, rng.uniform(0, layout)
        else:  # once step int(point) is handed over (past the last: after the end)
            after = int(point) + 1
            kill_after = (point % 1) * (full - layout) / steps
        run_writer(ctx, path, seed, kill_after, after_steps=after)
        try:
            states[check_after_kill(path, seed)] += 1
        except Exception as exc:
            raise AssertionError(f"trial {trial} (seed {seed}, killed {kill_after:.4f} s after "
                                 f"{after} of {steps} steps): {exc!r}") from exc
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


# -- HDF5: what a SIGKILL can leave of a write ---------------------------------------------
# A SIGKILL can also stop a buffered write between two of its pages (the kernel copies page by
# page and gives up once a fatal signal is pending: 16 of 300 kills of a process rewriting
# 4 MiB in a loop left a mix of old and new pages here). An HDF5 metadata block spread over
# two pages, rewritten in place, can therefore be left half old and half new: its checksum
# fails and, for the root group's header, the whole file is lost. CI saw it once in 200 kills.
_TRACE_WRITES = ["strace", "-f", "-qq", "-e", "trace=pwrite64,pwritev,rename,renameat,renameat2",
                 "-xx", "-s", "4"]
#: Signatures of HDF5's checksummed metadata blocks (the superblock is at offset 0).
_H5_METADATA = (b"OHDR", b"OCHK", b"BTHD", b"BTIN", b"BTLF", b"EAHD", b"EAIB", b"EASB", b"EADB",
                b"FAHD", b"FADB", b"FRHP", b"FHDB", b"FHIB", b"FSHD", b"FSSE")
_RECORD = ("import sys, threading; sys.path.insert(0, {tests!r}); import tracegen; "
           "tracegen.record_in_child({path!r}, 7, threading.Event())")


def _strace_usable() -> bool:
    import shutil
    import subprocess
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"]).returncode == 0


needs_strace = pytest.mark.skipif(not _strace_usable(), reason="needs a working strace")


def _record_under(tmp_path: Path, path: Path, *strace_args: str):
    import subprocess
    import sys
    code = _RECORD.format(tests=str(Path(__file__).parent), path=str(path))
    return subprocess.run(["strace", *strace_args, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120)


@needs_strace
def test_hdf5_metadata_rewrites_never_straddle_a_page(tmp_path) -> None:
    """Every checksummed HDF5 metadata block the writer writes once the trace has its final
    name (chunk index nodes, object headers, the root metadata at close) lies within one
    4 KiB page, so no SIGKILL can tear it."""
    import re
    log = tmp_path / "writes.log"
    path = tmp_path / "t.h5"
    done = _record_under(tmp_path, path, *_TRACE_WRITES, "-o", str(log))
    assert done.returncode == 0, done.stderr
    assert check_after_kill(path, 7) == "complete"
    renamed, metadata, straddling = False, 0, []
    for line in log.read_text().splitlines():
        if re.search(r"\brename(at2?)?\(", line):
            renamed = True
        m = re.search(r'pwrite64\(\d+, "([^"]*)"\.*, (\d+), (\d+)\)', line)
        if not (m and renamed):
            continue
        head = bytes.fromhex(m[1].replace("\\x", ""))
        size, offset = int(m[2]), int(m[3])
        if head[:4] in _H5_METADATA or offset == 0:
            metadata += 1
            if offset // 4096 != (offset + size - 1) // 4096:
                straddling.append((head[:4].decode("latin-1"), size, offset))
    assert renamed and metadata > 20, (renamed, metadata)
    assert straddling == [], f"metadata writes across a page boundary: {straddling}"


@needs_strace
def test_hdf5_superblock_never_points_past_the_end_of_the_file(tmp_path) -> None:
    """Whenever HDF5 writes its superblock into the trace, the file is already at least as
    long as the end-of-file address the superblock holds: a SIGKILL right after that write
    leaves a file HDF5 opens (it refuses one shorter than its superblock says). Without
    _cover_allocated two of them pointed past the end, as a random kill in CI once found."""
    import re
    log = tmp_path / "sizes.log"
    path = tmp_path / "t.h5"
    done = _record_under(tmp_path, path, "strace", "-f", "-qq", "-xx", "-s", "48", "-e",
                         "trace=openat,close,pwrite64,ftruncate,fallocate,rename,renameat,"
                         "renameat2", "-o", str(log))
    assert done.returncode == 0, done.stderr
    assert check_after_kill(path, 7) == "complete"
    fds: set[str] = set()
    size, superblocks, past_end, renamed = 0, 0, [], False
    for line in log.read_text().splitlines():
        if re.search(r"\brename(at2?)?\(", line):
            renamed = True  # before, a kill leaves only the temporary file: no trace
        elif m := re.search(r'openat\(AT_FDCWD, "([^"]*)", ([^,)]*).*\)\s+= (\d+)', line):
            if path.name in bytes.fromhex(m[1].replace("\\x", "")).decode():  # or .partial
                fds.add(m[3])
                if "O_TRUNC" in m[2]:
                    size = 0
        elif m := re.search(r"\bclose\((\d+)\)\s+= 0", line):
            fds.discard(m[1])
        elif m := re.search(r"ftruncate\((\d+), (\d+)\)\s+= 0", line):
            if m[1] in fds:
                size = int(m[2])
        elif m := re.search(r"fallocate\((\d+), 0, (\d+), (\d+)\)\s+= 0", line):
            if m[1] in fds:
                size = max(size, int(m[2]) + int(m[3]))
        elif m := re.search(r'pwrite64\((\d+), "([^"]*)"\.*, (\d+), (\d+)\)\s+= \d+', line):
            if m[1] not in fds:
                continue
            data = bytes.fromhex(m[2].replace("\\x", ""))
            length, offset = int(m[3]), int(m[4])
            size = max(size, offset + length)
            if renamed and offset == 0 and data[:4] == b"\x89HDF" and len(data) >= 36:
                superblocks += 1
                eof = int.from_bytes(data[28:36], "little")
                if eof > size:
                    past_end.append((eof, size))
    assert superblocks >= 3, superblocks  # one per flush that moved the end, and the close
    assert past_end == [], f"superblock end-of-file address past the file's end: {past_end}"


@pytest.mark.slow
@needs_strace
def test_hdf5_sigkill_before_every_write(tmp_path) -> None:
    """An HDF5 recording killed just before each of its file writes (every third one; strace
    delivers the SIGKILL) is left valid every time."""
    states: Counter = Counter()
    path = tmp_path / "full.h5"
    log = tmp_path / "count.log"
    assert _record_under(tmp_path, path, "-f", "-qq", "-e", "trace=pwrite64",
                         "-o", str(log)).returncode == 0
    total = sum(1 for line in log.read_text().splitlines() if "pwrite64(" in line)
    assert total > 100
    for i in range(1, total + 1, 3):
        path = tmp_path / f"io{i}.h5"
        _record_under(tmp_path, path, "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
                      "-e", f"inject=pwrite64:signal=SIGKILL:when={i}")
        try:
            states[check_after_kill(path, 7)] += 1
        except Exception as exc:
            raise AssertionError(f"killed before write {i} of {total}: {exc!r}") from exc
    assert states["recording"] >= 10 and states["complete"] >= 1, dict(states)
