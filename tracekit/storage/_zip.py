"""A packed trace: a zarr store inside one uncompressed (stored) zip file, read as a Source.

:class:`ZipSource` wraps another source (a local file, or a remote object) and serves the keys
of the zarr store inside it as ranged reads of that one object. It never decompresses
anything: every entry must be stored, so an entry's bytes are a byte range of the pack.

Opening costs one ranged read of the pack's tail (the end-of-central-directory record, the
ZIP64 records, and usually the whole central directory), one more when the directory is
larger. Each entry's local header (whose variable-length fields decide where its data starts)
is read the first time the entry is, in one batch per :meth:`ZipSource.fetch`, and checked
against the central directory then. :meth:`ZipSource.get` checks the CRC-32 of metadata
documents (``zarr.json``: they have no checksum of their own); chunks end in their own crc32c,
which the reader checks, and ``unpack`` checks every entry's CRC-32.

A pack is untrusted input: compressed or encrypted entries, unsafe or duplicate names,
entries that overlap each other or the directory, offsets or sizes past the end, and a
directory larger than the file could hold are each refused with a one-line
:class:`~tracekit.errors.CorruptTraceError`.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptTraceError
from ._source import Read, Source

#: The first bytes of a zip file whose first entry is a file (every pack).
LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL_MAGIC = b"PK\x01\x02"
_EOCD_MAGIC = b"PK\x05\x06"
_ZIP64_EOCD_MAGIC = b"PK\x06\x06"
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_EXTRA_ID = 0x0001

_FLAG_ENCRYPTED = 0x0001
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_STORED = 0

#: Bytes of the tail read on open: the end records, and the central directory of a pack of
#: up to about 3000 entries, in one request.
TAIL_BYTES = 1 << 18
#: Largest central directory accepted (a pack of about two million entries).
MAX_DIRECTORY_BYTES = 1 << 28


def detect(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts like a zip file, i.e. a pack."""
    return head[:4] == LOCAL_MAGIC


@dataclass
class _Entry:
    name: str
    raw_name: bytes
    header: int  # offset of the local header in the pack
    size: int
    crc: int
    end: int  # where the next entry (or the directory) starts: the data must end by then
    data: int | None = None  # offset of the data, once the local header is read


def _check_name(name: str, describe: str) -> None:
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]):
        raise CorruptTraceError(f"{describe}: unsafe entry name {name!r} (absolute, '..', "
                                f"empty or with backslashes)")


def _zip64_extra(extra: bytes, fields: list[str], describe: str) -> dict[str, int]:
    """Values of the ZIP64 extra field for ``fields`` (those whose 32-bit value was maxed)."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4: at + 4 + length]
        if len(body) != length:
            break
        if kind == _ZIP64_EXTRA_ID:
            if length < 8 * len(fields):
                raise CorruptTraceError(f"{describe}: ZIP64 extra field is too short")
            return {f: struct.unpack_from("<Q", body, 8 * i)[0] for i, f in enumerate(fields)}
        at += 4 + length
    raise CorruptTraceError(f"{describe}: a ZIP64 size or offset without its extra field")


class ZipSource(Source):
    """The zarr store inside a stored zip that is key ``key`` of ``inner`` (only its
    ``size`` and ``fetch`` are used). Takes ownership of ``inner``: :meth:`close` closes it."""

    def __init__(self, inner: Source, key: str = "") -> None:
        self._inner, self._key = inner, key
        self.location = inner.describe(key)
        self.local_path = None  # keys are not files on this machine
        self.remote = inner.remote
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._children: dict[str, set[str]] = {"": set()}
        try:
            size = inner.size(key)
            if size is None:
                raise CorruptTraceError(f"{self.location} does not exist")
            self._size = size
            self._read_directory()
        except BaseException:
            inner.close()
            raise

    # -- opening --------------------------------------------------------------------------
    def _range(self, offset: int, n: int) -> bytes:
        out = np.empty(n, np.uint8)
        read = Read(self._key, offset, out)
        self._inner.fetch([read])
        if not read.found:
            raise CorruptTraceError(f"{self.location} disappeared while it was read")
        return out.tobytes()

    def _corrupt(self, what: str) -> CorruptTraceError:
        return CorruptTraceError(f"{self.location}: {what} (not a pack, truncated or corrupt)")

    def _read_directory(self) -> None:
        size = self._size
        if size < _EOCD.size:
            raise self._corrupt(f"{size} bytes is too short for a zip file")
        tail_at = max(0, size - TAIL_BYTES)
        tail = self._range(tail_at, size - tail_at)
        # The end record is the last one whose comment runs exactly to the end of the file.
        pos = len(tail)
        while True:
            pos = tail.rfind(_EOCD_MAGIC, 0, pos)
            if pos < 0 or size - (tail_at + pos) > _EOCD.size + 0xFFFF:
                raise self._corrupt("no end-of-central-directory record")
            eocd = _EOCD.unpack_from(tail, pos) if pos + _EOCD.size <= len(tail) else None
            if eocd is not None and tail_at + pos + _EOCD.size + eocd[7] == size:
                break
        _, disk, cd_disk, n_here, count, cd_size, cd_offset, _ = eocd
        end_records = tail_at + pos  # where the directory must end
        loc = pos - _ZIP64_LOCATOR.size
        if loc >= 0 and tail[loc: loc + 4] == _ZIP64_LOCATOR_MAGIC:
            _, z_disk, rec_at, n_disks = _ZIP64_LOCATOR.unpack_from(tail, loc)
            if rec_at + _ZIP64_EOCD.size > tail_at + loc:
                raise self._corrupt("the ZIP64 end record lies past its locator")
            rec = (tail[rec_at - tail_at: rec_at - tail_at + _ZIP64_EOCD.size]
                   if rec_at >= tail_at else self._range(rec_at, _ZIP64_EOCD.size))
            (magic, rec_size, _, _, disk, cd_disk, n_here, count, cd_size,
             cd_offset) = _ZIP64_EOCD.unpack(rec)
            if magic != _ZIP64_EOCD_MAGIC or rec_at + 12 + rec_size != tail_at + loc:
                raise self._corrupt("bad ZIP64 end-of-central-directory record")
            if z_disk != 0 or n_disks > 1:
                raise self._corrupt("a multi-volume zip")
            end_records = rec_at
        if disk != 0 or cd_disk != 0 or n_here != count:
            raise self._corrupt("a multi-volume zip")
        if cd_size > MAX_DIRECTORY_BYTES or count * _CENTRAL.size > cd_size:
            raise self._corrupt(f"a central directory of {count} entries in {cd_size} bytes "
                                f"(more than this file could hold)")
        if cd_offset + cd_size != end_records:
            raise self._corrupt(f"the central directory ({cd_size} bytes at {cd_offset}) does "
                                f"not end where the end record starts ({end_records})")
        before = max(0, min(tail_at, cd_offset + cd_size) - cd_offset)  # bytes not in the tail
        directory = self._range(cd_offset, before) if before else b""
        if cd_offset + cd_size > tail_at:
            directory += tail[max(0, cd_offset - tail_at): cd_offset + cd_size - tail_at]
        self._parse_directory(directory, count, cd_offset)

    def _parse_directory(self, directory: bytes, count: int, cd_offset: int) -> None:
        at = 0
        entries: list[_Entry] = []
        for i in range(count):
            if at + _CENTRAL.size > len(directory):
                raise self._corrupt(f"the central directory ends inside entry {i}")
            (magic, _made, _need, flags, method, _t, _d, crc, csize, usize, n_name, n_extra,
             n_comment, disk, _ia, _ea, header) = _CENTRAL.unpack_from(directory, at)
            if magic != _CENTRAL_MAGIC:
                raise self._corrupt(f"entry {i} of the central directory has no signature")
            raw = directory[at + _CENTRAL.size: at + _CENTRAL.size + n_name]
            extra = directory[at + _CENTRAL.size + n_name:
                              at + _CENTRAL.size + n_name + n_extra]
            at += _CENTRAL.size + n_name + n_extra + n_comment
            if at > len(directory):
                raise self._corrupt(f"the central directory ends inside entry {i}")
            name = raw.decode("utf-8" if flags & _FLAG_UTF8 else "cp437", errors="replace")
            where = f"{self.location}: entry {name!r}"
            wide = [f for f, v in (("usize", usize), ("csize", csize), ("header", header),
                                   ("disk", disk)) if v == (0xFFFF if f == "disk" else 0xFFFFFFFF)]
            if wide:
                values = _zip64_extra(extra, wide, where)
                usize = values.get("usize", usize)
                csize = values.get("csize", csize)
                header = values.get("header", header)
                disk = values.get("disk", disk)
            if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
                raise CorruptTraceError(f"{where} is encrypted; a pack's entries are plain")
            if method != _STORED or csize != usize:
                raise CorruptTraceError(f"{where} is compressed (method {method}); a pack's "
                                        f"entries are stored uncompressed")
            if disk != 0:
                raise self._corrupt(f"entry {name!r} on another volume")
            if name.endswith("/") and usize == 0:  # a folder entry (zip -r): nothing to serve
                name = name.rstrip("/")
                _check_name(name, self.location)
                continue
            _check_name(name, self.location)
            if name in self._entries:
                raise CorruptTraceError(f"{self.location}: entry {name!r} appears twice")
            entry = _Entry(name, raw, header, usize, crc, 0)
            self._entries[name] = entry
            entries.append(entry)
        if at != len(directory):
            raise self._corrupt(f"the central directory holds more than its {count} entries")
        entries.sort(key=lambda e: e.header)
        bounds = [e.header for e in entries[1:]] + [cd_offset]
        for entry, end in zip(entries, bounds, strict=True):
            entry.end = end
            if entry.header + _LOCAL.size + len(entry.raw_name) + entry.size > end:
                raise CorruptTraceError(
                    f"{self.location}: entry {entry.name!r} ({entry.size} bytes at "
                    f"{entry.header}) overlaps the next entry or the directory, or lies past "
                    f"the end")
        for name in self._entries:
            parts = name.split("/")
            for depth in range(len(parts)):
                self._children.setdefault("/".join(parts[:depth]), set()).add(parts[depth])

    def _resolve(self, entries: Sequence[_Entry]) -> None:
        """Read the local headers of ``entries`` (one batch) and check them."""
        todo = list({e.name: e for e in entries if e.data is None}.values())
        if not todo:
            return
        reads = [Read(self._key, e.header, np.empty(_LOCAL.size + len(e.raw_name), np.uint8))
                 for e in todo]
        self._inner.fetch(reads)
        for entry, read in zip(todo, reads, strict=True):
            head = read.out.tobytes()
            (magic, _need, flags, method, _t, _d, _crc, csize, _usize, n_name,
             n_extra) = _LOCAL.unpack_from(head)
            where = f"{self.location}: entry {entry.name!r}"
            if magic != LOCAL_MAGIC or head[_LOCAL.size:] != entry.raw_name:
                raise CorruptTraceError(f"{where}: its local header does not match the "
                                        f"central directory (corrupt pack)")
            if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION) or method != _STORED:
                raise CorruptTraceError(f"{where} is compressed or encrypted; a pack's "
                                        f"entries are stored uncompressed")
            data = entry.header + _LOCAL.size + n_name + n_extra
            if data + entry.size > entry.end:
                raise CorruptTraceError(f"{where}: its data ({entry.size} bytes at {data}) "
                                        f"overlaps the next entry or the directory")
            with self._lock:
                entry.data = data

    # -- Source ---------------------------------------------------------------------------
    def entry_crc(self, key: str) -> int | None:
        """The CRC-32 the directory records for ``key`` (unpack checks every file with it)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.crc

    def names(self) -> list[str]:
        """Every file of the packed store, in the order the pack holds them."""
        return [e.name for e in sorted(self._entries.values(), key=lambda e: e.header)]

    def get(self, key: str, cap: int) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.size > cap:
            raise CorruptTraceError(f"{key} is larger than the limit of {cap} bytes")
        out = np.empty(entry.size, np.uint8)
        self.fetch([Read(key, 0, out)])
        data = out.tobytes()
        # Metadata documents carry no checksum of their own: the zip's CRC-32 is theirs.
        # Chunks end in a crc32c the reader checks; a second check would halve read speed.
        if key.rsplit("/", 1)[-1] == "zarr.json" and zlib.crc32(data) != entry.crc:
            raise CorruptTraceError(f"{self.describe(key)} fails its CRC-32 (corrupt pack)")
        return data

    def fetch(self, reads: Sequence[Read]) -> None:
        pairs: list[tuple[Read, _Entry]] = []
        for read in reads:
            entry = self._entries.get(read.key)
            if entry is None:
                read.found = False
                continue
            if read.whole is not None and entry.size != read.whole:
                raise CorruptTraceError(f"chunk {read.key} has {entry.size} bytes, expected "
                                        f"{read.whole} (truncated or corrupt)")
            if read.offset < 0 or read.offset + read.out.nbytes > entry.size:
                raise CorruptTraceError(f"chunk {read.key} is truncated ({entry.size} bytes, "
                                        f"reading {read.out.nbytes} from {read.offset})")
            pairs.append((read, entry))
        if not pairs:
            return
        self._resolve([e for _, e in pairs])
        inner = [Read(self._key, e.data + r.offset, r.out) for r, e in pairs]  # type: ignore[operator]
        self._inner.fetch(inner)
        if not all(r.found for r in inner):
            raise CorruptTraceError(f"{self.location} disappeared while it was read")

    def size(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.size

    def list(self, prefix: str = "") -> list[str] | None:
        return sorted(self._children.get(prefix.strip("/"), ()))

    def close(self) -> None:
        self._inner.close()
