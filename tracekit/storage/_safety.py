"""Reading the files of an untrusted trace without escaping it, hanging or over-allocating.

A trace folder is hostile input: any file in it may be a symbolic link (to ``/etc/passwd``, to
``/dev/urandom``), a FIFO (which blocks whoever opens or reads it), a device, or far larger
than its kind of file ever is. Every file tracekit reads from a trace folder is opened here:

* relative to a descriptor of the trace's folder, one path component at a time, each with
  ``O_NOFOLLOW`` (no link is followed, not even to a file inside the trace);
* non-blocking (a FIFO opens at once instead of waiting for a writer), then ``fstat``-ed and
  refused unless it is a regular file;
* read with a hard byte cap (``cap + 1`` bytes are asked for), never trusting ``stat``'s size
  (``/proc`` files and devices say 0).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import CorruptTraceError, MetadataError, MissingArrayError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: What a path component that is a symbolic link fails with under ``O_NOFOLLOW``.
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)


class LinkError(CorruptTraceError):
    """A file of the trace is a symbolic link, or not a regular file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _open_step(name: str, flags: int, dir_fd: int, rel: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS or (exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY
                                         and _is_link(name, dir_fd)):
            raise LinkError(f"{rel} is a symbolic link; a trace never follows links "
                            f"(they could point anywhere on this machine)") from exc
        raise


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_dir(path: str | os.PathLike[str]) -> int:
    """A descriptor of a trace's own folder (the path the user gave may itself be a link)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_beneath(dir_fd: int, rel: str) -> int:
    """Open regular file ``rel`` ("a/b/c", "/"-separated) beneath the folder ``dir_fd``
    without following any link; raises LinkError for links and for anything but a regular
    file, FileNotFoundError when absent."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise CorruptTraceError(f"{rel!r} is not a path inside the trace")
    fds: list[int] = []
    try:
        at = dir_fd
        for part in parts[:-1]:
            at = _open_step(part, _DIR_FLAGS, at, rel)
            fds.append(at)
        fd = _open_step(parts[-1], _FILE_FLAGS, at, rel)
    finally:
        for d in fds:
            os.close(d)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
        raise LinkError(f"{rel} is {_kind(mode)}, not a regular file")
    return fd


def open_dir_beneath(dir_fd: int, rel: str) -> int:
    """Open folder ``rel`` beneath the folder ``dir_fd`` without following any link (each
    component with ``O_NOFOLLOW``); LinkError for a link, FileNotFoundError when absent."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise CorruptTraceError(f"{rel!r} is not a path inside the trace")
    at = dir_fd
    for i, part in enumerate(parts):
        nxt = _open_step(part, _DIR_FLAGS, at, rel)
        if i:
            os.close(at)
        at = nxt
    return at


def open_file(root: Path, rel: str) -> int:
    """``open_beneath`` from a trace folder given by path."""
    dfd = open_dir(root)
    try:
        return open_beneath(dfd, rel)
    finally:
        os.close(dfd)


def read_fd_capped(fd: int, cap: int) -> bytes | None:
    """Up to ``cap`` bytes of an open file from its start; None when it holds more."""
    chunks = []
    want = cap + 1
    offset = 0
    while want > 0:
        block = os.pread(fd, min(want, 1 << 20), offset)
        if not block:
            break
        chunks.append(block)
        offset += len(block)
        want -= len(block)
    data = b"".join(chunks)
    return None if len(data) > cap else data


def read_capped(root: Path, rel: str, cap: int, what: str) -> bytes:
    """The bytes of regular file ``rel`` under the trace folder ``root``, at most ``cap`` of
    them (MetadataError beyond); MissingArrayError when absent."""
    try:
        fd = open_file(root, rel)
    except FileNotFoundError as exc:
        raise MissingArrayError(f"{what}: {rel} is missing") from exc
    except LinkError as exc:
        raise MetadataError(f"{what}: {exc}") from exc
    except OSError as exc:  # a directory named zarr.json, a component that is a file, ...
        raise MetadataError(f"{what}: {rel} is unreadable ({os.strerror(exc.errno or 0)})"
                            ) from exc
    try:
        data = read_fd_capped(fd, cap)
    except OSError as exc:
        raise MetadataError(f"{what}: {rel} is unreadable ({os.strerror(exc.errno or 0)})"
                            ) from exc
    finally:
        os.close(fd)
    if data is None:
        raise MetadataError(f"{what}: {rel} is larger than the limit of {cap} bytes")
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_encodable(obj: Any, raw: bytes, what: str) -> None:
    """MetadataError when JSON text ``raw`` (parsed as ``obj``) holds a lone UTF-16 surrogate
    (``"\\udc80"``): such a string cannot be written as UTF-8, so no output could show it."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    import json

    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MetadataError(f"{what}: metadata holds a lone UTF-16 surrogate "
                            f"(not valid Unicode text)") from exc
