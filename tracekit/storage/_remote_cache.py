"""A bounded on-disk cache of byte ranges read from remote traces, so that reading the same
chunks again (a second scrub, a replay) costs no request.

Each entry is one plain file named by a hash of (location, key, offset, length asked, size
expected); its bytes are a 16-byte header (magic, length, CRC-32C) followed by the data. A file
whose header, length or checksum does not match is deleted and read again from the server,
never trusted. Entries are written to a temporary file and renamed into place, so processes
sharing the folder never see half an entry; they keep one count of its bytes (``.usage``,
updated under a file lock), and the least recently used entries (by modification time,
refreshed on every hit) are deleted when it grows past the byte limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import google_crc32c

try:
    import fcntl
except ImportError:  # Windows: processes do not share the count
    fcntl = None  # type: ignore[assignment]

_MAGIC = b"TKRC"
_HEADER = struct.Struct("<4sQI")  # magic, data length, CRC-32C of the data
#: Default byte limit when only a folder is given.
DEFAULT_CACHE_BYTES = 1 << 30


class RangeCache:
    """Byte ranges of remote objects, kept as files under ``root``, at most ``limit`` bytes."""

    def __init__(self, root: str | os.PathLike[str], limit: int = DEFAULT_CACHE_BYTES) -> None:
        if limit <= 0:
            raise ValueError(f"cache_bytes must be positive, not {limit}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._lock = threading.Lock()

    @staticmethod
    def entry_name(location: str, key: str, offset: int, length: int,
                   whole: int | None) -> str:
        ident = f"{location}\0{key}\0{offset}\0{length}\0{whole}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(ident).hexdigest()[:40]

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def get(self, name: str) -> bytes | None:
        """The entry's bytes, or None when absent or corrupt (a corrupt one is deleted)."""
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if len(raw) >= _HEADER.size:
            magic, length, crc = _HEADER.unpack_from(raw)
            data = raw[_HEADER.size:]
            if magic == _MAGIC and length == len(data) and google_crc32c.value(data) == crc:
                with contextlib.suppress(OSError):
                    os.utime(path)  # most recently used
                return data
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def put(self, name: str, data: bytes) -> None:
        """Store ``data``; failures (full disk, a read-only folder) only cost the caching."""
        size = _HEADER.size + len(data)
        if size > self.limit // 4:
            return  # one entry must not flush the rest
        path = self._path(name)
        tmp = path.parent / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, len(data), google_crc32c.value(data)))
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._locked():
            total = self._read_usage() + size
            if total > self.limit:
                total = self._evict()
            self._write_usage(total)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's lock, and an exclusive lock on the folder's ``.lock`` file (where
        fcntl exists) so that processes sharing the folder count its bytes together."""
        with self._lock:
            if fcntl is None:
                yield
                return
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _read_usage(self) -> int:
        """The bytes the folder holds, as counted in ``.usage`` (recounted when absent or
        unreadable). It may overstate (a deleted corrupt entry, one written twice), which only
        makes the next eviction pass recount sooner; it never understates."""
        try:
            return int((self.root / ".usage").read_text("ascii"))
        except (OSError, ValueError):
            return sum(size for _, size, _ in self._entries())

    def _write_usage(self, total: int) -> None:
        tmp = self.root / f".usage.{os.getpid()}.{threading.get_ident()}"
        with contextlib.suppress(OSError):
            tmp.write_text(str(total), "ascii")
            os.replace(tmp, self.root / ".usage")

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for path in sub.iterdir():
                with contextlib.suppress(OSError):
                    st = path.stat()
                    if path.name.startswith(".") and time.time() - st.st_mtime < 3600:
                        continue  # another writer's file in flight
                    out.append((st.st_mtime, st.st_size, path))
        return out

    def _evict(self) -> int:
        """Delete the least recently used entries until the folder is under 90% of its limit;
        the bytes left."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        target = self.limit * 9 // 10 if total > self.limit else total
        for _, size, path in entries:
            if total <= target:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size
        return total

    def total_bytes(self) -> int:
        """Bytes the folder holds now (all processes' entries)."""
        return sum(size for _, size, _ in self._entries())
