"""One zarr v3 array of a trace (ZarrArray): reads through zarr-python after its codecs are
checked (direct file reads where chunks are raw), and rows written into the chunk files
themselves, with their CRC-32C, where the layout allows."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import CorruptTraceError
from . import (
    StoredArray,
    allocate,
    chunk_parts,
    full_rows,
    read_direct,
)
from ._checksums import CHUNK_CHECKSUM_BYTES, ChunkVerifier, RunningCrc, read_verified
from ._zarr_checksums import has_crc32c, verify_chunk_files
from ._zarr_meta import (
    _CHECKED_CODECS,
    _UNCHECKED_CODECS,
    _direct_readable,
    _raw_writable,
    _remove_chunks_outside,
    _write_json,
    chunk_key,
)

#: New chunk files at least this large get their blocks allocated at once (see ``allocate``).
_ALLOCATE_FROM = 1 << 20


class ZarrArray(StoredArray):
    """One array of a zarr v3 trace. Shape, chunks and attributes come from its checked
    ``zarr.json``; zarr-python opens the array only for what tracekit does not do itself
    (compressed chunks, partial rows), so opening and laying out a trace stay cheap."""

    def __init__(self, name: str, folder: Path | None, meta: dict[str, Any], store: Any,
                 writable: bool, source: Any) -> None:
        self.name = name
        self._source = source  # where reads come from (see ``_source``)
        self.dims = tuple(meta["dimension_names"])
        self._folder = folder
        self._meta = meta
        self._store = store
        self._writable = writable
        self._zarr: zarr.Array | None = None
        # Set when rows can be read and written with plain file reads and writes.
        self._direct_rows = _direct_readable(meta)
        self._raw_rows = _raw_writable(meta)
        self._made_dirs: set[Path] = set()
        self.checksum = "crc32c" if has_crc32c(meta) else None
        self._zarr_unchecked: zarr.Array | None = None
        chunks = self.chunks
        row_bytes = math.prod(chunks[1:]) * self.dtype.itemsize
        self._verifier = ChunkVerifier(name, self.checksum, chunks[0] if chunks else 1,
                                       (chunks[0] if chunks else 1) * row_bytes,
                                       lambda c: self._chunk_path(*c).name if isinstance(c, tuple)
                                       else self._chunk_path(c).name)
        self._crc = RunningCrc()  # writers: CRC of each chunk's rows written so far

    def relocate(self, folder: Path, store: Any, source: Any) -> None:
        """The trace was moved (from its temporary name to its final one)."""
        self._folder = folder
        self._store = store
        self._source = source
        self._zarr = None
        self._made_dirs = set()

    def _open_zarr(self, codecs: dict[str, str]) -> zarr.Array:
        try:
            with zarr.config.set(codecs):
                arr = zarr.open_array(store=self._store, path=self.name,
                                      mode="r+" if self._writable else "r")
            # Store every written chunk, zeros included, so a missing chunk means data
            # loss (zarr would otherwise skip all-zero chunks and read them as fill value).
            return arr.with_config({"write_empty_chunks": True})
        except Exception as exc:
            raise CorruptTraceError(f"array {self.name!r}: cannot open ({exc})") from exc

    @property
    def _arr(self) -> zarr.Array:
        if self._zarr is None:
            self._zarr = self._open_zarr(_CHECKED_CODECS)
        return self._zarr

    def _locate(self, ci: int, last: int = 0) -> tuple[str, int, None]:
        """Chunk ``ci`` (and ``last`` along the last axis) as the source's key; whether it
        exists and how long it is, the read finds out (one request, not two)."""
        return f"{self.name}/{chunk_key(self._meta, self._chunk_index(ci, last))}", 0, None

    def verify_below(self, rows: int | None) -> None:
        self._verifier.bound = rows

    def verify_chunks(self, rows: int | None = None) -> list[str]:
        if not self.checksum:
            return []
        counts = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True)]
        if rows is not None and counts:
            counts[0] = min(counts[0], rows // self.chunks[0])
        keys = [chunk_key(self._meta, idx) for idx in itertools.product(*map(range, counts))]
        return verify_chunk_files(self.name, self._source, keys, self._verifier.chunk_bytes)

    def _read_unchecked(self, key: tuple) -> np.ndarray:
        """Read with a crc32c codec that strips the checksum without checking it."""
        if self._zarr_unchecked is None:
            self._zarr_unchecked = self._open_zarr(_UNCHECKED_CODECS)
        return self._read_with(self._zarr_unchecked, key)

    def _read_with(self, arr: zarr.Array, key: tuple) -> np.ndarray:
        try:
            return np.asarray(arr[key])
        except Exception as exc:  # codecs fail in many ways (gzip: EOFError, ...)
            raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._meta["shape"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._meta["data_type"])

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self._meta["chunk_grid"]["configuration"]["chunk_shape"])

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._meta.get("attributes") or {})

    def __getitem__(self, key: tuple) -> np.ndarray:
        # Raw chunks are read straight from their bytes: rows, or attention's tiles.
        tiles = self._raw_rows and not self._direct_rows
        out = read_direct(self.name, key, self.shape, self.chunks, self.dtype.newbyteorder("<"),
                          self._source, self._verifier,
                          rows=self._locate if self._direct_rows else None,
                          tiles=self._locate if tiles else None)
        if out is not None:
            return out
        return read_verified(self, key, self._verifier, lambda k: self._read_with(self._arr, k),
                             self._read_unchecked)

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        rows = full_rows(key, value, self.shape) if self._raw_rows else None
        if rows is None:
            self._arr[key] = value  # zarr-python rewrites the chunks, checksums included
            self._crc.forget()
            return
        self.write_rows(rows[0], [value])

    def write_rows(self, start: int, blocks: Sequence[np.ndarray]) -> None:
        """Uncompressed chunks hold the bytes codec's output (raw little-endian, C order), so
        rows are written in place with one ``pwritev`` per chunk, straight from the blocks. A
        new chunk file is sized to the whole chunk first (zeros, the fill value). Rows written
        earlier are never rewritten, so committed data stays intact whatever instant the writer
        is killed at (readers trust only the commit counter).

        Arrays chunked along their last axis too (attention's keys) take blocks narrower than
        the array there: the rest of each row stays zero, and chunks past the blocks' width
        are not touched (so causal attention never writes its all-zero chunks)."""
        if not self._raw_rows:
            super().write_rows(start, blocks)
            return
        dtype = self.dtype.newbyteorder("<")
        shape, chunks = self.shape, self.chunks
        keyed = len(shape) >= 2 and (chunks[-1] != shape[-1]
                                     or any(np.shape(b)[-1] != shape[-1] for b in blocks))
        data = []
        for b in blocks:
            b = np.asarray(b)
            ok = (b.shape[1:-1] == shape[1:-1] and b.shape[-1] <= shape[-1] if keyed
                  else b.shape[1:] == shape[1:])
            if not ok or (keyed and data and b.shape[-1] != data[0].shape[-1]):
                raise ValueError(f"array {self.name!r}: rows of shape {b.shape[1:]}, "
                                 f"expected {shape[1:]}")
            data.append(b if keyed else np.ascontiguousarray(b, dtype=dtype))
        stop = start + sum(len(b) for b in data)
        if start < 0 or stop > shape[0]:
            raise ValueError(f"array {self.name!r}: rows {start}:{stop} outside 0:{shape[0]}")
        if stop == start:
            return
        c = chunks[0]
        if not keyed:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            for ci, lo, _hi, parts in chunk_parts(start, data, c):
                views = [part.reshape(-1).view(np.uint8) for part in parts]
                self._pwrite_chunk(ci, views, (lo - ci * c) * row_bytes, c * row_bytes)
            return
        k = chunks[-1]
        width = data[0].shape[-1]
        row_bytes = math.prod(shape[1:-1]) * k * dtype.itemsize
        for ci, lo, hi, parts in chunk_parts(start, data, c):
            for kj in range(math.ceil(width / k)):
                # Each row's slice of this key chunk, zero padded to the chunk's width.
                seg = np.zeros((hi - lo, *shape[1:-1], k), dtype=dtype)
                row = 0
                for part in parts:
                    piece = part[..., kj * k: (kj + 1) * k]
                    seg[row: row + len(part), ..., : piece.shape[-1]] = piece
                    row += len(part)
                self._pwrite_chunk(ci, [seg.reshape(-1).view(np.uint8)],
                                   (lo - ci * c) * row_bytes, c * row_bytes, kj)

    def _chunk_index(self, ci: int, last: int = 0) -> list[int]:
        """Chunk ``ci`` along the first axis (and ``last`` along the last, if chunked)."""
        tail = [0] * (len(self.dims) - 1)
        if tail:
            tail[-1] = last
        return [ci, *tail]

    def _chunk_path(self, ci: int, last: int = 0) -> Path:
        return self._folder / chunk_key(self._meta, self._chunk_index(ci, last))

    def _pwrite_chunk(self, ci: int, views: list[np.ndarray], offset: int,
                      chunk_bytes: int, last: int = 0) -> None:
        """Write ``views`` (uint8) at ``offset`` of a chunk file, then the chunk's crc32c:
        the CRC of the rows written so far extended over the zero tail, so the stored
        checksum is right once this returns (before the commit counter is written). A chunk
        whose write fails half-way is remembered and its checksum rewritten at the end."""
        key = (ci, last)
        path = self._chunk_path(ci, last)
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        tail = CHUNK_CHECKSUM_BYTES if self.checksum else 0
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                # A new chunk gets its full length (zeros, the fill value) before any row is
                # written, so it is never short; its blocks allocated at once where the file
                # system can (steadily fast writes, see ``allocate``). Small chunks (attention
                # tiles) skip the allocation call: it took about as long again as creating the
                # file (72 vs 39 us per 4 KB tile, measured). Without room for it (ENOSPC), the
                # empty file is removed: no chunk of a trace is ever short.
                try:
                    if chunk_bytes < _ALLOCATE_FROM or not allocate(fd, 0, chunk_bytes + tail):
                        os.ftruncate(fd, chunk_bytes + tail)
                except OSError:
                    os.unlink(path)
                    raise
            elif size != chunk_bytes + tail:
                raise CorruptTraceError(f"array {self.name!r}: chunk {ci} has {size} bytes, "
                                        f"expected {chunk_bytes + tail}")
            pending = [v for v in views if len(v)]
            if tail:
                self._crc.write(key, fd, pending, offset, chunk_bytes, size == 0,
                                self._pwritev)
            else:
                self._pwritev(fd, pending, offset)
        finally:
            os.close(fd)

    def repair_checksums(self) -> None:
        """Chunks a failed write left with a stale checksum get the one of what they hold."""

        def open_chunk(key: tuple[int, int]) -> tuple[int, int] | None:
            path = self._chunk_path(*key)
            if not path.is_file():  # trimmed away
                return None
            return os.open(path, os.O_RDWR), path.stat().st_size - CHUNK_CHECKSUM_BYTES

        self._crc.repair(open_chunk, self._pwritev)

    @staticmethod
    def _pwritev(fd: int, pending: list[np.ndarray], offset: int) -> None:
        """Write all of ``pending`` from ``offset``: pwritev takes at most IOV_MAX buffers and
        may write less than asked."""
        pending = list(pending)
        while pending:
            batch = pending[:512]
            done = os.pwritev(fd, batch, offset)
            offset += done
            while batch and done >= len(batch[0]):
                done -= len(batch[0])
                batch.pop(0)
                pending.pop(0)
            if done:
                pending[0] = pending[0][done:]

    def resize(self, shape: tuple[int, ...]) -> None:
        """Delete the chunks wholly outside ``shape`` and rewrite the shape in ``zarr.json``."""
        shape = tuple(int(n) for n in shape)
        chunks = self.chunks
        old = [math.ceil(n / c) for n, c in zip(self.shape, chunks, strict=True)]
        new = [math.ceil(n / c) for n, c in zip(shape, chunks, strict=True)]
        meta = {**self._meta, "shape": list(shape)}
        # Chunks first: rows past the commit counter are never read, and removing them
        # releases the space the new zarr.json needs when the disk is full.
        _remove_chunks_outside(self._folder, meta, old, new)
        _write_json(self._folder / "zarr.json", meta)
        self._meta = meta
        self._zarr = None  # zarr-python reopens it with the new shape when needed

    def missing_chunks(self, rows: int, expected=None) -> list[str]:
        counts = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True)]
        counts[0] = math.ceil(rows / self.chunks[0]) if self.shape else 0
        keys = [chunk_key(self._meta, idx) for idx in itertools.product(*(range(n) for n in counts))
                if expected is None or expected(idx)]
        full = [f"{self.name}/{key}" for key in keys]
        try:
            sizes = self._source.sizes(full)
        except CorruptTraceError:  # a link or a FIFO among them: there, but not a chunk
            sizes = [self._size_or_bad(k) for k in full]
        return [key for key, size in zip(keys, sizes, strict=True) if size is None]

    def _size_or_bad(self, key: str) -> int | None:
        """The size of object ``key``; -1 for one that is there but not a regular file
        (reading it says what it is)."""
        try:
            return self._source.size(key)
        except CorruptTraceError:
            return -1
