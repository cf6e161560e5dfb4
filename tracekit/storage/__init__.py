"""Storage backends: one small interface, one private module per on-disk format.

The writer and reader only talk to :class:`Backend` and :class:`StoredArray`. Each backend
checks what it opens against an allowlist (codecs, filters, dtypes, metadata size) before it
touches any data, so that a hostile file is refused rather than decoded.
"""

from __future__ import annotations

import errno
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptTraceError, NotATraceError, RemoteError, TraceError, WriterError
from ._source import Read

#: Stored (physical) dtypes any backend may hold. Everything else is refused on open.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "float32", "float64")
)
MAX_METADATA_BYTES = 1 << 20
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class StoredArray(ABC):
    """One stored n-d array. Indexing takes tuples of ints and step-1 slices, in bounds."""

    name: str
    dims: tuple[str, ...]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    @property
    @abstractmethod
    def chunks(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def attrs(self) -> dict[str, Any]: ...

    @abstractmethod
    def __getitem__(self, key: tuple) -> np.ndarray: ...

    @abstractmethod
    def __setitem__(self, key: tuple, value: np.ndarray) -> None: ...

    @abstractmethod
    def resize(self, shape: tuple[int, ...]) -> None: ...

    def write_rows(self, start: int, blocks: Sequence[np.ndarray]) -> None:
        """Write consecutive new rows from ``start``: ``blocks`` follow each other along the
        leading axis. Blocks may be narrower than the array along the last axis (attention
        rows hold the keys seen so far): the rest of those rows is left as it is, zero for
        rows never written. Backends override this to write the blocks without joining them
        first (the writer hands over one block per step)."""
        data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        key: tuple = (slice(start, start + len(data)),)
        if data.ndim >= 2 and data.shape[-1] != self.shape[-1]:
            key += (slice(None),) * (data.ndim - 2) + (slice(0, data.shape[-1]),)
        self[key] = data

    def missing_chunks(self, rows: int,
                       expected: Callable[[tuple[int, ...]], bool] | None = None) -> list[str]:
        """Chunks within the first ``rows`` of the leading axis that were never stored, among
        those ``expected(chunk_index)`` says must be (default: all; causal attention stores
        only the tiles on or below the diagonal)."""
        return []

    #: The checksum each stored chunk carries: 'crc32c' (zarr), 'fletcher32' (HDF5) or None.
    checksum: str | None = None

    def verify_below(self, rows: int | None) -> None:
        """Reads verify chunk checksums except where a chunk extends past ``rows`` of the
        first axis (None: verify every chunk). The reader passes the committed length of a
        trace still being recorded, whose last chunk may carry a stale checksum."""

    def verify_chunks(self, rows: int | None = None) -> list[str]:
        """Read every stored chunk and check its checksum (only those wholly within the first
        ``rows`` rows of the first axis when given); one line per chunk that fails."""
        return []


class Backend(ABC):
    """A trace container: root metadata plus named arrays with dimension names."""

    format_name: str = ""
    path: Path | None = None
    #: Set while a new trace is laid out under a temporary name: where it will be.
    _final_path: Path | None = None
    #: Disk space held for finishing the trace after a write fails (writers only).
    _reserve: SpaceReserve | None = None

    def release_reserve(self) -> None:
        """Give back the space held for finishing the trace (see :class:`SpaceReserve`): the
        writer calls it when a write fails, the backend when it closes."""
        if self._reserve is not None:
            self._reserve.release()
            self._reserve = None

    @property
    def destination(self) -> Path | None:
        """Where the trace is, or will be once laid out (never the temporary name): the
        path error messages name."""
        return self._final_path or self.path

    @abstractmethod
    def read_root_meta(self) -> dict[str, Any]:
        """The root metadata object; NotATraceError/MetadataError when absent or malformed."""

    @abstractmethod
    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        """Write the root metadata. ``capacity``: the most bytes (as compact sorted JSON) any
        later version of it will take, so that a backend that rewrites it in place can size
        it once (the writer passes it when it first writes the metadata)."""

    @abstractmethod
    def create_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype,
                     chunks: tuple[int, ...], dims: tuple[str, ...], attrs: dict[str, Any],
                     compression: str | None, write_empty_chunks: bool = True,
                     coordinate: bool = False) -> StoredArray:
        """A new zero-filled array. ``compression``: None, ``zstd`` or ``gzip`` (the plan's
        choice), or ``packed`` for small arrays written once and read whole (the vocabulary):
        the strongest standard codecs every reader has, with a byte shuffle."""

    @abstractmethod
    def array_names(self) -> list[str]: ...

    @abstractmethod
    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        """The array, after its codecs and dtype passed the allowlist.

        ``dims``: its dimension names, when the caller knows them (the format defines them
        for every array). HDF5 then does not read its dimension labels, which live in the
        global heap: that heap has no checksum, and HDF5 crashed or looped forever reading
        labels from a heap with one flipped bit."""

    def metadata_problems(self) -> list[str]:
        """Disagreements between copies of the metadata the container keeps (zarr's
        consolidated metadata against each array's own), one line each."""
        return []

    def begin_streaming(self) -> None:
        """Called once every object exists; from now on only array data changes."""

    def end_streaming(self) -> None:
        """Called before the final metadata update (after the last data write)."""

    def seal(self) -> None:
        """Called after the final metadata is written (e.g. to consolidate zarr metadata)."""

    def flush(self) -> None:
        """Make every write so far visible to readers (and durable across a crash)."""

    def allocated_bytes(self) -> int | None:
        """Bytes the container has allocated so far, where it can say without a scan (HDF5:
        its end of allocated space; None elsewhere)."""
        return None

    def close(self) -> None:
        self.release_reserve()

    def refresh(self) -> None:
        """Pick up data a concurrent writer committed since opening."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ZIP_MAGIC = b"PK\x03\x04"


def detect_format(path: str | os.PathLike[str]) -> str:
    """'zarr' or 'hdf5' (a pack is a zarr trace), from the bytes (not the name)."""
    fmt, source, _ = resolve(path)
    source.close()
    return fmt


def is_url(location: object) -> bool:
    """Whether ``location`` names a trace by URL (``s3://``, ``https://``...), not a path."""
    if not isinstance(location, str):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.replace("+", "").isalnum()


def open_source(location: str | os.PathLike[str], storage_options: dict | None = None,
                cache_dir: str | os.PathLike[str] | None = None,
                cache_bytes: int | None = None) -> Any:
    """The :class:`~tracekit.storage._source.Source` of a path or URL (remote ones through
    fsspec, with ``storage_options``, and an optional on-disk cache)."""
    from ._source import LocalDirSource, LocalFileSource

    if is_url(location):
        from ._remote import open_remote

        return open_remote(str(location), storage_options=storage_options,
                           cache_dir=None if cache_dir is None else str(cache_dir),
                           cache_bytes=cache_bytes)
    text = os.fspath(location)
    p = Path(text[len("file://"):] if text.startswith("file://") else text)
    if p.is_dir():
        return LocalDirSource(p)
    if p.is_file():
        return LocalFileSource(p)
    raise NotATraceError(f"{p}: no such file or directory")


def resolve(location: Any, **options: Any) -> tuple[str, Any, bytes | None]:
    """(format, source, root document) of a trace given by path, URL or Source: 'zarr' (a
    folder, or a pack, whose source is then the zip's entries) or 'hdf5', told by their
    bytes. A zarr trace's root ``zarr.json`` comes along: read once, it costs one request."""
    from ._source import Read, Source

    source = location if isinstance(location, Source) else open_source(location, **options)
    try:
        local = source.local_path
        if local is not None and local.is_dir() and not (local / "zarr.json").is_file():
            raise NotATraceError(f"{local}: a directory without zarr.json is not a zarr trace")
        try:
            root = source.get("zarr.json", MAX_METADATA_BYTES)
        except (NotATraceError, RemoteError):
            raise
        except TraceError as exc:  # a link, over the limit: not a document to parse
            from ..errors import MetadataError

            raise MetadataError(f"{source.location}: {exc}") from exc
        if root is not None:
            return "zarr", source, root
        head = Read("", 0, np.zeros(8, np.uint8))
        size = source.size("")
        if size is not None and size >= 8:
            source.fetch([head])
        magic = head.out.tobytes() if head.found else b""
        if magic == HDF5_MAGIC:
            return "hdf5", source, None
        if magic[:4] == ZIP_MAGIC:
            from ._zip import ZipSource

            return resolve(ZipSource(source))
        if size is None:
            raise NotATraceError(f"{source.location}: no trace there (no zarr.json, no file)")
        raise NotATraceError(f"{source.location}: neither a zarr v3 directory, a pack nor an "
                             f"HDF5 file")
    except BaseException:
        source.close()
        raise


def format_from_suffix(path: str | os.PathLike[str], default: str = "zarr") -> str:
    """The format a new trace gets from its name: .h5/.hdf5 -> hdf5, .zarr -> zarr."""
    suffix = Path(path).suffix.lower()
    if suffix in (".h5", ".hdf5", ".hdf"):
        return "hdf5"
    if suffix == ".zarr":
        return "zarr"
    return default


def create_backend(path: str | os.PathLike[str] | None, fmt: str) -> Backend:
    """A new, empty, writable backend. File backends write under a temporary name first; a
    destination that cannot be written raises WriterError naming ``path``, not that name."""
    if fmt == "memory":
        from ._memory import MemoryBackend

        return MemoryBackend()
    if fmt == "zarr":
        from ._zarr import ZarrBackend as backend_class
    elif fmt == "hdf5":
        from ._hdf5 import HDF5Backend as backend_class  # type: ignore[assignment]
    else:
        raise TraceError(f"unknown trace format {fmt!r}; use zarr or hdf5")
    try:
        return backend_class.create(Path(path))  # type: ignore[arg-type]
    except TraceError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise WriterError(f"cannot create {path}: {reason}") from exc


def open_backend(location: Any, writable: bool = False, **options: Any) -> Backend:
    """Open an existing trace (a path, a URL or a Source), choosing the backend by its bytes.
    ``options``: ``storage_options``, ``cache_dir``, ``cache_bytes`` for URLs."""
    fmt, source, root = resolve(location, **options)
    try:
        if fmt == "zarr":
            from ._zarr import ZarrBackend

            return ZarrBackend.open(source, writable=writable, root=root)
        from ._hdf5 import HDF5Backend

        return HDF5Backend.open(source, writable=writable)
    except BaseException:
        source.close()
        raise


def check_dtype(name: str, dtype: np.dtype) -> None:
    from ..errors import DisallowedCodecError

    if dtype.str not in ALLOWED_DTYPES and np.dtype(dtype).newbyteorder("<").str not in (
        ALLOWED_DTYPES
    ):
        raise DisallowedCodecError(f"array {name!r} has disallowed data type {dtype}")


def read_rows_direct(name: str, source: Any, locate, start: int, stop: int,
                     rows_per_chunk: int, row_shape: tuple[int, ...], dtype: np.dtype,
                     verifier: Any = None) -> np.ndarray:
    """Read rows ``start:stop`` of an uncompressed array whose chunks hold whole rows straight
    into the result (no decode, no intermediate copy): one ranged read per chunk, served by
    ``source`` (a :class:`~tracekit.storage._source.Source`) in one batch, concurrently where
    it is remote.

    ``locate(chunk_index)`` returns ``(key, byte_offset, stored_size)`` (the size None where
    only the read can tell), or None for a chunk never written (read as the fill value 0); so
    is a key the source does not have. A chunk of the wrong size is reported as truncated.
    ``verifier`` (a ``ChunkVerifier``): chunks carry a checksum after their data; a chunk it
    has not checked yet is read whole once, checked, and the rows copied from it.
    """
    out = np.empty((max(0, stop - start), *row_shape), dtype=dtype)
    if stop <= start:
        return out
    row_bytes = out[0].nbytes
    chunk_bytes = rows_per_chunk * row_bytes
    stored = chunk_bytes + (verifier.trailer if verifier is not None else 0)
    flat = out.reshape(len(out), -1).view(np.uint8).reshape(len(out), row_bytes)
    planned: list[tuple[Any, Any, np.ndarray, int | None]] = []
    for ci in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
        lo = max(start, ci * rows_per_chunk)
        hi = min(stop, (ci + 1) * rows_per_chunk)
        target = flat[lo - start: hi - start]
        first = (lo - ci * rows_per_chunk) * row_bytes
        read, whole = _plan_chunk_read(name, ci, None, locate(ci), stored, first, target,
                                       verifier)
        if read is None:
            target[...] = 0
        else:
            planned.append((ci, read, target, first if whole else None))
    _finish_reads(name, source, planned, verifier)
    return out


def read_direct(name: str, key: tuple, shape: tuple[int, ...], chunks: tuple[int, ...],
                dtype: np.dtype, source: Any, verifier: Any, *, rows: Any = None,
                tiles: Any = None, errors: tuple[type[BaseException], ...] = (OSError,)
                ) -> np.ndarray | None:
    """``arr[key]`` read straight from the chunks' bytes, where the key and the layout allow:
    attention's position x key tiles when ``tiles`` (their locate function) is given, whole
    rows when ``rows`` is; None otherwise (the caller decodes through its library). The
    shared direct path of both backends; ``errors`` from the source become
    CorruptTraceErrors naming the array."""
    try:
        tiled = tiled_key(key, shape) if tiles is not None else None
        if tiled is not None:
            r0, r1, k0, k1, finish = tiled
            return read_tiles_direct(name, source, tiles, (r0, r1), (k0, k1), chunks, dtype,
                                     verifier)[finish]
        split = split_rows_key(key, shape) if rows is not None else None
        if split is not None:
            start, stop, rest, drop = split
            out = read_rows_direct(name, source, rows, start, stop, chunks[0], shape[1:],
                                   dtype, verifier)
            return out[0][rest] if drop else out[(slice(None), *rest)]
    except errors as exc:
        raise CorruptTraceError(f"array {name!r}: unreadable chunk ({exc})") from exc
    return None


def _plan_chunk_read(name: str, ci: int, key: Any, where: Any, stored: int, first: int,
                     target: np.ndarray, verifier: Any) -> tuple[Any, bool]:
    """The read for one chunk's part (``target``, at byte ``first`` of the chunk's data),
    and whether it reads the whole chunk: it does when ``verifier`` has still to check it,
    else it reads just that part."""
    if where is None:
        return None, False
    obj, base, size = where
    if size is not None and size != stored:
        which = ci if key is None else key
        raise CorruptTraceError(f"array {name!r}: chunk {which} has {size} bytes, expected "
                                f"{stored} (truncated or corrupt)")
    whole = stored if size is None else None  # the object is the chunk: check its length
    if verifier is not None and verifier.wants(ci, key):
        return Read(obj, base, np.empty(stored, np.uint8), whole=whole), True
    return Read(obj, base + first, target.reshape(-1), whole=whole), False


def _finish_reads(name: str, source: Any, planned: list, verifier: Any) -> None:
    """Fetch the planned reads in one batch, check the chunks read whole and copy their
    rows; a chunk the source does not have reads as zeros."""
    if not planned:
        return
    try:
        source.fetch([read for _, read, _, _ in planned])
    except CorruptTraceError as exc:  # truncated, a link...: say which array
        raise type(exc)(f"array {name!r}: {exc}") from exc
    for ci, read, target, first in planned:
        if not read.found:
            target[...] = 0
        elif first is not None:  # read whole: check it, then take the rows wanted
            verifier.check_bytes(ci, read.out)
            target[...] = read.out[first: first + target.nbytes].reshape(target.shape)


def io_cause(exc: BaseException) -> str:
    """The cause of a failed write in a few words, on one line: ``No space left on device``
    for any OSError with an errno (h5py's messages span lines and name the file), else the
    error's own text, whitespace folded."""
    code = getattr(exc, "errno", None)
    if not (isinstance(code, int) and code > 0):
        found = re.search(r"\berrno = (\d+)", str(exc))  # HDF5's file driver errors
        code = int(found[1]) if found else None
    if code:
        return os.strerror(code)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


#: Disk space a writer holds (see SpaceReserve): more than the metadata HDF5 writes when it
#: trims, flushes and closes a trace, and than the zarr.json files finalizing rewrites.
RESERVE_BYTES = 256 << 10


class SpaceReserve:
    """Disk space held on a trace's file system while it is written, and given back when a
    write fails, so that the writer can still commit the data already written, trim the
    arrays and write the final metadata on a full disk.

    The space is an unnamed file (``O_TMPFILE``) with blocks allocated: nothing is left
    behind whatever happens to the process, and the kernel frees it when its descriptor
    closes. Less is held where less is free; none where the file system cannot allocate.
    """

    def __init__(self, folder: Path, nbytes: int = RESERVE_BYTES) -> None:
        self.nbytes = 0
        self._fd: int | None = None
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except (OSError, AttributeError):  # no O_TMPFILE here
            return
        while nbytes >= 4096:
            try:
                if allocate(fd, 0, nbytes):
                    self._fd, self.nbytes = fd, nbytes
                    return
                break  # the file system cannot allocate ahead
            except OSError:
                nbytes //= 4
        os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self.nbytes = None, 0


def tiled_key(key: tuple, shape: tuple[int, ...]) -> tuple[int, int, int, int, tuple] | None:
    """For a key of ints and step-1 slices on every axis, the rows and keys (first and last
    axes) to read and the selection that finishes the result: None if not of that form."""
    if len(key) != len(shape) or len(shape) < 2:
        return None
    bounds = []
    for k, n in ((key[0], shape[0]), (key[-1], shape[-1])):
        if isinstance(k, (int, np.integer)):
            bounds.append((int(k), int(k) + 1))
        elif isinstance(k, slice) and k.step in (None, 1):
            start, stop, _ = k.indices(n)
            bounds.append((start, max(start, stop)))
        else:
            return None
    finish = (0 if isinstance(key[0], (int, np.integer)) else slice(None), *key[1:-1],
              0 if isinstance(key[-1], (int, np.integer)) else slice(None))
    return (*bounds[0], *bounds[1], finish)


def read_tiles_direct(name: str, source: Any, locate, rows: tuple[int, int],
                      keys: tuple[int, int], tile: tuple[int, ...], dtype: np.dtype,
                      verifier=None) -> np.ndarray:
    """Read ``rows`` x every middle axis x ``keys`` of an uncompressed array chunked along its
    first and last axes only (attention's position x key tiles): one ranged read per tile of
    the rows each tile holds of them, contiguous in the tile, all in one batch. A step (one
    row, every key) reads one row of each key tile, not the whole tiles.

    ``locate(row_chunk, key_chunk)`` returns ``(key, byte_offset, stored_size)`` or None for
    a tile never written (the fill value 0: above the diagonal of a causal trace).
    ``verifier`` (a ``ChunkVerifier``): tiles stored with a checksum after their bytes are
    read whole and checked the first time they are touched."""
    (r0, r1), (k0, k1) = rows, keys
    tile_rows, tile_keys = tile[0], tile[-1]
    out = np.zeros((max(0, r1 - r0), *tile[1:-1], max(0, k1 - k0)), dtype=dtype)
    if r1 <= r0 or k1 <= k0:
        return out
    row_bytes = math.prod(tile[1:]) * dtype.itemsize
    stored = tile_rows * row_bytes + (verifier.trailer if verifier is not None else 0)
    planned, places = [], []
    for ci in range(r0 // tile_rows, (r1 - 1) // tile_rows + 1):
        lo, hi = max(r0, ci * tile_rows), min(r1, (ci + 1) * tile_rows)
        for kj in range(k0 // tile_keys, (k1 - 1) // tile_keys + 1):
            buf = np.empty((hi - lo) * row_bytes, np.uint8)
            first = (lo - ci * tile_rows) * row_bytes
            read, whole = _plan_chunk_read(name, ci, (ci, kj), locate(ci, kj), stored, first,
                                           buf, verifier)
            if read is None:
                continue  # zeros already
            planned.append(((ci, kj), read, buf, first if whole else None))
            places.append((lo, hi, kj, buf))
    _finish_reads(name, source, planned, verifier)
    for (_, read, _, _), (lo, hi, kj, buf) in zip(planned, places, strict=True):
        if not read.found:
            continue
        tiles = buf.view(dtype).reshape(hi - lo, *tile[1:])
        a, b = max(k0, kj * tile_keys), min(k1, (kj + 1) * tile_keys)
        out[lo - r0: hi - r0, ..., a - k0: b - k0] = tiles[..., a - kj * tile_keys:
                                                             b - kj * tile_keys]
    return out


def allocate(fd: int, offset: int, nbytes: int) -> bool:
    """Allocate bytes ``offset:offset+nbytes`` of a file (``posix_fallocate``; the file grows
    to cover them). Writes into allocated blocks ran steadily at about a plain append's speed
    here, writes that make the file system allocate as they go at 0.3-0.9x of it. Returns
    False where the file system cannot allocate; ENOSPC is raised, before anything is written.
    """
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return False
    return True


def chunk_parts(start: int, blocks: Sequence[np.ndarray], rows_per_chunk: int,
                ) -> Iterator[tuple[int, int, int, list[np.ndarray]]]:
    """Split consecutive row ``blocks`` written from row ``start`` by chunk: yields
    ``(chunk index, first row, end row, parts)`` where ``parts`` are views of the blocks that
    together hold rows ``first:end`` of that chunk, in order."""
    stop = start + sum(len(b) for b in blocks)
    bi, off = 0, 0  # current block, and the row within it
    for ci in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
        lo, hi = max(start, ci * rows_per_chunk), min(stop, (ci + 1) * rows_per_chunk)
        need, parts = hi - lo, []
        while need:
            take = min(need, len(blocks[bi]) - off)
            if take:
                parts.append(blocks[bi][off: off + take])
            off += take
            need -= take
            if off == len(blocks[bi]):
                bi, off = bi + 1, 0
        yield ci, lo, hi, parts


def full_rows(key: tuple, value: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(start, stop) when ``arr[key] = value`` writes complete rows ``start:stop``; else None."""
    if not key or not isinstance(key[0], slice) or len(key) > len(shape) or any(
        not (isinstance(k, slice) and k.indices(n) == (0, n, 1))
        for k, n in zip(key[1:], shape[1:], strict=False)
    ):
        return None
    start, stop, step = key[0].indices(shape[0])
    if step != 1 or stop <= start or tuple(value.shape) != (stop - start, *shape[1:]):
        return None
    return start, stop


def split_rows_key(key: tuple, shape: tuple[int, ...]) -> tuple[int, int, tuple, bool] | None:
    """For a normalized key (ints, step-1 slices), the leading rows to read, the key for the
    remaining axes, and whether the leading axis is dropped; None if not of that form."""
    if not key:
        return 0, shape[0], (), False
    first = key[0]
    if isinstance(first, (int, np.integer)):
        return int(first), int(first) + 1, tuple(key[1:]), True
    if isinstance(first, slice) and first.step in (None, 1):
        start, stop, _ = first.indices(shape[0])
        return start, max(start, stop), tuple(key[1:]), False
    return None
