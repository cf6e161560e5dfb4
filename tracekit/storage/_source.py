"""Where a trace's bytes come from: one small read-only interface (:class:`Source`) for a
local folder or file, a packed single file, and HTTP or object-store URLs.

Backends read everything through a Source (their metadata documents, and chunks by key and
byte range), so that none of them asks whether a trace is remote. Keys are ``/``-separated
paths relative to the trace (``residual/c.0.0.0``); the empty key is the trace itself when it
is a single file (an HDF5 file, a pack). Reads are batched (:meth:`Source.fetch`): a local
source serves them one ``preadv`` each, a remote one issues them concurrently.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptTraceError
from ._safety import LinkError, open_beneath, open_dir, open_dir_beneath, read_fd_capped


@dataclass(eq=False)
class Read:
    """One ranged read: fill ``out`` (a contiguous uint8 array) with the bytes of ``key`` from
    ``offset``. ``whole``: the object must be exactly this many bytes long (a chunk file of
    the wrong size is corrupt); a source that cannot tell cheaply checks it when the read
    covers the object's end. ``found`` is set False when ``key`` does not exist (``out`` is
    then left as it was: a zarr chunk never written reads as the fill value)."""

    key: str
    offset: int
    out: np.ndarray
    whole: int | None = None
    found: bool = True


class Source(ABC):
    """Read-only access to the bytes of one trace."""

    #: What messages name: a path, or a URL without credentials.
    location: str = ""
    #: The local folder or file, when there is one (writers, and fd-based fast paths).
    local_path: Path | None = None
    #: Every request costs a network round trip: backends then read one consolidated
    #: metadata document instead of one per array.
    remote: bool = False

    @abstractmethod
    def get(self, key: str, cap: int) -> bytes | None:
        """All bytes of ``key``, or None when absent. More than ``cap`` bytes is a
        CorruptTraceError naming the key (a hostile trace cannot make a reader allocate
        what it declares)."""

    @abstractmethod
    def fetch(self, reads: Sequence[Read]) -> None:
        """Serve every read (see :class:`Read`); a short one is a CorruptTraceError naming
        its key (truncated). Remote sources issue them concurrently."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes of ``key``, None when absent."""

    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        """:meth:`size` of each key (remote sources ask concurrently)."""
        return [self.size(k) for k in keys]

    def list(self, prefix: str = "") -> list[str] | None:
        """Names directly under folder ``prefix`` (sorted), or None where the store cannot
        list (plain HTTP): callers then rely on consolidated metadata."""
        return None

    def open_file(self, key: str = "") -> io.RawIOBase:
        """A read-only, seekable file object over ``key`` (h5py reads HDF5 through it)."""
        return SourceFile(self, key)

    def describe(self, key: str) -> str:
        """How messages name ``key``: the location joined with it."""
        return f"{self.location}/{key}" if key else self.location

    def close(self) -> None:
        """Release descriptors and connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_size(read: Read, size: int, describe: str) -> None:
    if read.whole is not None and size != read.whole:
        raise CorruptTraceError(f"{describe} has {size} bytes, expected {read.whole} "
                                f"(truncated or corrupt)")


def _pread_into(fd: int, read: Read, describe: str) -> None:
    view = memoryview(read.out).cast("B")
    got = os.preadv(fd, [view], read.offset)
    if got != len(view):
        raise CorruptTraceError(f"{describe} is truncated ({read.offset + got} bytes, "
                                f"reading {len(view)} from {read.offset})")


class LocalDirSource(Source):
    """A trace folder on this machine (zarr). Every file is opened beneath the folder
    without following links, regular files only, capped (see ``_safety``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.local_path = Path(root)
        self.location = str(self.local_path)
        # Descriptors of the trace's folder ('') and of the folders files were opened in
        # (an array's), each opened once without following links: a chunk read then opens
        # just its file.
        self._folders: dict[str, int] = {}
        self._lock = threading.RLock()  # _folder opens the trace's folder first, inside

    def _folder(self, rel: str) -> int:
        fd = self._folders.get(rel)
        if fd is None:
            with self._lock:
                fd = self._folders.get(rel)
                if fd is None:
                    if rel:
                        fd = open_dir_beneath(self._folder(""), rel)
                    else:
                        fd = open_dir(self.local_path)  # type: ignore[arg-type]
                    self._folders[rel] = fd
        return fd

    def _open(self, key: str, folders_absent: bool = False) -> int | None:
        """A descriptor of regular file ``key``; None when absent (and, with
        ``folders_absent``, when it is a folder: not an object)."""
        if not key.strip("/"):
            return None  # the folder itself is not an object
        parent, _, name = key.rpartition("/")
        try:
            return open_beneath(self._folder(parent), name) if parent and name else (
                open_beneath(self._folder(""), key))
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError) as exc:
            if folders_absent:
                return None
            raise CorruptTraceError(f"{key} is not a regular file "
                                    f"({os.strerror(exc.errno or 0)})") from exc
        except LinkError:
            raise
        except OSError as exc:
            raise CorruptTraceError(f"{key} is unreadable "
                                    f"({os.strerror(exc.errno or 0)})") from exc

    def get(self, key: str, cap: int) -> bytes | None:
        fd = self._open(key)
        if fd is None:
            return None
        try:
            data = read_fd_capped(fd, cap)
        finally:
            os.close(fd)
        if data is None:
            raise CorruptTraceError(f"{key} is larger than the limit of {cap} bytes")
        return data

    def fetch(self, reads: Sequence[Read]) -> None:
        for read in reads:
            fd = self._open(read.key)
            if fd is None:
                read.found = False
                continue
            try:
                if read.whole is not None:
                    _check_size(read, os.fstat(fd).st_size, f"chunk {read.key}")
                _pread_into(fd, read, f"chunk {read.key}")
            finally:
                os.close(fd)

    def size(self, key: str) -> int | None:
        fd = self._open(key, folders_absent=True)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> list[str] | None:
        try:
            return sorted(os.listdir(self.local_path / prefix if prefix else self.local_path))  # type: ignore[operator]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        with self._lock:
            for fd in self._folders.values():
                os.close(fd)
            self._folders.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class LocalFileSource(Source):
    """A single-file trace on this machine (HDF5, a pack): the empty key is the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.local_path = Path(path)
        self.location = str(self.local_path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _file(self, key: str) -> int | None:
        if key:
            return None
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.local_path, os.O_RDONLY | os.O_CLOEXEC)  # type: ignore[arg-type]
        return self._fd

    def get(self, key: str, cap: int) -> bytes | None:
        fd = self._file(key)
        if fd is None:
            return None
        data = read_fd_capped(fd, cap)
        if data is None:
            raise CorruptTraceError(f"{self.location} is larger than the limit of {cap} bytes")
        return data

    def fetch(self, reads: Sequence[Read]) -> None:
        for read in reads:
            fd = self._file(read.key)
            if fd is None:
                read.found = False
                continue
            _pread_into(fd, read, self.describe(read.key))

    def size(self, key: str) -> int | None:
        fd = self._file(key)
        return None if fd is None else os.fstat(fd).st_size

    def fileno(self) -> int:
        """The open file's descriptor (HDF5's direct chunk reads use it)."""
        return self._file("")  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _no_cycle_collection():
    """Hold off Python's cycle collector while h5py waits for a read.

    h5py calls a file object's ``readinto`` holding its global lock. A remote source serves
    the read on its event loop's thread; if the collector ran there and freed an h5py object
    (which takes that lock to close it), each thread would wait for the other for ever."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


class SourceFile(io.RawIOBase):
    """A seekable, read-only file object over one key of a source: what h5py needs to read
    an HDF5 trace that is not a local file. Reads are served in aligned blocks kept in a
    small least-recently-used cache, so HDF5's many small metadata reads cost one request
    per block, not one each."""

    def __init__(self, source: Source, key: str = "", block: int = 1 << 16,
                 blocks: int = 64) -> None:
        super().__init__()
        self._source, self._key = source, key
        size = source.size(key)
        if size is None:
            raise FileNotFoundError(source.describe(key))
        self._size, self._pos = size, 0
        self._block, self._max_blocks = block, blocks
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _blocks(self, first: int, last: int) -> dict[int, bytes]:
        """Blocks ``first..last``, fetching the missing ones in one batch."""
        with self._lock:
            have = {i: self._cache[i] for i in range(first, last + 1) if i in self._cache}
        missing = [i for i in range(first, last + 1) if i not in have]
        if missing:
            reads = []
            for i in missing:
                lo = i * self._block
                n = min(self._block, self._size - lo)
                reads.append(Read(self._key, lo, np.empty(n, np.uint8)))
            self._source.fetch(reads)
            with self._lock:
                for i, r in zip(missing, reads, strict=True):
                    have[i] = self._cache[i] = r.out.tobytes()
                while len(self._cache) > self._max_blocks:
                    self._cache.pop(next(iter(self._cache)))
        return have

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        lo, hi = self._pos, self._pos + n
        if n >= 4 * self._block:  # large reads (raw chunks) go straight through
            with _no_cycle_collection():
                self._source.fetch([Read(self._key, lo, np.frombuffer(view[:n], np.uint8))])
        else:
            with _no_cycle_collection():
                blocks = self._blocks(lo // self._block, (hi - 1) // self._block)
            at = lo
            while at < hi:
                i = at // self._block
                piece = blocks[i][at - i * self._block: hi - i * self._block]
                view[at - lo: at - lo + len(piece)] = piece
                at += len(piece)
        self._pos = hi
        return n
