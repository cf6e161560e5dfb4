"""HDF5 library and file helpers of the HDF5 backend: its size and filter constants, HDF5
library functions h5py does not wrap (metadata read attempts, checksum check off), the SWMR
reader's opening and the superblock truncation check."""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py

from ..errors import CorruptTraceError
from ..format import HDF5_PAGE_BYTES
from ._checksums import hdf5_function

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
