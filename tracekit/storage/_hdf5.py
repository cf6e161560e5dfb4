"""HDF5 single-file backend, written in SWMR mode so a killed writer leaves a valid file.

Every object (datasets, dimension scales, attributes) is created first; then the file switches
to SWMR, after which only raw data and dataset extents change. Readers open with ``swmr=True``,
which also reads a file whose writer was killed (its consistency flag is still set).
The metadata is a JSON string in the root attribute ``tracekit``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import weakref
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
    TraceError,
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
)
from ._hdf5_array import HDF5Array
from ._hdf5_file import (  # noqa: F401  (re-exported: tests and callers import them from here)
    _H5_ERRORS,
    ALLOWED_FILTERS,
    FLETCHER32,
    FLUSH_HEADROOM,
    FLUSH_MARGIN,
    META_HEADROOM,
    MIN_RESERVE,
    ONE_PAGE_META_BYTES,
    PAGE_BYTES,
    SWMR_READ_ATTEMPTS,
    _check_not_truncated,
    _hdf5_function,
    _helper_pool,
    _open_swmr_reader,
    _read_attempts_setter,
    _superblock_end,
    _unchecked_dxpl,
)
from ._safety import check_encodable


def _close_quietly(f: h5py.File) -> None:
    with contextlib.suppress(*_H5_ERRORS, ValueError):
        f.close()


class HDF5Backend(Backend):
    format_name = "hdf5"

    def __init__(self, path: Path | None, f: h5py.File, final_path: Path | None = None,
                 read_only: bool = False, source: Any = None) -> None:
        self.path = path
        self.location = str(path) if source is None else source.location
        self._f = f
        self._final_path = final_path
        self._read_only = read_only
        self._ahead_fd: int | None = None  # writers: extends the file ahead of HDF5's flushes
        self._can_allocate = True
        self._cached = [0]  # bytes in HDF5's chunk caches, not flushed yet
        # Readers read rows of uncompressed chunks straight from the file, through its source.
        self._source = source

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
    def open(cls, source: Any, writable: bool = False) -> HDF5Backend:
        path, where = source.local_path, source.location
        try:
            if path is None:
                if writable:
                    raise TraceError(f"{where}: only a trace on this machine can be opened "
                                     f"for writing")
                # HDF5 reads the file through a file object over the source: aligned
                # blocks, cached, one ranged request each.
                f = h5py.File(source.open_file(""), "r")
            elif writable:
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
            raise CorruptTraceError(f"{where}: HDF5 file cannot be opened ({exc})") from exc
        try:
            has_meta = ROOT_KEY in f.attrs
        except _H5_ERRORS as exc:
            f.close()
            raise CorruptTraceError(f"{where}: HDF5 root attributes unreadable ({exc})") from exc
        if not has_meta:
            f.close()
            raise NotATraceError(f"{where}: HDF5 file without '{ROOT_KEY}' metadata")
        backend = cls(path, f, read_only=not writable, source=None if writable else source)
        if path is None:
            # h5py must close a file it reads through a file object before that object goes:
            # left to the interpreter's exit, the order is arbitrary and HDF5 crashes.
            weakref.finalize(backend, _close_quietly, f)
        return backend

    # -- metadata ---------------------------------------------------------------------------
    def read_root_meta(self) -> dict[str, Any]:
        try:
            attr_id = self._f.attrs.get_id(ROOT_KEY)
            atype = attr_id.get_type()
            if isinstance(atype, h5py.h5t.TypeStringID) and atype.is_variable_str():
                # A variable-length string's storage size is that of its heap pointer, so its
                # real size cannot be checked before reading it: only fixed-length is allowed.
                raise MetadataError(f"{self.location}: metadata is a variable-length string; "
                                    f"the format stores it as a fixed-length UTF-8 string")
            if attr_id.get_storage_size() > MAX_METADATA_BYTES:
                raise MetadataError(f"{self.location}: metadata larger than {MAX_METADATA_BYTES} B")
            raw = self._f.attrs[ROOT_KEY]
        except KeyError as exc:
            raise NotATraceError(f"{self.location}: no '{ROOT_KEY}' metadata") from exc
        except _H5_ERRORS as exc:
            raise MetadataError(f"{self.location}: metadata unreadable ({exc})") from exc
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        if not isinstance(raw, str):
            raise MetadataError(f"{self.location}: metadata attribute is not a JSON string")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise MetadataError(f"{self.location}: metadata is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise MetadataError(f"{self.location}: metadata is not a JSON object")
        check_encodable(meta, raw.encode("utf-8", "replace"), self.location)
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
        # Chunked along the last axis too (attention's position x key tiles), unfiltered or
        # with Fletcher-32 only: read tile by tile from the file, all of a read's tiles in one
        # batch (concurrently from a URL), each checked against its Fletcher-32 the first time.
        tiled = (filters in ([], [FLETCHER32]) and ds.chunks is not None
                 and dtype.byteorder in ("<", "=", "|") and ds.chunks[1:] != ds.shape[1:]
                 and len(ds.shape) >= 2
                 and ds.chunks[1:-1] == ds.shape[1:-1])
        return HDF5Array(name, ds, dims, source=self._source if raw else None,
                         writable=not self._read_only, raw=raw, checksum=checksum,
                         cached=self._cached, tiled_source=self._source if tiled else None)

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
        if self._source is not None:
            self._source.close()
            self._source = None
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
