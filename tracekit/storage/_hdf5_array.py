"""One HDF5 dataset of a trace (HDF5Array): chunked reads, checksum-verified and direct
where uncompressed, and whole-chunk writes with Fletcher-32 computed ahead of HDF5."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from ..errors import CorruptTraceError
from . import (
    StoredArray,
    chunk_parts,
    full_rows,
    read_direct,
)
from ._checksums import (
    CHUNK_CHECKSUM_BYTES,
    ChunkVerifier,
    fletcher32,
    read_verified,
    trailer,
)
from ._hdf5_file import _H5_ERRORS, _helper_pool, _unchecked_dxpl


class HDF5Array(StoredArray):
    def __init__(self, name: str, ds: h5py.Dataset, dims: tuple[str, ...],
                 source: Any = None, writable: bool = False, raw: bool = False,
                 checksum: bool = False, cached: list[int] | None = None,
                 tiled_source: Any = None) -> None:
        self.name = name
        # Bytes written into HDF5's chunk cache since the last flush, shared by a writer's
        # arrays: the file space its next flush may need for them (see _cover_allocated).
        self._cached = cached if cached is not None else [0]
        self._ds = ds
        self.dims = dims
        # The file's Source (key ''), set when rows can be read with plain ranged reads,
        # and when position x key tiles can be read that way.
        self._source = source
        self._tiled_source = tiled_source
        self._tiles: dict[tuple[int, int], tuple[int, int]] | None = None
        self._raw_chunks = raw and writable  # whole chunks can be written as raw bytes
        self._writable = writable
        # h5py asks HDF5 for these on every access; they do not change, nor does a writer's
        # shape but through resize (a reader's can: a SWMR writer trims at the end).
        self._dtype = ds.dtype
        self._chunks = tuple(ds.chunks or ds.shape)
        self._chunk_nbytes = int(np.prod(self._chunks)) * self._dtype.itemsize
        self._shape = tuple(ds.shape) if writable else None
        # Fletcher-32, HDF5's last filter: stored chunks end with it (raw ones: data + 4).
        self.checksum = "fletcher32" if checksum else None
        chunk_bytes = math.prod(self._chunks) * self._dtype.itemsize
        self._verifier = ChunkVerifier(name, self.checksum, self._chunks[0] if self._chunks
                                       else 1, chunk_bytes, self._describe)

    def _describe(self, ci: Any) -> str:
        """A chunk as errors name it: its offset, e.g. (24, 0, 0)."""
        if isinstance(ci, tuple) and len(ci) == 2 < len(self.dims):  # a tile: (rows, keys)
            middle = (0,) * (len(self.dims) - 2)
            return str((ci[0] * self._chunks[0], *middle, ci[1] * self._chunks[-1]))
        if isinstance(ci, tuple):
            return str(ci)
        return str((ci * self._chunks[0],) + (0,) * (len(self.dims) - 1))

    def verify_below(self, rows: int | None) -> None:
        self._verifier.bound = rows

    def verify_chunks(self, rows: int | None = None) -> list[str]:
        if not self.checksum:
            return []
        problems = []
        check = ChunkVerifier(self.name, self.checksum, 1, 0, self._describe)
        try:
            count = self._ds.id.get_num_chunks()
        except _H5_ERRORS as exc:
            return [f"array {self.name!r}: chunk index unreadable ({exc})"]
        for i in range(count):
            try:
                info = self._ds.id.get_chunk_info(i)
                offset = tuple(int(x) for x in info.chunk_offset)
                if rows is not None and offset and offset[0] + self._chunks[0] > rows:
                    continue
                mask, data = self._ds.id.read_direct_chunk(offset)
            except _H5_ERRORS as exc:
                problems.append(f"array {self.name!r}: chunk {i} unreadable ({exc})")
                continue
            if mask:  # a filter was skipped: no checksum where the format requires one
                problems.append(f"array {self.name!r}: chunk {offset} skips filters "
                                f"(mask {mask:#x})")
                continue
            try:
                check.check_bytes(offset, data)
            except CorruptTraceError as exc:
                problems.append(str(exc))
        return problems

    def _locate(self, ci: int):
        offset = (ci * self._chunks[0],) + (0,) * (len(self.dims) - 1)
        info = self._ds.id.get_chunk_info_by_coord(offset)
        if info.byte_offset is None:
            return None
        if info.filter_mask:  # Fletcher-32 skipped: no checksum after the data
            raise CorruptTraceError(f"array {self.name!r}: chunk {offset} skips filters "
                                    f"(mask {info.filter_mask:#x})")
        return "", info.byte_offset, info.size

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape if self._shape is not None else tuple(self._ds.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._chunks

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self._ds.attrs.items()
                if k not in ("DIMENSION_LIST", "DIMENSION_LABELS", "REFERENCE_LIST", "CLASS",
                             "NAME")}

    def _locate_tile(self, ci: int, kj: int):
        if self._tiles is None:
            # Where every tile is, read once (one walk of the chunk index, instead of one
            # lookup per tile per read: a step of a long trace touches dozens of tiles). A
            # reader that follows a recording gets new arrays after each refresh.
            rows, keys = self._chunks[0], self._chunks[-1]
            tiles: dict[tuple[int, int], tuple[int, int]] = {}

            def add(info: Any) -> None:
                if info.byte_offset is not None:
                    # A tile that skipped its filters has no checksum after its data: its
                    # size then differs from what a read expects, and the read says so.
                    skipped = bool(info.filter_mask) and self.checksum is not None
                    tiles[(info.chunk_offset[0] // rows, info.chunk_offset[-1] // keys)] = (
                        info.byte_offset, info.size + (1 if skipped else 0))

            self._ds.id.chunk_iter(add)
            self._tiles = tiles
        where = self._tiles.get((ci, kj))
        return None if where is None else ("", *where)

    def __getitem__(self, key: tuple) -> np.ndarray:
        source = self._tiled_source or self._source
        out = read_direct(self.name, key, self.shape, self._chunks, self._dtype, source,
                          self._verifier, errors=(*_H5_ERRORS, OSError),
                          rows=self._locate if self._source is not None else None,
                          tiles=self._locate_tile if self._tiled_source is not None else None)
        if out is not None:
            return out
        return read_verified(self, key, self._verifier, lambda k: self._read_with(self._ds, k),
                             self._read_unchecked)

    def _read_unchecked(self, key: tuple) -> np.ndarray:
        """Read a block (ints and step-1 slices) with HDF5's checksum check off."""
        shape = self.shape
        full = tuple(key) + (slice(None),) * (len(shape) - len(key))
        starts, counts = [], []
        for k, n in zip(full, shape, strict=True):
            if isinstance(k, slice):
                a, b, _ = k.indices(n)
                starts.append(a)
                counts.append(max(0, b - a))
            else:
                starts.append(int(k))
                counts.append(1)
        out = np.empty(counts, dtype=self._dtype)
        if out.size:
            try:
                fspace = self._ds.id.get_space()
                fspace.select_hyperslab(tuple(starts), tuple(counts))
                self._ds.id.read(h5py.h5s.create_simple(tuple(counts)), fspace, out,
                                 dxpl=_unchecked_dxpl())
            except _H5_ERRORS as exc:
                raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc
        drop = tuple(0 if not isinstance(k, slice) else slice(None) for k in full)
        return out[drop]

    def _read_with(self, ds: h5py.Dataset, key: tuple) -> np.ndarray:
        try:
            return np.asarray(ds[key])
        except _H5_ERRORS as exc:
            raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        rows = full_rows(key, value, self.shape) if self._writable else None
        if rows is None:
            self._ds[key] = value
            self._cached[0] += max(np.asarray(value).nbytes, self._chunk_nbytes)
            return
        self.write_rows(rows[0], [value])

    def write_rows(self, start: int, blocks: Sequence[np.ndarray]) -> None:
        """Whole uncompressed chunks go to ``write_direct_chunk`` (joined when a chunk spans
        several blocks, with their Fletcher-32); other rows are written as hyperslabs through
        HDF5's low-level API, which skips h5py's selection machinery (a tenth of the time for
        small rows), and HDF5 computes their chunk's Fletcher-32 when it writes it."""
        shape = self.shape
        blocks = [np.asarray(b) for b in blocks]
        for b in blocks:
            if b.shape[1:-1] != shape[1:-1] or (b.ndim > 1 and b.shape[-1] > shape[-1]):
                raise ValueError(f"array {self.name!r}: rows of shape {b.shape[1:]}, "
                                 f"expected {shape[1:]}")
        stop = start + sum(len(b) for b in blocks)
        if start < 0 or stop > shape[0]:
            raise ValueError(f"array {self.name!r}: rows {start}:{stop} outside 0:{shape[0]}")
        c = self._chunks[0]
        whole = []
        for ci, lo, hi, parts in chunk_parts(start, blocks, c):
            if (self._raw_chunks and hi - lo == c
                    and all(p.shape[1:] == shape[1:] for p in parts)):
                whole.append((ci, parts))
                continue
            row = lo
            for part in parts:
                self._write_region(row, part)
                row += len(part)
            # The flush writes the whole chunk, at a new place the first time.
            self._cached[0] += self._chunk_nbytes
        self._write_chunks(whole)

    def _write_chunks(self, whole: list[tuple[int, list[np.ndarray]]]) -> None:
        """Write whole chunks; with several, the next one is joined and checksummed on a
        helper thread while HDF5 writes this one (HDF5's Fletcher-32 runs at about 1.7 GB/s
        here, a plain append at 2-4; ctypes releases the GIL while it runs)."""
        tail = (0,) * (len(self.dims) - 1)
        if not (self.checksum and len(whole) > 1):
            for ci, parts in whole:
                self._ds.id.write_direct_chunk((ci * self._chunks[0], *tail),
                                               self._stored_chunk(parts))
            return
        pool = _helper_pool()
        ahead = pool.submit(self._stored_chunk, whole[0][1])
        for i, (ci, _) in enumerate(whole):
            data = ahead.result()
            if i + 1 < len(whole):  # at most two chunks in memory
                ahead = pool.submit(self._stored_chunk, whole[i + 1][1])
            self._ds.id.write_direct_chunk((ci * self._chunks[0], *tail), data)

    def _stored_chunk(self, parts: list[np.ndarray]) -> np.ndarray:
        """A whole chunk as HDF5 stores it: its rows, then their Fletcher-32 if the dataset
        has that filter (HDF5 computes it for the rows it writes itself)."""
        if not self.checksum:
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return np.ascontiguousarray(data, dtype=self._dtype)
        out = np.empty(sum(p.size for p in parts) * self._dtype.itemsize
                       + CHUNK_CHECKSUM_BYTES, dtype=np.uint8)
        body = out[:-CHUNK_CHECKSUM_BYTES].view(self._dtype)
        np.concatenate([p.reshape(-1) for p in parts], out=body, casting="same_kind")
        out[-CHUNK_CHECKSUM_BYTES:] = np.frombuffer(
            trailer(fletcher32(out[:-CHUNK_CHECKSUM_BYTES])), np.uint8)
        return out

    def _write_region(self, row: int, data: np.ndarray) -> None:
        """Write ``data`` at rows ``row:row+len(data)``, from index 0 on every other axis."""
        data = np.ascontiguousarray(data, dtype=self._dtype)
        if data.size == 0:
            return
        fspace = self._ds.id.get_space()
        fspace.select_hyperslab((row,) + (0,) * (data.ndim - 1), data.shape)
        self._ds.id.write(h5py.h5s.create_simple(data.shape), fspace, data)

    def resize(self, shape: tuple[int, ...]) -> None:
        self._ds.resize(shape)
        if self._shape is not None:
            self._shape = tuple(int(n) for n in shape)

    def missing_chunks(self, rows: int, expected=None) -> list[str]:
        chunks, shape = self.chunks, self.shape
        counts = [math.ceil(rows / chunks[0]),
                  *(math.ceil(s / c) for s, c in zip(shape[1:], chunks[1:], strict=True))]
        missing = []
        for idx in itertools.product(*(range(n) for n in counts)):
            if expected is not None and not expected(idx):
                continue
            offset = tuple(i * c for i, c in zip(idx, chunks, strict=True))
            try:
                info = self._ds.id.get_chunk_info_by_coord(offset)
                if info.byte_offset is None:
                    missing.append(str(offset))
            except _H5_ERRORS:
                missing.append(str(offset))
        return missing
