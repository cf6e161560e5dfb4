"""End-to-end integrity: every stored chunk carries the checksum its container defines (zarr's
crc32c codec, HDF5's Fletcher-32 filter), which tracekit, zarr-python and h5py all verify. A
flipped byte anywhere in any chunk is a CorruptTraceError naming the array and the chunk, from
reading and from ``validate --deep``; chunks past the committed rows of a trace still being
recorded may carry a stale checksum and are not held against it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import google_crc32c
import h5py
import numpy as np
import pytest
import tracegen
import zarr
from click.testing import CliRunner

import tracekit
from tracekit.cli import main
from tracekit.errors import CorruptTraceError
from tracekit.format import CHUNK_CHECKSUM_BYTES
from tracekit.storage._checksums import crc32c, crc32c_zeros, fletcher32, fletcher32_numpy
from tracekit.validate import validate

DATA = Path(__file__).parent / "data"


# -- the checksums are the containers' own ----------------------------------------------------
@pytest.mark.parametrize("zeros", [0, 1, 4095, 4096, 4097, 1 << 20, (4 << 20) + 3])
def test_crc32c_extended_over_zeros_equals_crc32c_of_the_whole(zeros) -> None:
    head = np.random.default_rng(zeros).integers(0, 256, 777, dtype=np.uint8)
    whole = np.concatenate([head, np.zeros(zeros, np.uint8)])
    assert crc32c_zeros(crc32c([head]), zeros) == google_crc32c.value(whole.tobytes())


@pytest.mark.parametrize("data", [
    np.zeros(64, np.uint8), np.full(4096, 255, np.uint8), np.array([0, 0, 0, 1], np.uint8),
    np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8),  # odd length
    np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8),
], ids=["zeros", "ones", "one-bit", "odd", "3MiB"])
def test_fletcher32_is_what_hdf5_stores(tmp_path, data) -> None:
    """HDF5's own filter, through h5py, stores the value tracekit computes (both ways)."""
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=data.shape, fletcher32=True)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        _, stored = f["x"].id.read_direct_chunk((0,))
    want = int.from_bytes(stored[-CHUNK_CHECKSUM_BYTES:], "little")
    assert fletcher32(data) == want
    assert fletcher32_numpy(data) == want


# -- written traces: other readers verify them ------------------------------------------------
@pytest.fixture(params=[None, "zstd"], ids=["raw", "zstd"])
def zarr_trace(request, tmp_path):
    plan = tracegen.small_plan(compression=request.param, chunk_bytes=2048)
    path = tmp_path / "t.zarr"
    return path, tracegen.write_synthetic(path, plan, seed=5)


@pytest.fixture(params=[None, "gzip"], ids=["raw", "gzip"])
def hdf5_trace(request, tmp_path):
    plan = tracegen.small_plan(compression=request.param, chunk_bytes=2048)
    path = tmp_path / "t.h5"
    return path, tracegen.write_synthetic(path, plan, seed=5)


def test_zarr_python_verifies_what_tracekit_writes(zarr_trace) -> None:
    path, _ = zarr_trace
    group = zarr.open_group(str(path), mode="r")
    with tracekit.open(path) as trace:
        for name in [*trace.plan.used_dims(), *trace.array_names()]:
            codecs = group[name].metadata.codecs
            assert type(codecs[-1]).__name__ == "Crc32cCodec", name
            assert np.array_equal(group[name][...], trace[name]._stored[
                (slice(0, trace[name]._stored.shape[0]),)]), name
    chunk = tracegen.chunk_files(path, "residual")[0]
    flip_byte(chunk, 3)
    with pytest.raises(ValueError, match="checksum"):
        group["residual"][...]


def test_h5py_verifies_what_tracekit_writes(hdf5_trace) -> None:
    path, _ = hdf5_trace
    with h5py.File(path, "r") as f, tracekit.open(path) as trace:
        for name in [*trace.plan.used_dims(), *trace.array_names()]:
            plist = f[name].id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            assert filters[-1] == h5py.h5z.FILTER_FLETCHER32, name
            assert np.array_equal(f[name][...], trace[name]._stored[
                (slice(0, f[name].shape[0]),)]), name
        offset = f["residual"].id.get_chunk_info(0).byte_offset
    flip_byte(path, offset + 3)
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["residual"][...]


# -- a flipped byte anywhere is caught ----------------------------------------------------
def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


def read_array(path: Path, name: str) -> None:
    with tracekit.open(path) as trace:
        trace[name][...]


def assert_caught(path: Path, name: str, chunk: str) -> None:
    """Reading ``name`` and ``validate --deep`` both name the array and the chunk."""
    with pytest.raises(CorruptTraceError) as err:
        read_array(path, name)
    assert f"array {name!r}" in str(err.value) and chunk in str(err.value), str(err.value)
    problems = validate(path, deep=True)
    assert any(f"array {name!r}" in p and chunk in p for p in problems), problems


def zarr_chunks(path: Path) -> list[tuple[str, Path]]:
    with tracekit.open(path) as trace:
        names = [*trace.plan.used_dims(), *trace.array_names()]
    return [(name, f) for name in names for f in tracegen.chunk_files(path, name)]


def test_a_flipped_byte_in_any_zarr_chunk_is_caught(zarr_trace) -> None:
    path, _ = zarr_trace
    rng = random.Random(3)
    chunks = zarr_chunks(path)
    assert len(chunks) > 40
    for name, chunk in chunks:
        offset = rng.randrange(chunk.stat().st_size)
        flip_byte(chunk, offset)
        try:
            assert_caught(path, name, chunk.name)
        except AssertionError as exc:
            raise AssertionError(f"{chunk.name} of {name}, byte {offset}: {exc}") from exc
        flip_byte(chunk, offset)
    assert validate(path, deep=True) == []


def hdf5_chunks(path: Path) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(array, chunk offset, byte offset, stored size) of every chunk of every dataset."""
    out = []
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                out.append((name, tuple(info.chunk_offset), info.byte_offset, info.size))
    return out


def test_a_flipped_byte_in_any_hdf5_chunk_is_caught(hdf5_trace) -> None:
    path, _ = hdf5_trace
    rng = random.Random(4)
    chunks = hdf5_chunks(path)
    assert len(chunks) > 40
    for name, where, start, size in chunks:
        offset = start + rng.randrange(size)
        flip_byte(path, offset)
        try:
            assert_caught(path, name, str(where))
        except AssertionError as exc:
            raise AssertionError(f"chunk {where} of {name}, byte {offset}: {exc}") from exc
        flip_byte(path, offset)
    assert validate(path, deep=True) == []


def test_validate_deep_on_the_command_line(tmp_path) -> None:
    path = tmp_path / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=5)
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", "--deep", str(path)])
    assert (ok.exit_code, ok.output) == (0, f"{path}: valid\n")
    chunk = tracegen.chunk_files(path, "mlp_out")[0]
    flip_byte(chunk, 5)
    bad = runner.invoke(main, ["validate", "--deep", str(path)])
    assert bad.exit_code == 1
    assert bad.output.startswith(f"{path}: array 'mlp_out': chunk {chunk.name} fails its "
                                 f"crc32c checksum"), bad.output
    assert "Traceback" not in bad.output


def test_truncated_coordinate_is_reported(tmp_path) -> None:
    """A coordinate chunk cut short, or one that holds other values than its definition."""
    path = tmp_path / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=5)
    (byte,) = tracegen.chunk_files(path, "byte")
    original = byte.read_bytes()
    byte.write_bytes(original[:8])
    assert any("'byte'" in p for p in validate(path)), validate(path)
    values = np.arange(6, dtype="<i8")
    values[2] = 7  # a coordinate that is not 0, 1, 2, ... (with a checksum that matches)
    body = values.tobytes()
    byte.write_bytes(body + crc32c([body]).to_bytes(4, "little"))
    assert validate(path) == ["coordinate 'byte' differs from its definition at index 2 "
                              "(stored 7, expected 2)"]


# -- traces still being recorded --------------------------------------------------------------
LIVE_PLANS = {
    # Rows of whole-row chunks, read directly (4-position residual chunks).
    "rows": dict(chunk_bytes=256, max_positions=20),
    # Attention chunked along keys too (300 > 256 keys), read through zarr-python / HDF5.
    "keys": dict(chunk_bytes=16384, max_positions=300, captured=["attention"]),
}


@pytest.mark.parametrize("layout", sorted(LIVE_PLANS))
@pytest.mark.parametrize("kind", ["zarr", "hdf5"])
def test_chunk_past_the_committed_rows_may_hold_a_stale_checksum(tmp_path, kind,
                                                                  layout) -> None:
    """A writer killed between writing rows and their checksum leaves the chunk's checksum
    stale; the committed rows of that chunk still read exactly and the trace validates. A
    chunk wholly within the committed rows is still verified."""
    plan = tracegen.small_plan(**LIVE_PLANS[layout])
    target = "residual" if layout == "rows" else "attention"
    lead = plan.chunks(next(s for s in plan.array_specs() if s.name == target))[0]
    src = tmp_path / f"live.{'zarr' if kind == 'zarr' else 'h5'}"
    writer = tracegen.create_synthetic(src, plan, seed=6, commit_interval=0.0)
    sizes = tracegen.step_sizes(6, plan.max_positions)
    n = steps = 0
    for ids, texts, arrays, t in tracegen.iter_steps(plan, 6, plan.max_positions, sizes):
        writer.write_step(ids, texts, arrays, step_time=t)
        n, steps = n + len(ids), steps + 1
        if n > lead and n % lead:  # mid-chunk, past the first chunk
            break
    writer.flush()
    snapshot = tmp_path / f"snap{src.suffix}"
    (shutil.copytree if kind == "zarr" else shutil.copy)(src, snapshot)
    writer.close()
    expected = tracegen.expected_contents(plan, 6, n, sizes[:steps])
    # The rows after the committed ones, in the chunk holding the last committed row, as if
    # the next commit had written them and died before their checksum.
    for name in (target, "token_id"):
        for where in _row_offsets(snapshot, name, n, kind):
            flip_byte(*where)
    with tracekit.open(snapshot) as trace:
        assert trace.status == "recording" and trace.n_positions == n
        tracegen.assert_trace_matches(trace, expected)
    assert validate(snapshot, deep=True) == []
    # The first chunk holds committed rows only: it is verified.
    flip_byte(*_row_offsets(snapshot, target, 0, kind)[0])
    with pytest.raises(CorruptTraceError, match=target):
        read_array(snapshot, target)
    assert any(f"{target!r}" in p for p in validate(snapshot, deep=True))


def _row_offsets(path: Path, name: str, row: int, kind: str) -> list[tuple[Path, int]]:
    """(file, offset) of a byte of ``row`` of ``name`` in each chunk holding part of it."""
    with tracekit.open(path) as trace:
        stored = trace[name]._stored
        chunks, item = stored.chunks, stored.dtype.itemsize
    within = (row % chunks[0]) * int(np.prod(chunks[1:])) * item
    if kind == "zarr":
        return [(f, within) for f in tracegen.chunk_files(path, name)
                if int(f.name.split(".")[1]) == row // chunks[0]]
    with h5py.File(path, "r", swmr=True) as f:  # a snapshot of a file open for writing
        ds = f[name]
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    return [(path, info.byte_offset + within) for info in infos
            if info.chunk_offset[0] == row // chunks[0] * chunks[0]]


# -- format 1.0 traces have no checksums and stay valid ----------------------------------------
@pytest.mark.parametrize("name", ["golden-v1.0-full.zarr", "golden-v1.0-full.h5",
                                  "golden-v1.0-partial.zarr", "golden-v1.0-partial.h5"])
def test_format_1_0_traces_without_checksums_still_validate(name) -> None:
    assert validate(DATA / name, deep=True) == []
    with tracekit.open(DATA / name) as trace:
        assert trace["token_id"]._stored.checksum is None


def test_format_1_1_array_without_checksum_is_reported(tmp_path) -> None:
    """A 1.1 trace whose array lost its crc32c codec (the chunks without their 4 bytes) reads,
    and validate says what the format requires."""
    from corruption import edit_array_json

    path = tmp_path / "t.zarr"
    expected = tracegen.write_synthetic(path, tracegen.small_plan(), seed=5)
    for chunk in tracegen.chunk_files(path, "neurons"):
        chunk.write_bytes(chunk.read_bytes()[:-CHUNK_CHECKSUM_BYTES])
    edit_array_json(path, "neurons", lambda meta: meta["codecs"].pop())
    with tracekit.open(path) as trace:
        tracegen.assert_trace_matches(trace, expected)
    assert validate(path) == ["array 'neurons' has no chunk checksum (format 1.1 needs the zarr "
                              "crc32c codec or the HDF5 Fletcher-32 filter)"]


def test_quick_and_deep_exclude_each_other(tmp_path) -> None:
    path = tmp_path / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=5)
    result = CliRunner().invoke(main, ["validate", "--quick", "--deep", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == "Error: --quick and --deep exclude each other"


def test_a_write_that_fails_before_its_checksum_leaves_an_aborted_trace_that_verifies(
        tmp_path, monkeypatch) -> None:
    """A chunk write that fails between the rows and their checksum (a full disk) leaves the
    chunk's checksum stale; finalizing as aborted gives it the checksum of what it holds, so
    every chunk of the finished trace verifies and the committed positions read exactly."""
    from tracekit.errors import WriterError
    from tracekit.storage._zarr import ZarrArray

    plan = tracegen.small_plan(chunk_bytes=2048)
    path = tmp_path / "t.zarr"
    real = ZarrArray._pwritev
    calls = {"trailers": 0}

    def failing(fd, pending, offset):
        if len(pending) == 1 and len(pending[0]) == CHUNK_CHECKSUM_BYTES:
            calls["trailers"] += 1
            if calls["trailers"] == 40:  # well into the recording, after rows were written
                raise OSError(28, "No space left on device")
        real(fd, pending, offset)

    monkeypatch.setattr(ZarrArray, "_pwritev", staticmethod(failing))
    writer = tracegen.create_synthetic(path, plan, seed=8, commit_interval=0.0)
    with pytest.raises(WriterError, match="No space left"):
        for ids, texts, arrays, t in tracegen.iter_steps(plan, 8, plan.max_positions):
            writer.write_step(ids, texts, arrays, step_time=t)
            writer.flush()
    with pytest.raises(WriterError, match="No space left"):
        writer.close()  # finalizes as aborted, then says why
    assert calls["trailers"] >= 40
    monkeypatch.undo()
    with tracekit.open(path) as trace:
        assert trace.status == "aborted" and 0 < trace.n_positions < plan.max_positions
        n = trace.n_positions
        sizes = tracegen.step_sizes(8, plan.max_positions)
        steps = int(np.searchsorted(np.cumsum(sizes), n, side="right"))
        tracegen.assert_trace_matches(trace, tracegen.expected_contents(plan, 8, n,
                                                                         sizes[:steps]))
    assert validate(path, deep=True) == []
