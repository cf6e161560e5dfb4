"""zarr v3 directory backend (the default).

Layout: a zarr v3 group whose ``attributes.tracekit`` holds the metadata, one array per logical
array at the root, ``dimension_names`` on each. Every ``zarr.json`` is read and checked against
the codec allowlist by this module before zarr-python is allowed to open it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import (
    CorruptTraceError,
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
    NotATraceError,
    TraceExistsError,
)
from ..format import ROOT_KEY
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
from ._checksums import CHUNK_CHECKSUM_BYTES, ChunkVerifier, RunningCrc, read_verified
from ._safety import LinkError, check_encodable, open_beneath, open_dir, read_capped
from ._zarr_checks import SafeLocalStore, check_array_metadata
from ._zarr_checksums import (
    CHECKED_CRC32C,
    UNCHECKED_CRC32C,
    has_crc32c,
    verify_chunk_files,
)

#: New chunk files at least this large get their blocks allocated at once (see ``allocate``).
_ALLOCATE_FROM = 1 << 20

ALLOWED_CODECS = frozenset(
    {"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose", "sharding_indexed"}
)


def _read_json(root: Path, rel: str, what: str) -> dict[str, Any]:
    """The JSON object in file ``rel`` of the trace folder ``root``: read without following
    links, from a regular file only, at most MAX_METADATA_BYTES (see ``_safety``)."""
    raw = read_capped(root, rel, MAX_METADATA_BYTES, what)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise MetadataError(f"{what}: {rel} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise MetadataError(f"{what}: {rel} is not a JSON object")
    check_encodable(obj, raw, what)
    return obj


def _check_codecs(name: str, codecs: Any) -> None:
    if not isinstance(codecs, list):
        raise CorruptTraceError(f"array {name!r}: codecs must be a list")
    for codec in codecs:
        cname = codec.get("name") if isinstance(codec, dict) else codec
        if cname not in ALLOWED_CODECS:
            raise DisallowedCodecError(f"array {name!r} uses disallowed codec {cname!r}")
        if cname == "sharding_indexed":
            conf = codec.get("configuration", {})
            _check_codecs(name, conf.get("codecs", []))
            _check_codecs(name, conf.get("index_codecs", []))


# -- decompression bombs --------------------------------------------------------------------
# zarr's compressors inflate a chunk to whatever size its bytes say: a 1 MB gzip chunk became a
# 1 GiB allocation. These read-side variants refuse a chunk that decodes to more bytes than
# the chunk holds, before allocating that much (gzip: bounded inflate; zstd and blosc: their
# headers' sizes are checked against an output buffer of the chunk's size).
def _chunk_nbytes(chunk_spec: Any) -> int:
    return math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize


class _BoundedGzipCodec(zarr.codecs.GzipCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        import zlib

        limit = _chunk_nbytes(chunk_spec)
        inflater = zlib.decompressobj(wbits=31)
        out = inflater.decompress(chunk_bytes.as_numpy_array().tobytes(), limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise ValueError(f"gzip chunk inflates beyond the chunk's {limit} bytes")
        return chunk_spec.prototype.buffer.from_bytes(out)


def _decode_into_chunk(codec: Any, chunk_bytes: Any, chunk_spec: Any) -> Any:
    """numcodecs zstd/blosc check the size in the frame header against ``out`` first."""
    out = np.empty(_chunk_nbytes(chunk_spec), dtype=np.uint8)
    codec.decode(chunk_bytes.as_numpy_array(), out=out)
    return chunk_spec.prototype.buffer.from_bytes(out)


class _BoundedZstdCodec(zarr.codecs.ZstdCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return _decode_into_chunk(self._zstd_codec, chunk_bytes, chunk_spec)


class _BoundedBloscCodec(zarr.codecs.BloscCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return _decode_into_chunk(self._blosc_codec, chunk_bytes, chunk_spec)


for _key, _cls in (("gzip", _BoundedGzipCodec), ("zstd", _BoundedZstdCodec),
                   ("blosc", _BoundedBloscCodec)):
    zarr.registry.register_codec(_key, _cls)
#: Used only while tracekit opens an array; zarr's defaults stay as they are elsewhere.
_BOUNDED_CODECS = {f"codecs.{key}": f"{cls.__module__}.{cls.__qualname__}" for key, cls in (
    ("gzip", _BoundedGzipCodec), ("zstd", _BoundedZstdCodec), ("blosc", _BoundedBloscCodec))}


_UNCHECKED_CODECS = {**_BOUNDED_CODECS, **UNCHECKED_CRC32C}
_CHECKED_CODECS = {**_BOUNDED_CODECS, **CHECKED_CRC32C}


def _raw_writable(meta: dict[str, Any]) -> bool:
    """True when chunks are raw little-endian C-order bytes (then their crc32c, if any) whole
    along every axis but the first and the last (attention's key axis is chunked too):
    tracekit writes rows of such arrays into the chunk files itself."""
    codecs = meta.get("codecs")
    if isinstance(codecs, list) and has_crc32c(meta):
        codecs = codecs[:-1]
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)):
        return False
    codec = codecs[0]
    endian = (codec.get("configuration") or {}).get("endian", "little")
    grid = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    enc = meta.get("chunk_key_encoding") or {}
    shape = meta.get("shape")
    return (codec.get("name") == "bytes" and endian == "little" and meta.get("fill_value") == 0
            and isinstance(grid, list) and isinstance(shape, list) and len(grid) == len(shape)
            and len(shape) >= 1 and grid[1:-1] == shape[1:-1] and all(g >= 1 for g in grid)
            and enc.get("name") == "default" and _separator(meta) in ("/", "."))


def _separator(meta: dict[str, Any]) -> str:
    """The separator of the array's ``default`` chunk key encoding (zarr's default is "/")."""
    enc = meta.get("chunk_key_encoding") or {}
    return (enc.get("configuration") or {}).get("separator", "/")


def chunk_key(meta: dict[str, Any], index: Sequence[int]) -> str:
    """The store key of chunk ``index`` under the array's folder: ``c/0/1`` or ``c.0.1``."""
    return _separator(meta).join(["c", *map(str, index)])


def _direct_readable(meta: dict[str, Any]) -> bool:
    """True when chunks are raw little-endian C-order bytes holding whole rows, so rows can be
    read with plain file reads (the layout tracekit writes for uncompressed arrays)."""
    if not _raw_writable(meta):
        return False
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return grid[1:] == meta["shape"][1:]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a metadata document atomically (temporary file, then rename), as zarr does."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(obj))  # no indent: json's C encoder runs only without one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write leaves no stray temporary file
        raise


def array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                   dims: tuple[str, ...], attrs: dict[str, Any],
                   compression: str | None, separator: str = ".",
                   checksum: bool = True) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of a regular-grid array with fill value 0, the document
    zarr-python writes for the same array (tests check that zarr and xarray open it).
    ``checksum``: end every chunk with its CRC-32C (the ``crc32c`` codec, format 1.1).

    Chunk keys use ``separator``: "." keeps an array's chunks as files of its one folder;
    with zarr's default "/" every new chunk along positions needs new directories, which
    cost more than writing the chunk."""
    dtype = np.dtype(dtype)
    codecs: list[dict[str, Any]] = [
        {"name": "bytes"} if dtype.itemsize == 1 else
        {"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    elif compression == "gzip":
        codecs.append({"name": "gzip", "configuration": {"level": 1}})
    elif compression == "packed":  # written once, read whole: byte shuffle + zstd
        codecs.append({"name": "blosc", "configuration": {
            "typesize": dtype.itemsize, "cname": "zstd", "clevel": 5,
            "shuffle": "shuffle" if dtype.itemsize > 1 else "noshuffle", "blocksize": 0}})
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}")
    if checksum:
        codecs.append({"name": "crc32c"})
    fill: Any = False if dtype.kind == "b" else (0.0 if dtype.kind == "f" else 0)
    return {
        "shape": [int(n) for n in shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [int(c) for c in chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": dict(attrs),
        "dimension_names": list(dims),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _remove_chunks_outside(folder: Path, meta: dict[str, Any], old: list[int],
                           new: list[int]) -> None:
    """Delete the chunk files wholly outside a smaller chunk grid (as zarr's resize does);
    ``old`` and ``new`` count chunks per axis. With "/" keys only axes that shrank are walked."""
    last = max((i for i, (a, b) in enumerate(zip(old, new, strict=True)) if b < a), default=-1)
    if last < 0:
        return
    if _separator(meta) == ".":
        for entry in os.scandir(folder):
            parts = entry.name.split(".")
            if parts[0] != "c" or len(parts) != len(new) + 1:
                continue
            try:
                index = [int(x) for x in parts[1:]]
            except ValueError:
                continue
            if any(i >= n for i, n in zip(index, new, strict=True)):
                os.unlink(entry.path)
        return

    def walk(path: str, depth: int) -> None:
        for entry in os.scandir(path):
            try:
                index = int(entry.name)
            except ValueError:
                continue
            if index >= new[depth]:
                shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
            elif depth < last and entry.is_dir():
                walk(entry.path, depth + 1)

    if (folder / "c").is_dir():
        walk(str(folder / "c"), 0)


def _group_document(meta: dict[str, Any],
                    arrays: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The root group's zarr.json: tracekit's metadata as its one attribute and, once sealed,
    every array's metadata consolidated inline."""
    consolidated = None if arrays is None else {
        "kind": "inline", "must_understand": False, "metadata": dict(sorted(arrays.items()))}
    return {"attributes": {ROOT_KEY: meta}, "zarr_format": 3,
            "consolidated_metadata": consolidated, "node_type": "group"}


class ZarrArray(StoredArray):
    """One array of a zarr v3 trace. Shape, chunks and attributes come from its checked
    ``zarr.json``; zarr-python opens the array only for what tracekit does not do itself
    (compressed chunks, partial rows), so opening and laying out a trace stay cheap."""

    def __init__(self, name: str, folder: Path, meta: dict[str, Any], store: Any,
                 writable: bool) -> None:
        self.name = name
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
        self._dir_fd: int | None = None  # the folder's descriptor, for direct reads

    def relocate(self, folder: Path, store: Any) -> None:
        """The trace was moved (from its temporary name to its final one)."""
        self._folder = folder
        self._store = store
        self._zarr = None
        self._made_dirs = set()
        self._dir_fd = None  # the old one is closed when this array is collected

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

    def _locate(self, ci: int, last: int = 0):
        # Relative to the array's folder, without following links, regular files only.
        if self._dir_fd is None:
            self._dir_fd = open_dir(self._folder)
            weakref.finalize(self, os.close, self._dir_fd)
        try:
            fd = open_beneath(self._dir_fd, chunk_key(self._meta, self._chunk_index(ci, last)))
        except FileNotFoundError:
            return None
        except LinkError as exc:
            raise CorruptTraceError(f"array {self.name!r}: chunk {exc}") from exc
        self._open_fds.append(fd)
        return fd, 0, os.fstat(fd).st_size

    def verify_below(self, rows: int | None) -> None:
        self._verifier.bound = rows

    def verify_chunks(self, rows: int | None = None) -> list[str]:
        if not self.checksum:
            return []
        counts = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True)]
        if rows is not None and counts:
            counts[0] = min(counts[0], rows // self.chunks[0])
        keys = (chunk_key(self._meta, idx) for idx in itertools.product(*map(range, counts)))
        return verify_chunk_files(self.name, self._folder, keys,
                                  self._verifier.chunk_bytes)

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
        if self._raw_rows and not self._direct_rows:
            tiled = tiled_key(key, self.shape)
            if tiled is not None:
                return self._read_tiles(*tiled)
        split = split_rows_key(key, self.shape) if self._direct_rows else None
        if split is not None:
            start, stop, rest, drop = split
            self._open_fds: list[int] = []
            try:
                rows = read_rows_direct(self.name, self._locate, start, stop, self.chunks[0],
                                        self.shape[1:], self.dtype, self._verifier)
            except OSError as exc:
                raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc
            finally:
                for fd in self._open_fds:
                    os.close(fd)
            return rows[0][rest] if drop else rows[(slice(None), *rest)]
        return read_verified(self, key, self._verifier, lambda k: self._read_with(self._arr, k),
                             self._read_unchecked)

    def _read_tiles(self, r0: int, r1: int, k0: int, k1: int, finish: tuple) -> np.ndarray:
        """Rows and keys of an array chunked along both (attention), read from the tiles'
        files directly: a step reads one row of each key tile, not whole tiles."""
        self._open_fds = []
        try:
            out = read_tiles_direct(self.name, self._locate, (r0, r1), (k0, k1), self.chunks,
                                    self.dtype.newbyteorder("<"), self._verifier)
        except OSError as exc:
            raise CorruptTraceError(f"array {self.name!r}: unreadable chunk ({exc})") from exc
        finally:
            for fd in self._open_fds:
                os.close(fd)
        return out[finish]

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
        missing = []
        for idx in itertools.product(*(range(n) for n in counts)):
            if expected is not None and not expected(idx):
                continue
            key = chunk_key(self._meta, idx)
            if not (self._folder / key).is_file():
                missing.append(key)
        return missing


class ZarrBackend(Backend):
    format_name = "zarr"
    #: Chunk key separator of the arrays this backend creates (readers follow each array's).
    chunk_separator = "."

    def __init__(self, path: Path, store: zarr.storage.LocalStore,
                 final_path: Path | None = None) -> None:
        self.path = path
        self._store = store
        self._final_path = final_path  # set while writing under a temporary name
        # Arrays this backend created: handed out again by get_array instead of re-reading
        # and re-checking the zarr.json it has just written (the writer opens every array
        # once laid out), and moved along with the trace to its final name.
        self._created: dict[str, ZarrArray] = {}

    @classmethod
    def create(cls, path: Path) -> ZarrBackend:
        if path.exists():
            raise TraceExistsError(f"{path} already exists")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        # The folder only: the group's zarr.json is write_root_meta's (zarr-python's
        # open_group would write one first, and its event loop costs milliseconds).
        tmp.mkdir(parents=True)
        backend = cls(tmp, zarr.storage.LocalStore(str(tmp)), final_path=path)
        backend._reserve = SpaceReserve(path.parent)
        return backend

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> ZarrBackend:
        root = _read_json(path, "zarr.json", str(path))
        if root.get("zarr_format") != 3 or root.get("node_type") != "group":
            raise NotATraceError(f"{path}: not a zarr v3 group")
        attrs = root.get("attributes")
        if not isinstance(attrs, dict) or ROOT_KEY not in attrs:
            raise NotATraceError(f"{path}: zarr group without '{ROOT_KEY}' metadata")
        store = SafeLocalStore(str(path), read_only=not writable)
        try:
            # Not the consolidated copy: every array's own zarr.json is checked against the
            # allowlist before it is opened, and zarr must not parse unchecked array metadata.
            group = zarr.open_group(store=store, mode="r+" if writable else "r",
                                    use_consolidated=False)
        except Exception as exc:  # zarr raises many types for malformed groups
            raise NotATraceError(f"{path}: cannot open as zarr group ({exc})") from exc
        return cls(path, group.store)

    # -- metadata ---------------------------------------------------------------------------
    def read_root_meta(self) -> dict[str, Any]:
        try:
            root = _read_json(self.path, "zarr.json", str(self.path))  # type: ignore[arg-type]
        except MissingArrayError as exc:  # created, and no metadata written yet
            raise NotATraceError(f"{self.path}: no zarr.json") from exc
        attrs = root.get("attributes")
        meta = attrs.get(ROOT_KEY) if isinstance(attrs, dict) else None
        if not isinstance(meta, dict):
            raise NotATraceError(f"{self.path}: no '{ROOT_KEY}' metadata object")
        return meta

    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        _write_json(self.path / "zarr.json", _group_document(meta))  # type: ignore[operator]

    # -- arrays -----------------------------------------------------------------------------
    def create_array(self, name, shape, dtype, chunks, dims, attrs, compression,
                     write_empty_chunks=True, coordinate=False) -> StoredArray:
        # The array's zarr.json is written directly: zarr-python took ~3 ms per array here,
        # a tenth of a second for a trace, paid by every recording.
        meta = array_metadata(shape, dtype, chunks, dims, attrs, compression,
                              self.chunk_separator)
        folder = self.path / name  # type: ignore[operator]
        folder.mkdir()
        _write_json(folder / "zarr.json", meta)
        arr = ZarrArray(name, folder, meta, self._store, writable=True)
        self._created[name] = arr
        return arr

    def array_names(self) -> list[str]:
        names = []
        for entry in sorted(os.listdir(self.path)):
            if (self.path / entry / "zarr.json").is_file():  # type: ignore[operator]
                names.append(entry)
        return names

    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        if name in self._created:
            return self._created[name]
        meta = _read_json(self.path, f"{name}/zarr.json", f"array {name!r}")  # type: ignore[arg-type]
        if meta.get("node_type") != "array":
            raise CorruptTraceError(f"{name!r} is not an array")
        check_array_metadata(name, meta)
        _check_codecs(name, meta.get("codecs"))
        dims = meta.get("dimension_names")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CorruptTraceError(f"array {name!r}: malformed shape {shape!r}")
        if not isinstance(dims, list) or len(dims) != len(shape):
            raise CorruptTraceError(f"array {name!r}: dimension_names missing or wrong length")
        try:
            check_dtype(name, np.dtype(meta.get("data_type")))
        except TypeError as exc:
            raise DisallowedCodecError(
                f"array {name!r} has disallowed data type {meta.get('data_type')!r}") from exc
        if meta.get("zarr_format") != 3 or not isinstance(meta.get("chunk_grid"), dict):
            raise CorruptTraceError(f"array {name!r}: not a zarr v3 array")
        grid = (meta["chunk_grid"].get("configuration") or {}).get("chunk_shape")
        if (meta["chunk_grid"].get("name") != "regular" or not isinstance(grid, list)
                or len(grid) != len(shape)
                or not all(isinstance(c, int) and c >= 1 for c in grid)):
            raise CorruptTraceError(f"array {name!r}: malformed chunk grid {grid!r}")
        return ZarrArray(name, self.path / name, meta, self._store,  # type: ignore[operator]
                         writable=not self._store.read_only)

    def metadata_problems(self) -> list[str]:
        """tracekit reads each array's own zarr.json; xarray and zarr read the consolidated
        copy in the group's. Where they differ, those tools would see another trace."""
        root = _read_json(self.path, "zarr.json", str(self.path))  # type: ignore[arg-type]
        consolidated = root.get("consolidated_metadata")
        if consolidated is None:
            return []
        inline = consolidated.get("metadata") if isinstance(consolidated, dict) else None
        if not isinstance(inline, dict):
            return ["consolidated metadata is malformed (no 'metadata' object)"]
        problems = []
        names = self.array_names()
        for name in names:
            own = _read_json(self.path, f"{name}/zarr.json", f"array {name!r}")  # type: ignore[arg-type]
            if name not in inline:
                problems.append(f"array {name!r} is missing from the consolidated metadata")
            elif not isinstance(inline[name], dict):
                problems.append(f"array {name!r}: consolidated metadata is not an object")
            elif inline[name] != own:
                keys = sorted(k for k in set(own) | set(inline[name])
                              if own.get(k) != inline[name].get(k))
                problems.append(f"array {name!r}: consolidated metadata disagrees with its "
                                f"zarr.json on {', '.join(keys)}")
        extra = sorted(set(inline) - set(names))
        if extra:
            problems.append(f"consolidated metadata lists array(s) not in the trace: "
                            f"{', '.join(extra)}")
        return problems

    # -- lifecycle --------------------------------------------------------------------------
    def begin_streaming(self) -> None:
        """Move the fully laid out trace to its final name, then keep writing there."""
        if self._final_path is None:
            return
        if self._final_path.exists():
            raise TraceExistsError(f"{self._final_path} appeared while the trace was created")
        os.rename(self.path, self._final_path)  # type: ignore[arg-type]
        self.path = self._final_path
        self._final_path = None
        self._store = zarr.storage.LocalStore(str(self.path))
        for name, arr in self._created.items():
            arr.relocate(self.path / name, self._store)

    def end_streaming(self) -> None:
        """Every chunk's checksum right before the trace is finalized (see repair_checksums)."""
        for arr in self._created.values():
            arr.repair_checksums()

    def seal(self) -> None:
        """Consolidate metadata (every array's zarr.json inlined in the group's, zarr-python's
        ``consolidated_metadata`` layout), so xarray/zarr open the finished trace in one read."""
        arrays = {}
        for name in self.array_names():
            made = self._created.get(name)  # its zarr.json is what this backend last wrote
            arrays[name] = made._meta if made is not None else _read_json(
                self.path, f"{name}/zarr.json", f"array {name!r}")  # type: ignore[arg-type]
        _write_json(self.path / "zarr.json",  # type: ignore[operator]
                    _group_document(self.read_root_meta(), arrays))

    def discard(self) -> None:
        """Remove a trace that never got past creation."""
        self.release_reserve()
        if self._final_path is not None and self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
