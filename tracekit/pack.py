"""``tracekit pack`` / ``unpack``: a zarr trace folder as ONE file to share, and back.

A pack is an uncompressed zip of the zarr store: one stored entry per file of the folder,
named by its store key (``residual/c.0.0.0``), its bytes copied as they are (chunk checksums
included), so zarr-python's ``ZipStore`` reads it, ``unzip`` restores it, and tracekit reads a
chunk as one ranged read of the pack (:class:`~tracekit.storage._zip.ZipSource`). Nothing is
recompressed: activations gain about 7% from lossless codecs, and a re-chunked (sharded)
copy would no longer be bit-exact with the folder.

The root ``zarr.json`` is written last and the zip's central directory after it, into a
temporary file in the destination folder that is renamed into place only when complete: a
pack that exists is whole. HDF5 traces are already one file and are refused (share the file).
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CorruptTraceError, NotATraceError, TraceError
from .storage import HDF5_MAGIC
from .storage._source import LocalFileSource, Read
from .storage._zip import LOCAL_MAGIC, ZipSource, detect

Progress = Callable[[int, int], None]

#: Sizes and offsets at or above this need ZIP64 records (the 32-bit fields hold 0xFFFFFFFF).
ZIP64_LIMIT = 0xFFFFFFFF
#: Entries in the classic end record's 16-bit count.
ZIP64_COUNT = 0xFFFF
#: Data of each entry starts at a multiple of this (padding in the local header's extra
#: field), so a ranged read of a chunk touches whole pages. 0 writes no padding (see README,
#: "Packing a trace", for the measurement that chose the default).
ALIGN = 0
_PAD_ID = 0x7470  # extra-field id of the padding block (ignored by zip readers)
_BLOCK = 8 << 20  # bytes copied at a time
_VERSION = 45  # zip 4.5: ZIP64
_MADE_BY = (3 << 8) | _VERSION  # Unix, so unzip restores the file modes
_MODE = (stat.S_IFREG | 0o644) << 16


@dataclass
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    files: int
    bytes: int
    status: str  # the trace's status ("complete", "recording", ...)
    zip64: bool = False
    skipped: list[str] = field(default_factory=list)


def _dos_time(mtime: float) -> tuple[int, int]:
    t = time.localtime(max(mtime, 315532800.0))  # zip dates start in 1980
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday)


def _store_files(src: Path) -> tuple[list[tuple[str, int, float]], list[str]]:
    """Every regular file of the store as (key, size, mtime), root ``zarr.json`` last; and
    the hidden files left out (a writer's temporaries). Links are refused, not followed."""
    found, skipped = [], []
    for folder, dirs, files in os.walk(src):
        rel = Path(folder).relative_to(src).as_posix()
        for name in sorted(dirs + files):
            key = name if rel == "." else f"{rel}/{name}"
            st = os.lstat(os.path.join(folder, name))
            if name.startswith("."):
                skipped.append(key)
                if name in dirs:
                    dirs.remove(name)
            elif stat.S_ISLNK(st.st_mode):
                raise CorruptTraceError(f"{src}/{key} is a symbolic link; a pack holds only "
                                        f"the trace's own files")
            elif stat.S_ISREG(st.st_mode):
                found.append((key, st.st_size, st.st_mtime))
            elif not stat.S_ISDIR(st.st_mode):
                raise CorruptTraceError(f"{src}/{key} is not a regular file")
    found.sort(key=lambda f: (f[0] == "zarr.json", f[0]))
    return found, skipped


def _check_source(src: Path) -> str:
    """The status of the zarr trace folder ``src``; other inputs are refused, one line."""
    if src.is_file():
        with open(src, "rb") as f:
            head = f.read(8)
        if head.startswith(HDF5_MAGIC):
            raise TraceError(f"{src} is an HDF5 trace, already one file: share it as it is "
                             f"(a pack holds a zarr trace)")
        if detect(head):
            raise TraceError(f"{src} is already a pack")
        raise NotATraceError(f"{src} is not a trace (neither a zarr folder nor HDF5)")
    from .reader import open_or_error

    with open_or_error(src) as trace:
        if trace.format != "zarr":
            raise TraceError(f"{src} is a {trace.format} trace; a pack holds a zarr trace")
        return trace.status


def _temp_sibling(out: Path, what: str) -> Path:
    return out.with_name(f".{out.name}.{what}-{os.getpid()}")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TraceError(f"{out} already exists (use --force to replace it)")
        if out.resolve() == src.resolve():
            raise TraceError("source and destination are the same")
    if out.resolve().is_relative_to(src.resolve()):
        raise TraceError(f"{out} is inside the trace {src}")
    if not out.parent.is_dir():
        raise TraceError(f"{out.parent} is not a folder")


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing what is there only now that ``tmp`` is complete."""
    if not (out.exists() or out.is_symlink()) or (tmp.is_file() and out.is_file()
                                                   and not out.is_symlink()):
        os.replace(tmp, out)  # atomic
        return
    old = _temp_sibling(out, "old")
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


class _ZipWriter:
    """Writes stored entries and the central directory of a zip, ZIP64 where needed."""

    def __init__(self, fd: int, align: int, zip64_limit: int) -> None:
        self.fd, self.align, self.limit = fd, align, zip64_limit
        self.at = 0
        self.central: list[bytes] = []
        self.zip64 = False

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.at += len(data)

    def add(self, key: str, src_fd: int, size: int, mtime: float,
            progress: Callable[[int], None]) -> None:
        name = key.encode("utf-8")
        flags = 0 if name.isascii() else 0x0800
        wide = size >= self.limit or self.at >= self.limit
        extra = struct.pack("<HHQQ", 1, 16, size, size) if wide else b""
        if self.align:
            pad = -(self.at + 30 + len(name) + len(extra)) % self.align
            if pad:
                pad += self.align if pad < 4 else 0
                extra += struct.pack("<HH", _PAD_ID, pad - 4) + bytes(pad - 4)
        header_at = self.at
        dtime, ddate = _dos_time(mtime)
        small = 0xFFFFFFFF if wide else size
        self._write(struct.pack("<4sHHHHHIIIHH", LOCAL_MAGIC, _VERSION, flags, 0, dtime,
                                ddate, 0, small, small, len(name), len(extra)) + name + extra)
        crc = 0
        done = 0
        while done < size:
            block = os.read(src_fd, min(_BLOCK, size - done))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            self._write(block)
            done += len(block)
            progress(len(block))
        if done != size or os.read(src_fd, 1):
            raise TraceError(f"{key} changed while it was packed (is the trace still being "
                             f"recorded?); pack it again")
        os.pwrite(self.fd, struct.pack("<I", crc), header_at + 14)
        fields = [size, size] if wide else []
        if header_at >= self.limit:
            fields.append(header_at)
        cextra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        self.zip64 |= bool(fields)
        self.central.append(struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", _MADE_BY, _VERSION, flags, 0, dtime, ddate,
            crc, small, small, len(name), len(cextra), 0, 0, 0, _MODE,
            0xFFFFFFFF if header_at >= self.limit else header_at) + name + cextra)

    def finish(self) -> None:
        cd_at, count = self.at, len(self.central)
        for record in self.central:
            self._write(record)
        cd_size = self.at - cd_at
        wide = count >= ZIP64_COUNT or cd_at >= self.limit or cd_size >= self.limit
        if wide:
            self.zip64 = True
            rec_at = self.at
            self._write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, _MADE_BY, _VERSION, 0,
                                    0, count, count, cd_size, cd_at))
            self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, rec_at, 1))
        n16 = min(count, 0xFFFF) if wide else count
        self._write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n16, n16,
                                0xFFFFFFFF if wide else cd_size,
                                0xFFFFFFFF if wide else cd_at, 0))


def pack(src: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False,
         progress: Progress | None = None, align: int = ALIGN,
         zip64_limit: int = ZIP64_LIMIT) -> PackResult:
    """Write the zarr trace folder ``src`` as one uncompressed zip ``out`` (see the module
    docstring). ``zip64_limit`` lowers the size from which ZIP64 records are written (tests)."""
    src, out = Path(src), Path(out)
    status = _check_source(src)
    _check_out(src, out, overwrite)
    files, skipped = _store_files(src)
    total = sum(size for _, size, _ in files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    tmp = _temp_sibling(out, "packing")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        writer = _ZipWriter(fd, align, zip64_limit)
        for key, size, mtime in files:
            src_fd = os.open(src / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                writer.add(key, src_fd, size, mtime, advance)
            finally:
                os.close(src_fd)
        writer.finish()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    _replace(tmp, out)
    return PackResult(out, len(files), writer.at, status, writer.zip64, skipped)


def unpack(pack_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
           overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Restore the trace folder held by ``pack_path`` at ``out``, checking every file's
    CRC-32; the folder appears only when complete."""
    pack_path, out = Path(pack_path), Path(out)
    if not pack_path.is_file():
        raise TraceError(f"{pack_path} is not a file")
    with open(pack_path, "rb") as f:
        if not detect(f.read(4)):
            raise NotATraceError(f"{pack_path} is not a pack (no zip signature)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TraceError(f"{out} already exists (use --force to replace it)")
        if out.resolve() == pack_path.resolve():
            raise TraceError("source and destination are the same")
    with ZipSource(LocalFileSource(pack_path)) as source:
        keys = source.names()
        if source.size("zarr.json") is None:
            raise NotATraceError(f"{pack_path} holds no zarr.json at its root: not a packed "
                                 f"trace")
        total = sum(source.size(k) or 0 for k in keys)
        tmp = _temp_sibling(out, "unpacking")
        tmp.mkdir()
        try:
            done = 0
            for key in keys:
                done = _unpack_one(source, key, tmp, done, total, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _replace(tmp, out)
    return out


def _unpack_one(source: ZipSource, key: str, root: Path, done: int, total: int,
                progress: Progress | None) -> int:
    """Copy entry ``key`` to ``root/key`` block by block, checking its CRC-32."""
    size = source.size(key) or 0
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    crc = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        for lo in range(0, size, _BLOCK):
            block = np.empty(min(_BLOCK, size - lo), np.uint8)
            source.fetch([Read(key, lo, block)])
            crc = zlib.crc32(block, crc)
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
            done += block.nbytes
            if progress:
                progress(done, total)
    finally:
        os.close(fd)
    if crc != source.entry_crc(key):
        raise CorruptTraceError(f"{source.describe(key)} fails its CRC-32 (corrupt pack)")
    return done
