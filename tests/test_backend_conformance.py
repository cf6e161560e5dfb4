"""One conformance suite for the storage interface; every backend subclasses it.

A subclass says how to make a fresh writable backend and how to reopen what it wrote the way
a reader would; every test here then runs against it. Tests that only make sense for files on
disk (magic-byte detection, allowlists on hostile bytes, metadata size limits) are skipped for
the memory backend via ``on_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tracekit.errors import (
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
    NotATraceError,
    TraceExistsError,
)
from tracekit.storage import (
    ALLOWED_DTYPES,
    MAX_METADATA_BYTES,
    Backend,
    create_backend,
    detect_format,
    format_from_suffix,
    open_backend,
)

META = {"schema": "conformance", "nested": {"list": [1, 2.5, None, True], "text": "héllo ✓"}}


class BackendConformance:
    """Base class: subclasses set ``kind``/``on_disk`` and implement ``new`` and ``reopen``."""

    kind: str = ""
    on_disk: bool = True

    # -- hooks ------------------------------------------------------------------------------
    def new(self, tmp_path: Path) -> Backend:
        """A new, empty, writable backend."""
        raise NotImplementedError

    def reopen(self, backend: Backend) -> Backend:
        """The same trace, opened again for reading (after ``finish``)."""
        raise NotImplementedError

    def corrupt_codec(self, backend: Backend, name: str) -> None:
        """Make array ``name`` use a codec outside the allowlist (on-disk backends)."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------
    def finish(self, backend: Backend) -> Backend:
        """Close a written backend and reopen it for reading."""
        backend.end_streaming()
        backend.close()
        return self.reopen(backend)

    def laid_out(self, tmp_path: Path, **arrays: dict[str, Any]) -> Backend:
        """A backend with metadata and the given arrays (kwargs of create_array), streaming."""
        be = self.new(tmp_path)
        be.write_root_meta(META)
        for name, kw in arrays.items():
            kw = {"dims": tuple(f"{name}_d{i}" for i in range(len(kw["shape"]))),
                  "attrs": {}, "compression": None, "chunks": kw["shape"], **kw}
            be.create_array(name, **kw)
        be.begin_streaming()
        return be

    # -- arrays -----------------------------------------------------------------------------
    def test_create_array_describes_itself(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path, act=dict(
            shape=(10, 3, 4), dtype=np.dtype(np.float16), chunks=(4, 3, 4),
            dims=("position", "layer", "hidden"), attrs={"description": "x", "n": 3}))
        be = self.finish(be)
        arr = be.get_array("act")
        assert arr.name == "act"
        assert arr.shape == (10, 3, 4)
        assert arr.dtype == np.float16
        assert arr.chunks == (4, 3, 4)
        assert tuple(arr.dims) == ("position", "layer", "hidden")
        assert arr.attrs["description"] == "x"
        assert int(arr.attrs["n"]) == 3
        be.close()

    def test_new_array_reads_as_zeros(self, tmp_path: Path) -> None:
        be = self.finish(self.laid_out(
            tmp_path, a=dict(shape=(5, 2), dtype=np.dtype(np.int32), chunks=(2, 2))))
        assert np.array_equal(be.get_array("a")[(slice(0, 5), slice(0, 2))],
                              np.zeros((5, 2), np.int32))
        be.close()

    @pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
    def test_every_allowed_dtype_round_trips(self, tmp_path: Path, dtype: str) -> None:
        dt = np.dtype(dtype)
        values = np.arange(-3, 9).astype(dt) if dt.kind != "b" else np.arange(12) % 3 == 0
        be = self.laid_out(tmp_path, a=dict(shape=(12,), dtype=dt, chunks=(5,)))
        be.get_array("a")[(slice(0, 12),)] = values
        be = self.finish(be)
        out = be.get_array("a")[(slice(0, 12),)]
        assert out.dtype == dt
        assert np.array_equal(out, values)
        be.close()

    def test_write_and_read_regions(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        full = rng.normal(size=(9, 3, 5)).astype(np.float32)
        be = self.laid_out(tmp_path, a=dict(shape=(9, 3, 5), dtype=np.dtype(np.float32),
                                            chunks=(2, 3, 5)))
        arr = be.get_array("a")
        arr[(slice(0, 4), slice(0, 3), slice(0, 5))] = full[:4]  # aligned chunks
        arr[(slice(4, 9), slice(0, 3), slice(0, 5))] = full[4:]  # across a chunk boundary
        arr[(3, 1, slice(1, 4))] = np.full(3, 7.0, np.float32)  # a partial row
        full[3, 1, 1:4] = 7.0
        be = self.finish(be)
        arr = be.get_array("a")
        assert np.array_equal(arr[(slice(0, 9), slice(0, 3), slice(0, 5))], full)
        assert np.array_equal(arr[(slice(3, 6), slice(1, 2), slice(2, 5))], full[3:6, 1:2, 2:5])
        assert np.array_equal(arr[(5, 2, slice(0, 5))], full[5, 2])
        assert arr[(2, 0, 4)] == full[2, 0, 4]
        be.close()

    def test_write_rows_joins_blocks_across_chunks(self, tmp_path: Path) -> None:
        # What the writer does: one block per step, steps of any size, commits that start and
        # end inside chunks; rows already written stay as they were.
        rng = np.random.default_rng(1)
        full = rng.normal(size=(13, 2, 3)).astype(np.float16)
        be = self.laid_out(tmp_path, a=dict(shape=(16, 2, 3), dtype=np.dtype(np.float16),
                                            chunks=(4, 2, 3)))
        arr = be.get_array("a")
        arr.write_rows(0, [full[0:1], full[1:3]])  # ends inside chunk 0
        strided = np.ascontiguousarray(full[3:6][::-1])[::-1]  # a non-contiguous view
        arr.write_rows(3, [strided, full[6:6], full[6:11]])  # patches chunk 0, spans 3 chunks
        arr.write_rows(11, [full[11:13]])
        be = self.finish(be)
        arr = be.get_array("a")
        out = arr[(slice(0, 16), slice(0, 2), slice(0, 3))]
        assert np.array_equal(out[:13], full)
        assert not out[13:].any()
        be.close()

    @pytest.mark.parametrize("key_chunk", [4, 9])
    def test_write_rows_narrower_than_the_last_axis(self, tmp_path: Path,
                                                     key_chunk: int) -> None:
        # Attention rows: each commit holds the keys seen so far; the rest of a row is zero.
        rng = np.random.default_rng(2)
        full = np.zeros((10, 2, 9), np.float16)
        be = self.laid_out(tmp_path, a=dict(shape=(10, 2, 9), dtype=np.dtype(np.float16),
                                            chunks=(4, 2, key_chunk)))
        arr = be.get_array("a")
        for start, stop, width in ((0, 3, 2), (3, 7, 7), (7, 10, 9)):
            block = rng.normal(size=(stop - start, 2, width)).astype(np.float16)
            arr.write_rows(start, [block])
            full[start:stop, :, :width] = block
        be = self.finish(be)
        out = be.get_array("a")[(slice(0, 10), slice(0, 2), slice(0, 9))]
        assert np.array_equal(out, full)
        be.close()

    def test_compressed_arrays_round_trip(self, tmp_path: Path) -> None:
        data = np.zeros((16, 40), np.float16)
        data[:, :5] = np.arange(80).reshape(16, 5)
        be = self.laid_out(tmp_path,
                           z=dict(shape=(16, 40), dtype=np.dtype(np.float16), chunks=(4, 40),
                                  compression="zstd"),
                           g=dict(shape=(16, 40), dtype=np.dtype(np.float16), chunks=(4, 40),
                                  compression="gzip"))
        for name in ("z", "g"):
            be.get_array(name)[(slice(0, 16), slice(0, 40))] = data
        be = self.finish(be)
        for name in ("z", "g"):
            assert np.array_equal(be.get_array(name)[(slice(0, 16), slice(0, 40))], data)
        be.close()

    def test_packed_arrays_round_trip_small(self, tmp_path: Path) -> None:
        """``packed`` (the vocabulary): written once before streaming, read whole; an
        int64 counting sequence packs to a small fraction of its size on disk."""
        ramp = np.arange(1 << 16, dtype=np.int64)
        text = np.frombuffer(b" the quick brown fox" * 500, dtype=np.uint8)
        be = self.new(tmp_path)
        be.write_root_meta(META)
        be.create_array("r", ramp.shape, ramp.dtype, ramp.shape, ("r_d0",), {}, "packed")
        be.create_array("t", text.shape, text.dtype, text.shape, ("t_d0",), {}, "packed")
        be.get_array("r")[(slice(0, len(ramp)),)] = ramp
        be.get_array("t")[(slice(0, len(text)),)] = text
        be.begin_streaming()
        be = self.finish(be)
        assert np.array_equal(be.get_array("r")[(slice(0, len(ramp)),)], ramp)
        assert np.array_equal(be.get_array("t")[(slice(0, len(text)),)], text)
        be.close()
        if self.on_disk:
            from tracekit._cliutil import disk_usage

            assert disk_usage(Path(be.path)) < ramp.nbytes / 20

    def test_resize_keeps_the_data_it_covers(self, tmp_path: Path) -> None:
        data = np.arange(24, dtype=np.int64).reshape(8, 3)
        be = self.laid_out(tmp_path, a=dict(shape=(8, 3), dtype=np.dtype(np.int64),
                                            chunks=(3, 3)))
        arr = be.get_array("a")
        arr[(slice(0, 8), slice(0, 3))] = data
        arr.resize((5, 3))
        assert arr.shape == (5, 3)
        be = self.finish(be)
        arr = be.get_array("a")
        assert arr.shape == (5, 3)
        assert np.array_equal(arr[(slice(0, 5), slice(0, 3))], data[:5])
        be.close()

    def test_resize_grows_with_zeros(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path, a=dict(shape=(4,), dtype=np.dtype(np.int32), chunks=(4,)))
        arr = be.get_array("a")
        arr[(slice(0, 4),)] = np.array([1, 2, 3, 4], np.int32)
        arr.resize((6,))
        be = self.finish(be)
        assert np.array_equal(be.get_array("a")[(slice(0, 6),)], [1, 2, 3, 4, 0, 0])
        be.close()

    def test_array_names_lists_every_array(self, tmp_path: Path) -> None:
        spec = dict(shape=(2,), dtype=np.dtype(np.int8), chunks=(2,))
        be = self.finish(self.laid_out(tmp_path, b=spec, a=spec, c=spec))
        assert be.array_names() == ["a", "b", "c"]
        be.close()

    def test_missing_array_is_a_missing_array_error(self, tmp_path: Path) -> None:
        be = self.finish(self.laid_out(tmp_path))
        with pytest.raises(MissingArrayError, match="nope"):
            be.get_array("nope")
        be.close()

    def test_coordinate_arrays_name_their_dimension(self, tmp_path: Path) -> None:
        be = self.new(tmp_path)
        be.write_root_meta(META)
        layer = be.create_array("layer", (3,), np.dtype(np.int64), (3,), ("layer",), {}, None,
                                coordinate=True)
        layer[(slice(0, 3),)] = np.array([0, 4, 7])
        be.create_array("norm", (5, 3), np.dtype(np.float32), (5, 3), ("position", "layer"),
                        {}, None)
        be.begin_streaming()
        be = self.finish(be)
        assert tuple(be.get_array("layer").dims) == ("layer",)
        assert np.array_equal(be.get_array("layer")[(slice(0, 3),)], [0, 4, 7])
        assert tuple(be.get_array("norm").dims) == ("position", "layer")
        be.close()

    def test_missing_chunks_lists_unwritten_chunks(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path, a=dict(shape=(12, 2), dtype=np.dtype(np.float32),
                                            chunks=(4, 2)))
        be.get_array("a")[(slice(0, 4), slice(0, 2))] = np.ones((4, 2), np.float32)
        be.get_array("a")[(slice(8, 12), slice(0, 2))] = np.ones((4, 2), np.float32)
        be = self.finish(be)
        arr = be.get_array("a")
        assert arr.missing_chunks(4) == []
        if self.on_disk:
            assert len(arr.missing_chunks(12)) == 1  # the middle chunk was never written
            assert len(arr.missing_chunks(8)) == 1
        be.close()

    # -- root metadata ----------------------------------------------------------------------
    def test_root_metadata_round_trips(self, tmp_path: Path) -> None:
        be = self.finish(self.laid_out(tmp_path))
        assert be.read_root_meta() == META
        be.close()

    def test_root_metadata_can_be_rewritten_at_the_end(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path)
        be.end_streaming()
        be.write_root_meta({**META, "status": "complete"})
        be.close()
        be = self.reopen(be)
        assert be.read_root_meta() == {**META, "status": "complete"}
        be.close()

    def test_root_metadata_can_grow_while_streaming(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path)
        bigger = {**META, "status": "complete", "summary": {"x": "y" * 100_000}}
        be.write_root_meta(bigger)
        be.end_streaming()
        be.close()
        be = self.reopen(be)
        assert be.read_root_meta() == bigger
        be.close()

    def test_fresh_backend_without_metadata_is_not_a_trace(self, tmp_path: Path) -> None:
        be = self.new(tmp_path)
        with pytest.raises(NotATraceError):
            be.read_root_meta()
        be.close()

    def test_oversized_metadata_is_refused(self, tmp_path: Path) -> None:
        if not self.on_disk:
            pytest.skip("only files can be hostile")
        be = self.new(tmp_path)
        be.write_root_meta({**META, "padding": "x" * (MAX_METADATA_BYTES + 10)})
        be.begin_streaming()
        be.end_streaming()
        be.close()
        with pytest.raises((MetadataError, NotATraceError), match="limit|larger"):
            self.reopen(be).read_root_meta()

    # -- allowlist --------------------------------------------------------------------------
    def with_disallowed_dtype(self, tmp_path: Path, name: str) -> Backend:
        """A finished backend whose array ``name`` is complex (not on the dtype allowlist)."""
        be = self.laid_out(tmp_path, **{name: dict(shape=(3,), dtype=np.dtype(np.complex64),
                                                   chunks=(3,))})
        return self.finish(be)

    def test_disallowed_dtype_is_refused(self, tmp_path: Path) -> None:
        be = self.with_disallowed_dtype(tmp_path, "c")
        with pytest.raises(DisallowedCodecError, match="complex"):
            be.get_array("c")
        be.close()

    def test_disallowed_codec_is_refused(self, tmp_path: Path) -> None:
        if not self.on_disk:
            pytest.skip("the memory backend has no codecs")
        be = self.finish(self.laid_out(
            tmp_path, a=dict(shape=(4,), dtype=np.dtype(np.float32), chunks=(4,))))
        be.close()
        self.corrupt_codec(be, "a")
        be = self.reopen(be)
        with pytest.raises(DisallowedCodecError, match="'a'"):
            be.get_array("a")
        be.close()

    # -- lifecycle --------------------------------------------------------------------------
    def test_trace_appears_only_once_laid_out(self, tmp_path: Path) -> None:
        if not self.on_disk:
            pytest.skip("memory traces have no path")
        final = tmp_path / f"t{'.zarr' if self.kind == 'zarr' else '.h5'}"
        be = create_backend(final, self.kind)
        be.write_root_meta(META)
        be.create_array("a", (2,), np.dtype(np.int8), (2,), ("x",), {}, None)
        assert not final.exists()
        be.begin_streaming()
        assert final.exists()
        assert be.path == final
        be.end_streaming()
        be.close()
        assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary left over

    def test_create_refuses_an_existing_path(self, tmp_path: Path) -> None:
        if not self.on_disk:
            pytest.skip("memory traces have no path")
        final = tmp_path / "taken"
        final.write_bytes(b"mine")
        with pytest.raises(TraceExistsError):
            create_backend(final, self.kind)
        assert final.read_bytes() == b"mine"

    def test_reader_sees_flushed_data_after_refresh(self, tmp_path: Path) -> None:
        be = self.laid_out(tmp_path, a=dict(shape=(8,), dtype=np.dtype(np.int64), chunks=(2,)))
        arr = be.get_array("a")
        arr[(slice(0, 2),)] = np.array([5, 6])
        be.flush()
        reader = self.reopen(be)
        assert np.array_equal(reader.get_array("a")[(slice(0, 2),)], [5, 6])
        arr[(slice(2, 4),)] = np.array([7, 8])
        be.flush()
        reader.refresh()
        assert np.array_equal(reader.get_array("a")[(slice(0, 4),)], [5, 6, 7, 8])
        reader.close()
        be.end_streaming()
        be.close()

    # -- format detection -------------------------------------------------------------------
    def test_detect_format_reads_bytes_not_names(self, tmp_path: Path) -> None:
        if not self.on_disk:
            pytest.skip("memory traces have no bytes")
        misleading = tmp_path / ("t.h5" if self.kind == "zarr" else "t.zarr")
        be = create_backend(misleading, self.kind)
        be.write_root_meta(META)
        be.begin_streaming()
        be.end_streaming()
        be.close()
        assert format_from_suffix(misleading) != self.kind
        assert detect_format(misleading) == self.kind
        opened = open_backend(misleading)
        assert opened.format_name == self.kind
        assert opened.read_root_meta() == META
        opened.close()


def test_detect_format_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "text.h5").write_text("hello")
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "dir.zarr").mkdir()
    (tmp_path / "almost.h5").write_bytes(b"\x89HDF\r\n\x1a")  # one byte short of the magic
    for name in ("text.h5", "empty.h5", "dir.zarr", "almost.h5", "missing.zarr"):
        with pytest.raises(NotATraceError):
            detect_format(tmp_path / name)


def test_format_from_suffix() -> None:
    assert format_from_suffix("a.h5") == format_from_suffix("a.HDF5") == "hdf5"
    assert format_from_suffix("a.zarr") == format_from_suffix("a") == "zarr"


# -- the backends ---------------------------------------------------------------------------
class TestMemoryBackend(BackendConformance):
    kind = "memory"
    on_disk = False

    def new(self, tmp_path: Path) -> Backend:
        return create_backend(None, "memory")

    def reopen(self, backend: Backend) -> Backend:
        return backend


class TestZarrBackend(BackendConformance):
    kind = "zarr"

    def new(self, tmp_path: Path) -> Backend:
        return create_backend(tmp_path / "t.zarr", "zarr")

    def reopen(self, backend: Backend) -> Backend:
        return open_backend(backend.path)

    def corrupt_codec(self, backend: Backend, name: str) -> None:
        meta_path = Path(backend.path) / name / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})
        meta_path.write_text(json.dumps(meta))


class TestZarrBackendSlashKeys(TestZarrBackend):
    """Traces whose arrays use zarr's default "/" chunk keys (as the golden v1.0 traces do)
    are read and written the same way."""

    def new(self, tmp_path: Path) -> Backend:
        backend = create_backend(tmp_path / "t.zarr", "zarr")
        backend.chunk_separator = "/"
        return backend


class TestHDF5Backend(BackendConformance):
    kind = "hdf5"

    def new(self, tmp_path: Path) -> Backend:
        return create_backend(tmp_path / "t.h5", "hdf5")

    def reopen(self, backend: Backend) -> Backend:
        return open_backend(backend.path)

    def corrupt_codec(self, backend: Backend, name: str) -> None:
        with h5py.File(backend.path, "r+") as f:
            old = f[name]
            data, chunks = old[()], old.chunks or True
            del f[name]
            ds = f.create_dataset(name, data=data, chunks=chunks,
                                  compression="lzf")  # filter 32000, not on the allowlist
            ds.dims[0].label = "a_d0"

    def with_disallowed_dtype(self, tmp_path: Path, name: str) -> Backend:
        be = self.finish(self.laid_out(tmp_path))
        be.close()
        with h5py.File(be.path, "r+") as f:  # tracekit cannot write one; h5py can
            f.create_dataset(name, data=np.ones(3, np.complex64)).dims[0].label = "x"
        return self.reopen(be)
