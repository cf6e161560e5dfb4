"""The writer: what a recorder does wrong is a WriterError, what the disk does wrong reaches the
producer as a WriterError with every committed position still readable, Ctrl-C leaves an
``aborted`` trace, and reading stays lazy (only the chunks a slice touches, flat memory)."""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tracegen
from conftest import trace_target

import tracekit
from tracekit.errors import CorruptTraceError, TraceExistsError, WriterError
from tracekit.storage import StoredArray
from tracekit.storage._hdf5 import HDF5Array
from tracekit.storage._memory import MemoryArray
from tracekit.storage._zarr import ZarrArray

ARRAY_CLASS = {"memory": MemoryArray, "zarr": ZarrArray, "hdf5": HDF5Array}


def one_step(plan, seed: int = 0, positions: int | None = None):
    """The arguments of the first synthetic step (the prompt)."""
    sizes = None if positions is None else [positions]
    n = positions or tracegen.step_sizes(seed, plan.max_positions)[0]
    return next(tracegen.iter_steps(plan, seed, n, sizes))


@pytest.fixture
def writer(small_plan):
    w = tracekit.create(trace_target(Path("."), "memory"), small_plan)
    yield w
    w.close("aborted")


# -- a recorder's mistakes ------------------------------------------------------------------
def test_step_with_wrong_hidden_size_is_refused(writer, small_plan) -> None:
    ids, texts, arrays, _ = one_step(small_plan)
    arrays["residual"] = arrays["residual"][..., :-1]
    with pytest.raises(WriterError, match=r"'residual' has shape \(\d+, 4, 7\), expected"):
        writer.write_step(ids, texts, arrays)


def test_step_with_wrong_position_count_is_refused(writer, small_plan) -> None:
    ids, texts, arrays, _ = one_step(small_plan, positions=3)
    arrays["mlp_out"] = arrays["mlp_out"][:2]
    with pytest.raises(WriterError, match="'mlp_out' has shape"):
        writer.write_step(ids, texts, arrays)


@pytest.mark.parametrize("keys", [0, 21])
def test_attention_with_impossible_key_count_is_refused(writer, small_plan, keys) -> None:
    ids, texts, arrays, _ = one_step(small_plan, positions=2)
    arrays["attention"] = np.zeros((2, 3, 2, keys), np.float32)
    with pytest.raises(WriterError, match="'attention' has shape"):
        writer.write_step(ids, texts, arrays)


def test_step_missing_a_captured_array_is_refused(writer, small_plan) -> None:
    ids, texts, arrays, _ = one_step(small_plan)
    del arrays["neurons"], arrays["top_ids"]
    with pytest.raises(WriterError, match=r"lacks captured array\(s\) \['neurons', 'top_ids'\]"):
        writer.write_step(ids, texts, arrays)


def test_step_with_an_uncaptured_array_is_refused(small_plan) -> None:
    plan = tracegen.small_plan(captured=["residual"])
    with tracekit.create(trace_target(Path("."), "memory"), plan) as w:
        ids, texts, arrays, _ = one_step(plan)
        arrays["mlp_out"] = np.zeros((len(ids), 3, 8), np.float32)
        with pytest.raises(WriterError, match=r"not in the plan: \['mlp_out'\]"):
            w.write_step(ids, texts, arrays)


def test_token_texts_must_match_ids(writer, small_plan) -> None:
    ids, texts, arrays, _ = one_step(small_plan, positions=2)
    with pytest.raises(WriterError, match="1 token texts for 2 positions"):
        writer.write_step(ids, texts[:1], arrays)


def test_empty_step_is_refused(writer) -> None:
    with pytest.raises(WriterError, match="at least one position"):
        writer.write_step([], [], {})


def test_more_positions_than_planned_are_refused(small_plan) -> None:
    target = trace_target(Path("."), "memory")
    with tracekit.create(target, small_plan) as w:
        tracegen.feed_synthetic(w, small_plan, 0, 19)
        ids, texts, arrays, _ = one_step(small_plan, positions=2)
        with pytest.raises(WriterError, match="beyond the planned max_positions 20"):
            w.write_step(ids, texts, arrays)
    with tracekit.open(target) as trace:  # the refusal cost nothing already written
        tracegen.assert_trace_matches(trace, tracegen.expected_contents(small_plan, 0, 19))


def test_a_refused_step_leaves_the_writer_usable(small_plan) -> None:
    target = trace_target(Path("."), "memory")
    steps = list(tracegen.iter_steps(small_plan, 4, small_plan.max_positions))
    with tracekit.create(target, small_plan, prompt_length=len(steps[0][0])) as w:
        for i, (ids, texts, arrays, t) in enumerate(steps):
            if i == 2:
                with pytest.raises(WriterError):
                    w.write_step(ids, texts, {**arrays, "residual": arrays["residual"][:, :1]})
            w.write_step(ids, texts, arrays, step_time=t)
    with tracekit.open(target) as trace:
        assert trace.status == "complete"
        tracegen.assert_trace_matches(trace, tracegen.expected_contents(small_plan, 4, 20))


def test_write_after_close_is_refused(small_plan) -> None:
    w = tracekit.create(trace_target(Path("."), "memory"), small_plan)
    w.close()
    ids, texts, arrays, _ = one_step(small_plan)
    with pytest.raises(WriterError, match="closed"):
        w.write_step(ids, texts, arrays)


# -- the disk's mistakes --------------------------------------------------------------------
class DiskFull:
    """Make every stored array's ``__setitem__`` raise ENOSPC once ``budget`` writes are done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type[StoredArray]) -> None:
        self.budget: int | None = None
        self.writes = 0
        original = cls.__setitem__

        def setitem(array, key, value):
            if self.budget is not None:
                if self.writes >= self.budget:
                    raise OSError(28, "No space left on device")
                self.writes += 1
            original(array, key, value)

        monkeypatch.setattr(cls, "__setitem__", setitem)


@pytest.mark.parametrize("budget", [0, 5, 23, 40, 77])
def test_disk_full_reaches_the_producer_and_keeps_committed_data(
        tmp_path, backend_kind, small_plan, monkeypatch, budget) -> None:
    disk = DiskFull(monkeypatch, ARRAY_CLASS[backend_kind])
    target = trace_target(tmp_path, backend_kind)
    w = tracegen.create_synthetic(target, small_plan, 5, commit_interval=0.0)
    disk.budget = budget  # the layout is written; fail somewhere in the stream of commits
    with pytest.raises(WriterError, match="No space left on device"):
        tracegen.feed_synthetic(w, small_plan, 5, small_plan.max_positions)
        w.flush()
    committed = w.committed_positions
    with pytest.raises(WriterError, match="No space left on device"):
        w.close()
    disk.budget = None
    with tracekit.open(target) as trace:
        assert trace.status == "aborted"
        assert trace.n_positions == committed < small_plan.max_positions
        sizes = tracegen.step_sizes(5, small_plan.max_positions)
        n_steps = int(np.searchsorted(np.cumsum(sizes), committed, side="right"))
        tracegen.assert_trace_matches(
            trace, tracegen.expected_contents(small_plan, 5, committed, sizes[:n_steps]))


def test_failure_while_finalizing_is_a_writer_error(tmp_path, disk_kind, small_plan,
                                                    monkeypatch) -> None:
    target = trace_target(tmp_path, disk_kind)
    w = tracegen.create_synthetic(target, small_plan, 2)
    tracegen.feed_synthetic(w, small_plan, 2, 10)
    w.flush()

    def no_space(meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w._backend, "write_root_meta", no_space)
    with pytest.raises(WriterError, match=rf"^{re.escape(str(target))}: recording stopped: "
                       r"No space left on device; .* 10 committed positions \(status recording\)$"):
        w.close()
    with tracekit.open(target) as trace:  # still the recording it was: 10 committed positions
        assert trace.status == "recording"
        tracegen.assert_trace_matches(trace, tracegen.expected_contents(small_plan, 2, 10))


# -- paths ----------------------------------------------------------------------------------
def test_existing_output_is_refused_without_overwrite(tmp_path, disk_kind, small_plan) -> None:
    target = trace_target(tmp_path, disk_kind)
    tracegen.write_synthetic(target, small_plan, 1, 4)
    with pytest.raises(TraceExistsError, match="already exists"):
        tracekit.create(target, small_plan)
    with tracekit.open(target) as trace:  # untouched
        assert trace.n_positions == 4
    expected = tracegen.write_synthetic(target, small_plan, 2, 7, overwrite=True)
    with tracekit.open(target) as trace:
        tracegen.assert_trace_matches(trace, expected)


def test_existing_file_of_another_kind_is_refused(tmp_path, disk_kind, small_plan) -> None:
    target = trace_target(tmp_path, disk_kind)
    target.write_text("my notes")
    with pytest.raises(TraceExistsError):
        tracekit.create(target, small_plan)
    assert target.read_text() == "my notes"


def test_unwritable_destination_names_the_path_asked_for(tmp_path, disk_kind, small_plan):
    """A destination that cannot be created is a WriterError naming the user's path (not the
    temporary name the trace is laid out under), and leaves nothing behind."""
    (tmp_path / "notes").write_text("a file, not a folder")
    target = trace_target(tmp_path / "notes", disk_kind)
    with pytest.raises(WriterError, match=f"cannot create {target}: Not a directory"):
        tracekit.create(target, small_plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


# -- Ctrl-C ---------------------------------------------------------------------------------
def test_ctrl_c_inside_create_leaves_an_aborted_trace(tmp_path, backend_kind, small_plan):
    target = trace_target(tmp_path, backend_kind)
    with pytest.raises(KeyboardInterrupt), tracegen.create_synthetic(target, small_plan, 9) as w:
        tracegen.feed_synthetic(w, small_plan, 9, 11)
        raise KeyboardInterrupt
    with tracekit.open(target) as trace:
        assert trace.status == "aborted"
        assert not trace.complete
        assert trace.metadata["length"] == {"positions": 11, "steps": trace.n_steps}
        tracegen.assert_trace_matches(trace, tracegen.expected_contents(small_plan, 9, 11))
    if not isinstance(target, Path):
        return
    from tracekit.validate import validate

    assert validate(target) == []


def test_closing_twice_is_harmless(small_plan) -> None:
    target = trace_target(Path("."), "memory")
    w = tracegen.create_synthetic(target, small_plan, 0)
    tracegen.feed_synthetic(w, small_plan, 0, 5)
    w.close()
    w.close("aborted")
    with tracekit.open(target) as trace:
        assert trace.status == "complete"


# -- lazy reading ---------------------------------------------------------------------------
class ReadLog:
    """Record every region the reader asks a stored array for, and the bytes it got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type[StoredArray]) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.nbytes = 0
        original = cls.__getitem__

        def getitem(array, key):
            out = original(array, key)
            self.calls.append((array.name, key))
            self.nbytes += out.nbytes
            return out

        monkeypatch.setattr(cls, "__getitem__", getitem)


def test_slicing_reads_only_what_it_asks_for(tmp_path, backend_kind, monkeypatch) -> None:
    plan = tracegen.small_plan(max_positions=40)
    target = trace_target(tmp_path, backend_kind)
    expected = tracegen.write_synthetic(target, plan, 3)
    with tracekit.open(target) as trace:
        residual = trace["residual"]
        log = ReadLog(monkeypatch, ARRAY_CLASS[backend_kind])
        row = residual[17]
        assert log.nbytes == row.nbytes
        part = residual[5:9, 1, 2:4]
        assert log.nbytes == row.nbytes + part.nbytes
        picked = trace["attention"][[30, 2, 30], 1]
        assert len(log.calls) == 4  # one region per distinct position of the int array
        tracegen.assert_bit_exact("row", row, expected.arrays["residual"][17])
        tracegen.assert_bit_exact("part", part, expected.arrays["residual"][5:9, 1, 2:4])
        tracegen.assert_bit_exact("picked", picked,
                                  expected.arrays["attention"][[30, 2, 30], 1])


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_slicing_touches_only_its_chunks_zarr(tmp_path, compression) -> None:
    """Break every chunk except the one holding position 17: reading 17 must still work."""
    plan = tracegen.small_plan(max_positions=40, compression=compression)
    path = tmp_path / "t.zarr"
    expected = tracegen.write_synthetic(path, plan, 3)
    rows = plan.chunks(plan.array_specs()[[s.name for s in plan.array_specs()].index(
        "residual")])[0]
    keep = path / "residual" / f"c.{17 // rows}.0.0"
    files = tracegen.chunk_files(path, "residual")
    assert keep in files and len(files) > 2
    for f in files:
        if f != keep:
            f.write_bytes(f.read_bytes()[:7])  # truncated
    with tracekit.open(path) as trace:
        tracegen.assert_bit_exact("row", trace["residual"][17], expected.arrays["residual"][17])
        with pytest.raises(CorruptTraceError, match="residual"):
            trace["residual"][0]


def test_slicing_touches_only_its_chunks_hdf5(tmp_path) -> None:
    """Overwrite every compressed chunk except position 17's with garbage: 17 still reads."""
    import h5py

    plan = tracegen.small_plan(max_positions=40, compression="gzip")
    path = tmp_path / "t.h5"
    expected = tracegen.write_synthetic(path, plan, 3)
    with h5py.File(path, "r") as f:
        ds = f["residual"]
        chunks = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
        rows = ds.chunks[0]
    with open(path, "r+b") as fh:
        for info in chunks:
            if info.chunk_offset[0] != (17 // rows) * rows:
                fh.seek(info.byte_offset)
                fh.write(b"\xff" * info.size)
    with tracekit.open(path) as trace:
        tracegen.assert_bit_exact("row", trace["residual"][17], expected.arrays["residual"][17])
        with pytest.raises(CorruptTraceError, match="residual"):
            trace["residual"][0]


def _rss() -> int:
    psutil = pytest.importorskip("psutil")
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def test_memory_stays_flat_while_writing_and_scrubbing(tmp_path, disk_kind) -> None:
    """A 32 MB trace written, then read one position at a time: once warm, memory does not
    grow with the amount written or read (bounded queue and commit buffer; lazy reads)."""
    model = tracegen.small_model(n_layers=15, d_model=2048, n_heads=2, d_mlp=8)
    plan = tracegen.small_plan(max_positions=512, captured=["residual"], model=model,
                               chunk_bytes=1 << 20)
    assert plan.estimated_bytes() > 32 << 20
    path = trace_target(tmp_path, disk_kind)
    row = np.random.default_rng(0).normal(size=(1, 16, 2048)).astype(np.float32)
    offsets = np.arange(4, dtype=np.float32)[:, None, None]
    warm = peak = 0
    with tracekit.create(path, plan, queue_size=4, commit_bytes=4 << 20) as w:
        for p in range(0, plan.max_positions, 4):
            w.write_step([1, 2, 3, 4], [b"x"] * 4, {"residual": row + offsets + p})
            if p == 128:
                w.flush()
                warm = peak = _rss()
            elif p > 128 and p % 32 == 0:
                peak = max(peak, _rss())
    assert peak - warm < 16 << 20, f"writing 24 MB more grew memory by {(peak - warm) >> 20} MiB"
    with tracekit.open(path) as trace:
        residual = trace["residual"]
        assert residual[0][0, 0] == np.float16(row[0, 0, 0])
        start = _rss()
        for p in range(1, plan.max_positions, 3):
            assert residual[p][0, 0] == np.float16(row[0, 0, 0] + p)
        grown = _rss() - start
    assert grown < 8 << 20, f"scrubbing grew memory by {grown >> 20} MiB"


def test_hdf5_space_extended_ahead_is_cut_when_the_writer_closes(tmp_path, small_plan) -> None:
    from tracekit.storage._hdf5 import _superblock_end

    path = tmp_path / "t.h5"
    w = tracegen.create_synthetic(path, small_plan, 3)
    tracegen.feed_synthetic(w, small_plan, 3, 10)
    w.flush()
    # While recording, the file is never shorter than its superblock says (see
    # HDF5Backend._cover_allocated); the writer extends it ahead of HDF5's flushes.
    assert path.stat().st_size >= _superblock_end(path)
    w.close()
    assert path.stat().st_size == _superblock_end(path)
    with tracekit.open(path) as trace:
        assert trace.status == "complete"


@pytest.mark.parametrize("prompt_chars", [10, 20000])
def test_hdf5_root_metadata_is_sized_once_for_what_finalizing_writes(
        tmp_path, small_plan, prompt_chars) -> None:
    """The final metadata overwrites the first in place (no attribute recreated at close),
    and it fits in one file page whenever it can (see spec section 6)."""
    import h5py

    from tracekit.storage._hdf5 import ONE_PAGE_META_BYTES

    path = tmp_path / "t.h5"
    w = tracekit.create(path, small_plan, run={"prompt": "x" * prompt_chars})
    with h5py.File(path, "r", swmr=True) as f:
        first = f.attrs.get_id("tracekit").get_type().get_size()
    tracegen.feed_synthetic(w, small_plan, 3, small_plan.max_positions)
    w.close()
    with h5py.File(path, "r") as f:
        final = f.attrs.get_id("tracekit").get_type().get_size()
    assert final == first
    if prompt_chars < 1000:
        assert first == ONE_PAGE_META_BYTES
    else:
        assert first > prompt_chars
    with tracekit.open(path) as trace:
        assert trace.status == "complete"
        assert trace.metadata["summary"]["value_ranges"]
        assert trace.metadata["run"]["prompt"] == "x" * prompt_chars


def _batched(plan, seed: int, sizes: list[int], per_batch: int):
    """The synthetic steps handed over ``per_batch`` at a time, as ``write_steps`` takes
    them: every array's rows of the batch in one, attention over the last step's keys."""
    steps = list(tracegen.iter_steps(plan, seed, sum(sizes), sizes))
    for i in range(0, len(steps), per_batch):
        group = steps[i:i + per_batch]
        keys = group[-1][2]["attention"].shape[-1]
        arrays = {}
        for name in group[0][2]:
            parts = [s[2][name] for s in group]
            if name == "attention":
                parts = [np.pad(p, [(0, 0)] * 3 + [(0, keys - p.shape[-1])]) for p in parts]
            arrays[name] = np.concatenate(parts)
        yield ([t for s in group for t in s[0]], [t for s in group for t in s[1]], arrays,
               [len(s[0]) for s in group], [s[3] for s in group])


@pytest.mark.parametrize("per_batch", [2, 5])
def test_steps_written_together_equal_steps_written_one_by_one(tmp_path, backend_kind,
                                                               small_plan, per_batch) -> None:
    sizes = tracegen.step_sizes(4, small_plan.max_positions)
    target = trace_target(tmp_path, backend_kind)
    writer = tracegen.create_synthetic(target, small_plan, seed=4)
    for ids, texts, arrays, positions, times in _batched(small_plan, 4, sizes, per_batch):
        writer.write_steps(ids, texts, arrays, step_positions=positions, step_times=times)
    writer.close()
    expected = tracegen.expected_contents(small_plan, 4, small_plan.max_positions, sizes)
    with tracekit.open(target) as trace:
        tracegen.assert_trace_matches(trace, expected)


def test_steps_written_together_must_add_up(writer, small_plan) -> None:
    ids, texts, arrays, _ = one_step(small_plan, positions=3)
    with pytest.raises(WriterError, match="steps of 4 positions in all for 3 token ids"):
        writer.write_steps(ids, texts, arrays, step_positions=[1, 3])
    with pytest.raises(WriterError, match="2 step times for 3 steps"):
        writer.write_steps(ids, texts, arrays, step_positions=[1, 1, 1], step_times=[0, 1])
    with pytest.raises(WriterError, match="at least one position"):
        writer.write_steps(ids, texts, arrays, step_positions=[3, 0])
    writer.write_steps(ids, texts, arrays, step_positions=[1, 2])  # still usable
    assert writer.positions_written == 3
