"""A full disk or an I/O error loses nothing committed: the writer commits every step whose
data reached the disk, closes the trace ``aborted`` with the cause as ``stop_reason`` (or, where
not even that fits, leaves it ``recording``, which readers accept), and says so in one line
naming the trace. The process never crashes.

Two kinds of test: recordings into a real, small file system (a tmpfs this test mounts, where
mounting is allowed), with sizes swept so that the disk fills while laying out, in the first
chunk, mid-trace and at the end; and an error injected at every write call a small recording
makes through the storage seam (every array write, resize, flush and metadata write).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tracegen
from conftest import DISK_BACKENDS, SUFFIX

import tracekit
from tracekit.errors import WriterError
from tracekit.storage import Backend, StoredArray
from tracekit.storage._hdf5 import HDF5Array, HDF5Backend
from tracekit.storage._zarr import ZarrArray, ZarrBackend
from tracekit.validate import validate

SEED = 5
NO_SPACE = os.strerror(errno.ENOSPC)


def sweep_plan():
    """Several chunks per array, so that the disk can fill at many different writes."""
    return tracegen.small_plan(max_positions=200, chunk_bytes=16384, model=tracegen.small_model(
        n_layers=4, d_model=64, n_heads=4, d_mlp=128))


def check_kept(path: Path, plan, committed: int | None = None) -> tuple[str, int]:
    """The trace at ``path`` opens, validates, and holds exactly its committed positions, bit
    for bit; returns its status and how many positions it holds."""
    with tracekit.open(path) as trace:
        n = trace.n_positions
        sizes = tracegen.step_sizes(SEED, plan.max_positions)
        ends = np.cumsum(sizes)
        assert n == 0 or n in ends, f"{n} positions committed, not at a step end"
        if committed is not None:
            assert n == committed
        steps = int(np.searchsorted(ends, n, side="right"))
        tracegen.assert_trace_matches(
            trace, tracegen.expected_contents(plan, SEED, n, sizes[:steps]))
        status = trace.status
        if status == "aborted":
            assert trace.metadata["stop_reason"], trace.metadata
        else:
            assert status in ("recording", "complete"), status
    assert validate(path) == []
    return status, n


# -- a real, small file system -------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(where: Path, kib: int) -> Iterator[Path]:
    """A tmpfs of ``kib`` KiB mounted at ``where`` (skips the test where mounting is not
    allowed); unmounted whatever happens."""
    where.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux":
        pytest.skip("tmpfs mounts are a Linux feature")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


_RECORD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_diskfull, tracegen
    from tracekit.errors import WriterError
    plan = test_diskfull.sweep_plan()
    writer = None
    try:
        writer = tracegen.create_synthetic({path!r}, plan, {seed}, commit_interval=0.0)
        tracegen.feed_synthetic(writer, plan, {seed}, plan.max_positions)
        writer.close()
    except WriterError as exc:
        if writer is not None:
            try:
                writer.close("aborted")
            except WriterError as final:
                exc = final
        print(exc)
        sys.exit(1)
""")


def record_into(path: Path) -> subprocess.CompletedProcess:
    """Record the sweep plan into ``path`` in a fresh interpreter, which exits normally (a
    crash at exit, as HDF5 once did after a failed flush, shows as a negative return code)."""
    code = _RECORD.format(tests=str(Path(__file__).parent), path=str(path), seed=SEED)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def footprint(tmp_path: Path, kind: str) -> int:
    """KiB a complete recording of the sweep plan takes on a tmpfs, space reserve included."""
    with small_filesystem(tmp_path / "big", 64 << 10) as mnt:
        path = mnt / f"t{SUFFIX[kind]}"
        done = record_into(path)
        assert done.returncode == 0, done.stdout + done.stderr
        stat = os.statvfs(mnt)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024


def room_to_finish(full: int) -> int:
    """KiB in which a recording whose final size is ``full`` KiB completes: while recording,
    the writer also holds its space reserve, and HDF5 the file space of its next flush."""
    return 2 * full + 1536


def disk_full_sweep(tmp_path: Path, kind: str, sizes: list[int]) -> Counter:
    plan = sweep_plan()
    seen: Counter = Counter()
    for kib in sizes:
        with small_filesystem(tmp_path / f"fs{kib}", kib) as mnt:
            path = mnt / f"t{SUFFIX[kind]}"
            done = record_into(path)
            what = f"{kind} into {kib} KiB: rc {done.returncode}, {done.stdout!r} {done.stderr!r}"
            assert done.returncode in (0, 1), what  # never a crash
            if done.returncode == 0:
                assert check_kept(path, plan) == ("complete", plan.max_positions), what
                seen["complete"] += 1
                continue
            lines = done.stdout.splitlines()
            assert len(lines) == 1 and done.stderr == "", what
            assert lines[0].startswith(f"cannot create {path}: {NO_SPACE}") or (
                lines[0].startswith(f"{path}: recording stopped: {NO_SPACE}")), what
            if not path.exists():
                assert lines[0].startswith("cannot create"), what
                seen["layout"] += 1
            else:
                status, n = check_kept(path, plan)
                assert f"keeps its {n} committed positions (status {status})" in lines[0], what
                if status == "aborted":
                    with tracekit.open(path) as trace:
                        assert trace.metadata["stop_reason"] == NO_SPACE
                seen["first chunk" if n == 0 else "all" if n == plan.max_positions
                     else "mid-trace"] += 1
            assert sorted(os.listdir(mnt)) == ([path.name] if path.exists() else []), what
    return seen


@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_disk_full_sweep_keeps_every_committed_position(tmp_path, kind) -> None:
    full = footprint(tmp_path, kind)
    sizes = sorted({max(4, int(full * f)) for f in (0.02, 0.4, 0.7, 0.95)})
    seen = disk_full_sweep(tmp_path, kind, [*sizes, room_to_finish(full)])
    assert seen["layout"] >= 1 and seen["mid-trace"] >= 2 and seen["complete"] >= 1, seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_disk_full_fine_sweep(tmp_path, kind) -> None:
    """Every 24 KiB from nothing to a complete trace: the disk fills at every stage (in
    the 1.1 MiB sweep plan, 121 sizes for HDF5: 54 while laying out, 66 mid-trace)."""
    full = footprint(tmp_path, kind)
    seen = disk_full_sweep(tmp_path, kind, [*range(4, full + 64, 24), room_to_finish(full)])
    # HDF5 lays a trace out in 1 MiB it allocates first and frees at the first flush, so its
    # first chunk always fits once the layout did (the injected errors fail it there).
    stages = ["layout", "mid-trace", "complete"] + (["first chunk"] if kind == "zarr" else [])
    assert min(seen[stage] for stage in stages) >= 1, seen


# -- an error at every write call ----------------------------------------------------------
#: The calls through which the writer changes what is stored.
WRITE_CALLS = {
    StoredArray: ("__setitem__", "write_rows", "resize"),
    Backend: ("create_array", "write_root_meta", "begin_streaming", "end_streaming", "flush",
              "seal"),
}
CLASSES = {"zarr": (ZarrBackend, ZarrArray), "hdf5": (HDF5Backend, HDF5Array)}


class FailingDisk:
    """Counts the storage seam's write calls; from call ``fail_at`` on (or at that one call
    only, when not ``persistent``) each raises OSError(``code``) before doing anything."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
        self.calls = 0
        self.fail_at: int | None = None
        self.code = errno.ENOSPC
        self.persistent = False
        self.committed_then: int | None = None  # what the writer had committed at the failure
        self.writer: tracekit.TraceWriter | None = None
        for cls in CLASSES[kind]:
            base = Backend if issubclass(cls, Backend) else StoredArray
            for name in WRITE_CALLS[base]:
                monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            if self.fail_at is not None:
                n, self.calls = self.calls, self.calls + 1
                if n == self.fail_at or (self.persistent and n > self.fail_at):
                    if self.committed_then is None and self.writer is not None:
                        self.committed_then = self.writer.committed_positions
                    raise OSError(self.code, os.strerror(self.code))
            return fn(*args, **kwargs)
        return call


def record_with(disk: FailingDisk, path: Path, plan, fail_at: int | None,
                warned: list | None = None) -> WriterError | None:
    disk.calls, disk.fail_at, disk.committed_then, disk.writer = 0, fail_at, None, None
    if fail_at is None:
        disk.fail_at = 1 << 30  # count only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = _record_with(disk, path, plan)
    if warned is not None:
        warned[:] = [str(w.message) for w in caught]
    return error


def _record_with(disk: FailingDisk, path: Path, plan) -> WriterError | None:
    error = None
    try:
        disk.writer = tracegen.create_synthetic(path, plan, SEED, commit_interval=0.0)
        tracegen.feed_synthetic(disk.writer, plan, SEED, plan.max_positions)
        disk.writer.close()
    except WriterError as exc:
        error = exc
        if disk.writer is not None:
            try:
                disk.writer.close("aborted")
            except WriterError as final:
                error = final
    finally:
        disk.fail_at = None
    return error


def injection_sweep(tmp_path: Path, kind: str, monkeypatch, persistent: bool,
                    stride: int = 1) -> Counter:
    plan = tracegen.kill_plan()
    disk = FailingDisk(monkeypatch, kind)
    assert record_with(disk, tmp_path / f"count{SUFFIX[kind]}", plan, None) is None
    total = disk.calls
    assert total > 50, total
    disk.persistent = persistent
    seen: Counter = Counter()
    # With a stride: every stride-th call, and every call of laying out and finalizing.
    points = sorted({*range(0, total, stride), *range(24), *range(total - 8, total)})
    for i in points:
        disk.code = errno.EIO if i % 2 and not persistent else errno.ENOSPC
        cause = os.strerror(disk.code)
        folder = tmp_path / f"{i}"
        folder.mkdir()
        path = folder / f"t{SUFFIX[kind]}"
        warned: list[str] = []
        error = record_with(disk, path, plan, i, warned)
        what = f"{'from' if persistent else 'at'} write call {i} of {total} ({cause}): {error}"
        if error is None:  # the optional consolidated metadata failed, nothing else
            assert i == total - 1, what
            assert warned == [f"{path}: complete, but its metadata was not consolidated: "
                              f"{cause}"], warned
            assert check_kept(path, plan) == ("complete", plan.max_positions), what
            seen["complete"] += 1
            continue
        message = str(error)
        assert "\n" not in message and ".partial" not in message, what
        assert message in (f"cannot create {path}: {cause}",) or message.startswith(
            f"{path}: recording stopped: {cause}; the trace keeps its "
            f"{disk.writer.committed_positions if disk.writer else -1} committed positions"), what
        if not path.exists():
            assert disk.writer is None, what  # only a trace never laid out is absent
            seen["absent"] += 1
        else:
            status, n = check_kept(path, plan, committed=disk.writer.committed_positions)
            assert n >= (disk.committed_then or 0), what
            assert message.endswith(f"(status {status})"), what
            if persistent:
                assert status in ("aborted", "recording"), what
            else:  # a single failure: everything after it works, so the trace says why
                assert status == "aborted", what
            if status == "aborted":
                with tracekit.open(path) as trace:
                    assert trace.metadata["stop_reason"] == cause, what
            seen[status] += 1
        assert os.listdir(folder) == ([path.name] if path.exists() else []), what
    return seen


@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_error_at_write_calls_keeps_every_committed_position(tmp_path, kind,
                                                             monkeypatch) -> None:
    seen = injection_sweep(tmp_path, kind, monkeypatch, persistent=False, stride=29)
    assert seen["absent"] >= 1 and seen["aborted"] >= 10, seen


@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_disk_full_from_write_calls_keeps_every_committed_position(tmp_path, kind,
                                                                   monkeypatch) -> None:
    seen = injection_sweep(tmp_path, kind, monkeypatch, persistent=True, stride=29)
    assert seen["absent"] >= 1 and seen["recording"] >= 5, seen


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_error_at_every_write_call(tmp_path, kind, persistent, monkeypatch) -> None:
    seen = injection_sweep(tmp_path, kind, monkeypatch, persistent=persistent)
    assert seen["absent"] >= 1 and seen["recording" if persistent else "aborted"] >= 10, seen


# -- the recorder, as a user runs it ---------------------------------------------------------
@pytest.mark.parametrize("kind", DISK_BACKENDS)
def test_record_into_a_full_disk_ends_with_one_line(tmp_path, kind) -> None:
    """``tracekit record`` whose disk fills mid-generation exits with status 1 and one line
    naming the trace and the cause (no traceback, no crash at exit), and the trace keeps what
    that line says."""
    import re

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tracekit.recorder.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-gpt2", "gpt2").resolve()
    # Room for the layout and the space reserve, not for all 126 positions (HDF5 needs 1 MiB
    # allocated to lay a trace out, and frees it at its first flush: a larger trace).
    larger = ["--capture", "all", "--store-dtype", "float32"] if kind == "hdf5" else []
    with small_filesystem(tmp_path / "fs", {"zarr": 600, "hdf5": 1300}[kind]) as mnt:
        out = mnt / f"t{SUFFIX[kind]}"
        done = subprocess.run(
            [sys.executable, "-c", "from tracekit.cli import main; main()", "record",
             str(model), "-p", "def fib(n):", "-n", "120", "--ignore-eos", "-o", str(out),
             *larger],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
        assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
        found = re.fullmatch(rf"Error: {re.escape(str(out))}: recording stopped: {NO_SPACE}; "
                             r"the trace keeps its (\d+) committed positions \(status (\w+)\)",
                             errors[0])
        assert found, errors
        with tracekit.open(out) as trace:
            assert (trace.n_positions, trace.status) == (int(found[1]), found[2])
            assert trace.status == "aborted" and trace.metadata["stop_reason"] == NO_SPACE
            assert len(trace["residual"][:]) == trace.n_positions
        assert validate(out) == []
