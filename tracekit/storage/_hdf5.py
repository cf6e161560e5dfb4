"""HDF5 single-file backend, written in SWMR mode so a killed writer leaves a valid file.

Every object (datasets, dimension scales, attributes) is created first; then the file switches
to SWMR, after which only raw data and dataset extents change. Readers open with ``swmr=True``,
which also reads a file whose writer was killed (its consistency flag is still set).
The metadata is a JSON string in the root attribute ``tracekit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import (
    CorruptTraceError,
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
    NotATraceError,
    TraceExistsError,
)
from ..format import HDF5_PAGE_BYTES, ROOT_KEY
from . import (
    MAX_METADATA_BYTES,
    Backend,
    SpaceReserve,
    StoredArray,
    allocate,
    check_dtype,
    chunk_parts,
    full_rows,
    read_rows_direct,
    read_tiles_direct,
    split_rows_key,
    tiled_key,
)
from ._checksums import (
    CHUNK_CHECKSUM_BYTES,
    ChunkVerifier,
    fletcher32,
    hdf5_function,
    read_verified,
    trailer,
)
from ._safety import check_encodable

#: File length kept beyond HDF5's allocated space before each flush (see _cover_allocated):
#: more than the metadata one flush allocates.
FLUSH_HEADROOM = 1 << 20
#: File space a flush must find allocated beyond the chunks it writes while the writer holds
#: its space reserve (more than the metadata HDF5 writes when it flushes this format's files).
FLUSH_MARGIN = 256 << 10
#: The least space reserve (see SpaceReserve) an HDF5 trace is started with: room to close it
#: whatever its layout could not write.
MIN_RESERVE = 64 << 10
#: Bytes reserved in the metadata attribute beyond its first value, for what finalizing adds,
#: when the writer does not say how large the metadata can grow.
META_HEADROOM = 16384
#: File space page. A SIGKILL can stop a write of several pages at a page boundary (the kernel
#: copies a buffered write page by page and gives up when a fatal signal is pending), leaving
#: a checksummed HDF5 metadata block half old, half new, and the file unreadable. Files are
#: therefore created with HDF5's paged aggregation: no metadata block below a page straddles
#: one, so every in-place update of one (chunk index nodes, object headers) is all or nothing.
PAGE_BYTES = HDF5_PAGE_BYTES
#: Capacity of the metadata attribute when everything finalizing writes fits in it: its
#: object-header chunk (the string plus about 60 bytes of message headers and checksum) then
#: stays within one page, so the final, in-place metadata update cannot be torn.
ONE_PAGE_META_BYTES = PAGE_BYTES - 256
# HDF5 filter ids every HDF5 build has: deflate, shuffle, fletcher32.
ALLOWED_FILTERS = frozenset({1, 2, 3})
FLETCHER32 = 3
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


#: Metadata read attempts of SWMR readers. HDF5 retries a metadata block whose checksum fails
#: (a torn read of a block the writer is updating) with a doubling back-off from 1 ns; with its
#: default of 100 attempts, one damaged block in a file opened as an SWMR reader stalls for
#: hours. 24 attempts still wait up to about 17 ms for a writer to finish a block.
SWMR_READ_ATTEMPTS = 24


@functools.cache
def _read_attempts_setter() -> Any:
    """``H5Pset_metadata_read_attempts`` of the HDF5 library h5py uses (not wrapped by h5py),
    or None where that library cannot be found among the loaded ones (then HDF5's default)."""
    setter = hdf5_function("H5Pset_metadata_read_attempts")
    if setter is not None:
        setter.argtypes = [ctypes.c_int64, ctypes.c_uint]
        setter.restype = ctypes.c_int
    return setter


@functools.cache
def _helper_pool() -> ThreadPoolExecutor:
    """One thread that prepares whole chunks (join + Fletcher-32) ahead of HDF5's writes."""
    return ThreadPoolExecutor(1, thread_name_prefix="tracekit-fletcher32")


@functools.cache
def _unchecked_dxpl() -> Any:
    """A transfer property list with HDF5's checksum check off (``H5Pset_edc_check``, which
    h5py does not wrap), for chunks past the committed rows of a trace still being recorded,
    whose Fletcher-32 may be stale; None where the function cannot be found."""
    setter = hdf5_function("H5Pset_edc_check")
    if setter is None:
        return None
    setter.argtypes = [ctypes.c_int64, ctypes.c_int]
    setter.restype = ctypes.c_int
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    return dxpl if setter(dxpl.id, 0) >= 0 else None  # 0: H5Z_DISABLE_EDC


def _hdf5_function(name: str, *argtypes: Any) -> Any:
    """A function of the HDF5 library h5py uses that h5py does not wrap, returning an int
    status, or None where that library cannot be found among the loaded ones."""
    function = hdf5_function(name)
    if function is not None:
        function.argtypes = list(argtypes)
        function.restype = ctypes.c_int
    return function


def _read_attempts_setter() -> Any:
    """``H5Pset_metadata_read_attempts`` (None: HDF5's default applies)."""
    import ctypes

    return _hdf5_function("H5Pset_metadata_read_attempts", ctypes.c_int64, ctypes.c_uint)


def _open_swmr_reader(path: Path) -> h5py.File:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    setter = _read_attempts_setter()
    if setter is not None:
        setter(fapl.id, SWMR_READ_ATTEMPTS)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                        fapl=fapl)
    return h5py.File(fid)


def _superblock_end(path: Path) -> int | None:
    """Where the file ends by its superblock (v2+: base address + end-of-file address); None
    for superblocks v0/v1 (no SWMR) or an unreadable one, which HDF5 itself will judge."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if len(head) < 12 or head[8] < 2 or head[9] not in (2, 4, 8):
        return None
    size = head[9]  # base address, extension address, end-of-file address follow the flags
    if len(head) < 12 + 3 * size:
        raise CorruptTraceError(f"{path}: truncated HDF5 superblock")
    base = int.from_bytes(head[12:12 + size], "little")
    eof = int.from_bytes(head[12 + 2 * size:12 + 3 * size], "little")
    return base + eof


def _check_not_truncated(path: Path) -> None:
    """Raise CorruptTraceError when the file is shorter than its superblock (v2+) says."""
    end = _superblock_end(path)
    actual = path.stat().st_size
    if end is not None and actual < end:
        raise CorruptTraceError(
            f"{path}: truncated HDF5 file ({actual} bytes, its superblock says {end})")


class HDF5Array(StoredArray):
    def __init__(self, name: str, ds: h5py.Dataset, dims: tuple[str, ...],
                 fd: int | None = None, writable: bool = False, raw: bool = False,
                 checksum: bool = False, cached: list[int] | None = None,
                 tiled_fd: int | None = None) -> None:
        self.name = name
        # Bytes written into HDF5's chunk cache since the last flush, shared by a writer's
        # arrays: the file space its next flush may need for them (see _cover_allocated).
        self._cached = cached if cached is not None else [0]
        self._ds = ds
        self.dims = dims
        self._fd = fd  # set when rows can be read with plain file reads
        self._tiled_fd = tiled_fd  # set when position x key tiles can be read that way
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
        return self._fd, info.byte_offset, info.size

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
                    tiles[(info.chunk_offset[0] // rows, info.chunk_offset[-1] // keys)] = (
                        info.byte_offset, info.size)

            self._ds.id.chunk_iter(add)
            self._tiles = tiles
        where = self._tiles.get((ci, kj))
        return None if where is None else (self._tiled_fd, *where)

    def __getitem__(self, key: tuple) -> np.ndarray:
        tiled = tiled_key(key, self.shape) if self._tiled_fd is not None else None
        if tiled is not None:
            r0, r1, k0, k1, finish = tiled
            try:
                out = read_tiles_direct(self.name, self._locate_tile, (r0, r1), (k0, k1),
                                        self._chunks, self._dtype)
            except (*_H5_ERRORS, OSError) as exc:
                raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc
            return out[finish]
        split = split_rows_key(key, self.shape) if self._fd is not None else None
        if split is not None:
            start, stop, rest, drop = split
            try:
                rows = read_rows_direct(self.name, self._locate, start, stop, self._chunks[0],
                                        self.shape[1:], self._dtype, self._verifier)
            except _H5_ERRORS as exc:
                raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc
            return rows[0][rest] if drop else rows[(slice(None), *rest)]
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


class HDF5Backend(Backend):
    format_name = "hdf5"

    def __init__(self, path: Path, f: h5py.File, final_path: Path | None = None,
                 read_only: bool = False) -> None:
        self.path = path
        self._f = f
        self._final_path = final_path
        self._read_only = read_only
        self._ahead_fd: int | None = None  # writers: extends the file ahead of HDF5's flushes
        self._can_allocate = True
        self._cached = [0]  # bytes in HDF5's chunk caches, not flushed yet
        # Readers also get a plain descriptor for direct row reads of uncompressed chunks.
        self._fd = os.open(path, os.O_RDONLY) if read_only else None

    @classmethod
    def create(cls, path: Path) -> HDF5Backend:
        if path.exists():
            raise TraceExistsError(f"{path} already exists")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        reserve = SpaceReserve(path.parent)
        if 0 < reserve.nbytes < MIN_RESERVE:
            # Closing an HDF5 file it could not flush crashes the interpreter at exit: without
            # the room to close even a failed layout, do not start.
            reserve.release()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        try:
            f = h5py.File(tmp, "w", libver="latest", fs_strategy="page",
                          fs_page_size=PAGE_BYTES, fs_persist=False)
        except BaseException:
            reserve.release()
            tmp.unlink(missing_ok=True)  # HDF5 leaves the file it could not write
            raise
        backend = cls(tmp, f, final_path=path)
        backend._reserve = reserve
        # From here on every flush gets its file space first (see _cover_allocated), the
        # layout's included: the descriptor follows the file when it is renamed.
        backend._ahead_fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:  # the layout's own writes, into allocated space
            allocate(backend._ahead_fd, 0, FLUSH_HEADROOM)
        except OSError:
            backend.discard()
            raise
        return backend

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> HDF5Backend:
        try:
            if writable:
                f = h5py.File(path, "r+")
            else:
                try:
                    f = h5py.File(path, "r")
                except _H5_ERRORS:
                    # Still flagged open for (SWMR) writing: a recording in progress, or one
                    # whose writer was killed. Only an SWMR reader opens it, and SWMR readers
                    # skip HDF5's truncation check; reading a truncated file that way can loop
                    # forever inside HDF5, so check the length against the superblock first.
                    _check_not_truncated(path)
                    f = _open_swmr_reader(path)
        except _H5_ERRORS as exc:
            raise CorruptTraceError(f"{path}: HDF5 file cannot be opened ({exc})") from exc
        try:
            has_meta = ROOT_KEY in f.attrs
        except _H5_ERRORS as exc:
            f.close()
            raise CorruptTraceError(f"{path}: HDF5 root attributes unreadable ({exc})") from exc
        if not has_meta:
            f.close()
            raise NotATraceError(f"{path}: HDF5 file without '{ROOT_KEY}' metadata")
        return cls(path, f, read_only=not writable)

    # -- metadata ---------------------------------------------------------------------------
    def read_root_meta(self) -> dict[str, Any]:
        try:
            attr_id = self._f.attrs.get_id(ROOT_KEY)
            atype = attr_id.get_type()
            if isinstance(atype, h5py.h5t.TypeStringID) and atype.is_variable_str():
                # A variable-length string's storage size is that of its heap pointer, so its
                # real size cannot be checked before reading it: only fixed-length is allowed.
                raise MetadataError(f"{self.path}: metadata is a variable-length string; "
                                    f"the format stores it as a fixed-length UTF-8 string")
            if attr_id.get_storage_size() > MAX_METADATA_BYTES:
                raise MetadataError(f"{self.path}: metadata larger than {MAX_METADATA_BYTES} B")
            raw = self._f.attrs[ROOT_KEY]
        except KeyError as exc:
            raise NotATraceError(f"{self.path}: no '{ROOT_KEY}' metadata") from exc
        except _H5_ERRORS as exc:
            raise MetadataError(f"{self.path}: metadata unreadable ({exc})") from exc
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        if not isinstance(raw, str):
            raise MetadataError(f"{self.path}: metadata attribute is not a JSON string")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise MetadataError(f"{self.path}: metadata is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise MetadataError(f"{self.path}: metadata is not a JSON object")
        check_encodable(meta, raw.encode("utf-8", "replace"), str(self.path))
        return meta

    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        # A fixed-length string, so that readers can check its size before reading it, with
        # room for the final metadata, which then overwrites it in place while still in SWMR
        # mode (leaving SWMR to rewrite it would make a killed writer's file unopenable).
        text = json.dumps(meta, sort_keys=True).encode("utf-8")
        if ROOT_KEY in self._f.attrs:
            attr = self._f.attrs.get_id(ROOT_KEY)
            atype = attr.get_type()
            if (isinstance(atype, h5py.h5t.TypeStringID) and not atype.is_variable_str()
                    and attr.shape == () and len(text) <= atype.get_size()):
                attr.write(np.array(text, dtype=h5py.string_dtype("utf-8", atype.get_size())))
                return
            if self._f.swmr_mode:  # does not fit: only a non-SWMR handle may recreate it
                self._cover_allocated()
                self._f.flush()
                self._cover_allocated()
                self._f.close()
                self._f = h5py.File(self.path, "r+")
        need = max(len(text), capacity or 0, 1)
        if need <= ONE_PAGE_META_BYTES:
            size = ONE_PAGE_META_BYTES
        elif capacity is not None:
            # Larger than a page: a SIGKILL landing inside the final update could tear it
            # (microseconds at close); the spec says so.
            size = need
        else:
            size = max(need, min(MAX_METADATA_BYTES, need + META_HEADROOM))
        self._f.attrs.create(ROOT_KEY, text, dtype=h5py.string_dtype("utf-8", size))

    # -- arrays -----------------------------------------------------------------------------
    def create_array(self, name, shape, dtype, chunks, dims, attrs, compression,
                     write_empty_chunks=True, coordinate=False) -> StoredArray:
        kwargs: dict[str, Any] = {}
        if compression in ("gzip", "zstd"):  # zstd is not built into HDF5: use deflate
            kwargs.update(compression="gzip", compression_opts=1, shuffle=True)
        elif compression == "packed":  # written once, read whole: compress harder
            kwargs.update(compression="gzip", compression_opts=6, shuffle=True)
        ds = self._f.create_dataset(
            name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=0,
            maxshape=tuple(None for _ in shape), fletcher32=True, **kwargs,
        )
        for key, value in attrs.items():
            ds.attrs[key] = value
        if coordinate:
            ds.make_scale(dims[0])
        else:
            for axis, dim in enumerate(dims):
                ds.dims[axis].label = dim
                if dim in self._f:
                    ds.dims[axis].attach_scale(self._f[dim])
        return HDF5Array(name, ds, tuple(dims), writable=True, checksum=True,
                         cached=self._cached)

    def array_names(self) -> list[str]:
        return sorted(k for k, v in self._f.items() if isinstance(v, h5py.Dataset))

    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        try:
            link = self._f.get(name, getlink=True)
            if link is not None and not isinstance(link, h5py.HardLink):
                # Soft and external links could point anywhere, even into other files.
                raise DisallowedCodecError(f"array {name!r} is a {type(link).__name__}, "
                                           f"not a dataset stored in the trace")
            ds = self._f[name]
        except KeyError as exc:
            raise MissingArrayError(f"array {name!r} is missing") from exc
        except _H5_ERRORS as exc:
            raise CorruptTraceError(f"array {name!r}: cannot open ({exc})") from exc
        if not isinstance(ds, h5py.Dataset):
            raise CorruptTraceError(f"{name!r} is not a dataset")
        try:
            dcpl = ds.id.get_create_plist()
            filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
            foreign = dcpl.get_external_count() > 0 or dcpl.get_layout() == h5py.h5d.VIRTUAL
            dtype = ds.dtype
        except _H5_ERRORS as exc:
            raise CorruptTraceError(f"array {name!r}: unreadable header ({exc})") from exc
        if foreign:  # raw data in other files: reading it could leak any file on this machine
            raise DisallowedCodecError(f"array {name!r} keeps its data outside the trace "
                                       f"(external or virtual storage)")
        bad = [f for f in filters if f not in ALLOWED_FILTERS]
        if bad:
            raise DisallowedCodecError(f"array {name!r} uses disallowed HDF5 filter id(s) {bad}")
        check_dtype(name, dtype)
        if dims is not None and len(dims) != len(ds.shape):
            raise CorruptTraceError(f"array {name!r} has {len(ds.shape)} dimensions, "
                                    f"expected {len(dims)}")
        try:
            if ds.is_scale:
                dims = (name,)
            elif dims is None:  # trusted files only (the writer's own): see Backend.get_array
                dims = tuple(d.label for d in ds.dims)
        except _H5_ERRORS as exc:
            raise CorruptTraceError(f"array {name!r}: unreadable dimension labels ({exc})") from exc
        checksum = bool(filters) and filters[-1] == FLETCHER32
        raw = (filters in ([], [FLETCHER32]) and ds.chunks is not None
               and ds.chunks[1:] == ds.shape[1:] and dtype.byteorder in ("<", "=", "|"))
        # Chunked along the last axis too (attention's position x key tiles), unfiltered (1.0
        # traces): read tile by tile from the file. Checksummed tiles (1.1) are read through
        # HDF5, which checks their Fletcher-32.
        tiled = (not filters and ds.chunks is not None and dtype.byteorder in ("<", "=", "|")
                 and ds.chunks[1:] != ds.shape[1:] and len(ds.shape) >= 2
                 and ds.chunks[1:-1] == ds.shape[1:-1])
        return HDF5Array(name, ds, dims, fd=self._fd if raw else None,
                         writable=not self._read_only, raw=raw, checksum=checksum,
                         cached=self._cached, tiled_fd=self._fd if tiled else None)

    # -- lifecycle --------------------------------------------------------------------------
    def begin_streaming(self) -> None:
        self._cover_allocated()
        self._f.flush()
        self._f.swmr_mode = True
        self._f.flush()
        if self._final_path is not None:
            if self._final_path.exists():
                raise TraceExistsError(f"{self._final_path} appeared while it was created")
            os.rename(self.path, self._final_path)  # type: ignore[arg-type]
            self.path = self._final_path
            self._final_path = None

    def end_streaming(self) -> None:
        """Stay in SWMR mode: the final metadata is written in place (see write_root_meta),
        so there is no instant at which the file is open without SWMR's ordered writes."""
        self._cover_allocated()
        self._f.flush()

    def flush(self) -> None:
        self._cover_allocated()
        self._f.flush()
        self._cached[0] = 0

    def allocated_bytes(self) -> int | None:
        return int(self._f.id.get_filesize())

    def _cover_allocated(self) -> None:
        """Make the file longer than the space HDF5 has allocated, by ``FLUSH_HEADROOM``,
        before HDF5 writes a superblock that says how long it is.

        An HDF5 flush (and close) allocates file space for metadata, writes the superblock
        with the new end-of-file address, and only then extends (or truncates) the file to
        that address. A SIGKILL between the two left a file shorter than its superblock says,
        which HDF5 refuses to open (trial 106 of 200 random kills in one run). With the file
        already longer, the superblock never points past its end; HDF5 truncates the extra
        away, or closing the writer does.

        Nothing more is allocated ahead: HDF5's flushes truncate the file back to its allocated
        end, so keeping 64 MiB allocated ahead re-allocated it at every commit, and writing a
        2 GB trace took 2.23 s with it against 1.55 s without (plain append: 0.97 s).

        The extension also covers the chunks HDF5 holds in its cache, and is allocated: a
        flush that ran out of space part way would leave HDF5's own state inconsistent (its
        chunk index then misses records, and closing the file fails, then crashes the
        interpreter at exit). So while the writer holds its space reserve, a disk without room
        for the flush raises ENOSPC here, before HDF5 writes anything; the writer then trims
        what it could not commit and, the reserve given back, flushes what is left."""
        fd = self._ahead_fd
        if fd is None:
            return
        need = self._f.id.get_filesize() + self._cached[0]
        want = need + FLUSH_HEADROOM
        size = os.fstat(fd).st_size
        if size >= want:
            return
        try:
            if self._can_allocate and allocate(fd, size, want - size):
                return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if self._reserve is not None and size < need + FLUSH_MARGIN:
                allocate(fd, size, need + FLUSH_MARGIN - size)  # ENOSPC: no room to flush
        # The length alone (the file system cannot allocate, or not all of it): what the
        # superblock's guarantee needs.
        os.ftruncate(fd, want)

    def refresh(self) -> None:
        """SWMR readers: every dataset's extent, and the root group's header, whose metadata
        attribute the writer rewrites when it finishes (``H5Orefresh``, which h5py does not
        wrap; without it a reader keeps the header it first read, status ``recording``)."""
        if not self._f.swmr_mode:
            return
        for ds in self._f.values():
            if isinstance(ds, h5py.Dataset):
                ds.refresh()
        import ctypes

        refresh_object = _hdf5_function("H5Orefresh", ctypes.c_int64)
        if refresh_object is not None:
            root = h5py.h5g.open(self._f.id, b"/")
            try:
                refresh_object(root.id)
            finally:
                root.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # Closing flushes what HDF5 still holds: give it the space held for that. (A close
        # that fails leaves HDF5 half closed, and the next attempt, at the latest when the
        # interpreter exits, crashes inside HDF5.)
        self.release_reserve()
        with contextlib.suppress(_H5_ERRORS, OSError):
            self._cover_allocated()
        with contextlib.suppress(_H5_ERRORS):
            self._f.close()
        if self._ahead_fd is not None:  # cut the space allocated ahead and not used
            try:
                end = _superblock_end(self.path)  # type: ignore[arg-type]
                if end is not None and os.fstat(self._ahead_fd).st_size > end:
                    os.ftruncate(self._ahead_fd, end)
            finally:
                os.close(self._ahead_fd)
                self._ahead_fd = None

    def discard(self) -> None:
        """Remove a trace that never got past creation.

        Closing flushes what HDF5 holds; on a disk without room for it the close fails, and
        HDF5 crashes the interpreter when it retries at exit. The file is going anyway, so
        HDF5 closes a copy of it in memory: its descriptor is pointed at one."""
        if self._final_path is not None and self.path is not None:
            try:
                with contextlib.suppress(OSError, AttributeError, *_H5_ERRORS):
                    fd = self._f.id.get_vfd_handle()
                    size = os.fstat(fd).st_size
                    copy = os.memfd_create("tracekit-discarded", os.MFD_CLOEXEC)
                    try:
                        done = 0
                        while done < size:
                            sent = os.copy_file_range(fd, copy, size - done, done, done)
                            if not sent:
                                break
                            done += sent
                        if done == size:
                            os.dup2(copy, fd)
                    finally:
                        os.close(copy)
                self.close()
            finally:
                self.path.unlink(missing_ok=True)
