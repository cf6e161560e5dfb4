"""Chunk checksums as the containers define them, so that any zarr or HDF5 reader verifies them.

* zarr v3: the ``crc32c`` codec, the last of an array's codecs: a chunk file is the encoded
  chunk followed by the CRC-32C (Castagnoli) of it, 4 bytes little-endian (zarr-python computes
  it with ``google_crc32c``, as here).
* HDF5: the Fletcher-32 filter (id 3): a stored chunk is the chunk followed by HDF5's
  Fletcher-32 of it, 4 bytes little-endian. HDF5's variant sums big-endian 16-bit words, folds
  the sums every 360 words and keeps 0xffff for a non-zero multiple of 65535; it is computed
  here by HDF5's own ``H5_checksum_fletcher32`` (a numpy equivalent where that cannot be found).

tracekit writes uncompressed chunks itself, rows in place: it keeps a running CRC-32C of the
bytes of each chunk written so far and extends it over the chunk's zero tail arithmetically
(:func:`crc32c_zeros`), so a commit costs a checksum of what it writes, not of the chunk.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from ..format import CHUNK_CHECKSUM_BYTES

_CASTAGNOLI = 0x82F63B78  # CRC-32C polynomial, bit-reversed


def trailer(value: int) -> bytes:
    """The 4 bytes a checksum is stored as (little-endian, as zarr's codec and HDF5's filter)."""
    return int(value).to_bytes(CHUNK_CHECKSUM_BYTES, "little")


def as_bytes(data: Any) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array (what the checksum functions take)."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def crc32c(parts: Sequence[Any], crc: int = 0) -> int:
    """CRC-32C of ``crc``'s bytes followed by ``parts`` (arrays or bytes), as zarr's codec."""
    for part in parts:
        if len(part):
            crc = google_crc32c.extend(crc, part if isinstance(part, bytes) else as_bytes(part))
    return crc


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32C polynomial (bit-reversed, as zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CASTAGNOLI if b & 1 else b >> 1


@functools.cache
def _x2n_table() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial, k = 0..63 (bit-reversed)."""
    p, table = 1 << 30, []  # x^1
    for _ in range(64):
        table.append(p)
        p = _multmodp(p, p)
    return tuple(table)


def crc32c_zeros(crc: int, nbytes: int) -> int:
    """The CRC-32C of ``crc``'s bytes followed by ``nbytes`` zero bytes, in O(log n): appending
    zeros multiplies the CRC register by x^(8n) (zlib's ``crc32_combine``)."""
    if nbytes <= 0:
        return crc
    if nbytes <= 4096:
        return google_crc32c.extend(crc, bytes(nbytes))
    table, k, n, x = _x2n_table(), 3, nbytes, 1 << 31  # x^0
    while n:
        if n & 1:
            x = _multmodp(table[k & 63], x)
        n >>= 1
        k += 1
    return _multmodp(x, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


class RunningCrc:
    """Writes rows into chunk files in place, each followed by the chunk's CRC-32C (zarr's
    crc32c codec), hashing only the bytes each write adds: it keeps the CRC of the prefix of
    each chunk written so far (rows are written in order; the rest of a chunk is still zeros,
    its fill value) and extends it over the zero tail arithmetically."""

    def __init__(self) -> None:
        self._state: dict[Any, tuple[int, int]] = {}  # chunk -> (prefix bytes, its CRC)
        self._stale: set[Any] = set()  # chunks whose write failed before their checksum

    def write(self, chunk: Any, fd: int, parts: list[np.ndarray], offset: int,
              chunk_bytes: int, new: bool, pwritev: Any) -> None:
        """Write ``parts`` (uint8) at ``offset`` of chunk file ``fd`` (``new``: all zeros so
        far), then the chunk's checksum at ``chunk_bytes``: in the same write when the rows
        end the chunk (a counter rewritten whole is then one write, never torn)."""
        size = sum(len(p) for p in parts)
        if new or (offset == 0 and size == chunk_bytes):
            self._state[chunk] = (0, 0)
        self._stale.add(chunk)
        end, crc = self._state.get(chunk, (-1, 0))
        if offset >= end >= 0:
            crc = crc32c(parts, crc32c_zeros(crc, offset - end))
            self._state[chunk] = (offset + size, crc)
            tail = trailer(crc32c_zeros(crc, chunk_bytes - offset - size))
            if offset + size == chunk_bytes:
                pwritev(fd, [*parts, np.frombuffer(tail, np.uint8)], offset)
            else:
                pwritev(fd, parts, offset)
                pwritev(fd, [np.frombuffer(tail, np.uint8)], chunk_bytes)
        else:  # a prefix this writer did not hash, or rows again: hash the stored chunk

            pwritev(fd, parts, offset)
            self._rehash(chunk, fd, chunk_bytes, pwritev)
        self._stale.discard(chunk)

    def _rehash(self, chunk: Any, fd: int, chunk_bytes: int, pwritev: Any) -> None:
        import os

        data = np.frombuffer(os.pread(fd, chunk_bytes, 0), np.uint8)
        crc = crc32c([data])
        self._state[chunk] = (len(data), crc)
        pwritev(fd, [np.frombuffer(trailer(crc32c_zeros(crc, chunk_bytes - len(data))),
                                   np.uint8)], chunk_bytes)

    def forget(self) -> None:
        """Chunks were written by other means (zarr-python): hash them again when next written."""
        self._state.clear()

    def repair(self, open_chunk: Any, pwritev: Any) -> None:
        """Give each chunk a failed write left with a stale checksum the checksum of what it
        holds (before the trace is finalized). ``open_chunk(chunk)``: (fd, data bytes) of its
        file, or None where it no longer exists."""
        import os

        for chunk in sorted(self._stale):
            opened = open_chunk(chunk)
            if opened is None:
                continue
            fd, chunk_bytes = opened
            try:
                self._rehash(chunk, fd, chunk_bytes, pwritev)
            finally:
                os.close(fd)
        self._stale.clear()


# -- HDF5's Fletcher-32 ---------------------------------------------------------------------
@functools.cache
def hdf5_function(name: str) -> Any:
    """A function of the HDF5 library h5py loaded (found among the process's mapped files),
    for what h5py does not wrap; None where it cannot be found."""
    import h5py  # noqa: F401 - loads the library

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    loaded = sorted(set(re.findall(r"(/\S*/libhdf5(?:-[0-9a-f]+)?\.so[.0-9]*)\s*$", maps,
                                   re.MULTILINE)))
    for lib_path in loaded:
        try:
            return getattr(ctypes.CDLL(lib_path), name)
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def _hdf5_fletcher32() -> Any:
    fn = hdf5_function("H5_checksum_fletcher32")
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_uint32
    return fn


def fletcher32(data: np.ndarray) -> int:
    """HDF5's Fletcher-32 of a contiguous buffer (ctypes releases the GIL while it runs)."""
    data = as_bytes(data)
    fn = _hdf5_fletcher32()
    if fn is not None:
        return int(fn(data.ctypes.data, data.nbytes))
    return fletcher32_numpy(data)


def fletcher32_numpy(data: np.ndarray) -> int:
    """HDF5's Fletcher-32 in numpy: sum1 = sum of the words, sum2 = sum of the running sums,
    both modulo 65535, kept as 0 only when every word is 0 (HDF5's folding never reaches 0
    from a positive sum)."""
    data = as_bytes(data)
    if len(data) % 2:
        data = np.concatenate([data, np.zeros(1, np.uint8)])  # HDF5 pads an odd byte with 0
    n = len(data) // 2
    s1 = s2 = 0
    block = 1 << 16
    for lo in range(0, n, block):
        w = data[2 * lo: 2 * min(n, lo + block)].view(">u2").astype(np.uint64)
        weights = np.arange(n - lo, n - lo - len(w), -1, dtype=np.uint64)
        s1 += int(w.sum())
        s2 += int((w * weights).sum())
    if s1 == 0:
        return 0

    def rep(v: int) -> int:
        return (v - 1) % 65535 + 1

    return (rep(s2) << 16) | rep(s1)


def stored_matches(value: int, stored: bytes, kind: str) -> bool:
    """Whether a stored trailer holds ``value``. HDF5 also accepts Fletcher-32 with its bytes
    reversed (what HDF5 before 1.6.3 wrote on little-endian machines), and so does this."""
    got = int.from_bytes(stored, "little")
    if got == value:
        return True
    return kind == "fletcher32" and got == int.from_bytes(stored, "big")


def checksum(kind: str, data: np.ndarray) -> int:
    """The checksum of ``kind`` ('crc32c' or 'fletcher32') of a whole chunk's bytes."""
    return crc32c([data]) if kind == "crc32c" else fletcher32(data)


class ChunkVerifier:
    """Checks an array's chunks against their stored checksums, each chunk once per open.

    ``bound``: committed rows along the array's first axis in a trace still being recorded (or
    whose writer died); a chunk that extends past it may carry a stale checksum (its writer can
    die between writing rows and their checksum) and is not checked. None: check every chunk
    (finalized traces, arrays without a growing first axis)."""

    def __init__(self, name: str, kind: str | None, chunk_rows: int, chunk_bytes: int,
                 describe: Any) -> None:
        self.name, self.kind = name, kind
        self.chunk_rows, self.chunk_bytes = chunk_rows, chunk_bytes
        self.describe = describe  # chunk index -> how errors name the chunk
        self.bound: int | None = None
        self._done: set[Any] = set()

    @property
    def trailer(self) -> int:
        return CHUNK_CHECKSUM_BYTES if self.kind else 0

    def checked_rows(self) -> int | None:
        """Rows from 0 whose chunks are all checked; None when every chunk is."""
        if self.bound is None:
            return None
        return self.bound // self.chunk_rows * self.chunk_rows

    def wants(self, ci: int, key: Any = None) -> bool:
        """Whether chunk ``ci`` (leading index; ``key``: its full index, for arrays chunked
        along another axis too) is still to be checked."""
        return bool(self.kind) and (ci if key is None else key) not in self._done and (
            self.bound is None or (ci + 1) * self.chunk_rows <= self.bound)

    def check_bytes(self, ci: Any, stored: np.ndarray | bytes) -> None:
        """Verify one stored chunk (its bytes with the trailing checksum); raise naming it."""
        from ..errors import CorruptTraceError

        stored = np.frombuffer(stored, np.uint8) if isinstance(stored, bytes) else stored
        if len(stored) < CHUNK_CHECKSUM_BYTES:
            raise CorruptTraceError(f"array {self.name!r}: chunk {self.describe(ci)} is "
                                    f"truncated ({len(stored)} bytes, no checksum)")
        value = checksum(self.kind, stored[:-CHUNK_CHECKSUM_BYTES])  # type: ignore[arg-type]
        tail = bytes(stored[-CHUNK_CHECKSUM_BYTES:])
        if not stored_matches(value, tail, self.kind):  # type: ignore[arg-type]
            raise CorruptTraceError(
                f"array {self.name!r}: chunk {self.describe(ci)} fails its {self.kind} "
                f"checksum (stored {tail[::-1].hex()}, computed {value:08x}): corrupt data")
        self._done.add(ci)


def read_verified(arr: Any, key: tuple, verifier: ChunkVerifier, read: Any,
                  read_unchecked: Any) -> np.ndarray:
    """Read ``arr[key]`` through a library that checks every chunk's checksum (``read``),
    except rows in chunks past the verifier's bound (a trace still being recorded), which
    ``read_unchecked`` reads without the check. When ``read`` fails, the chunk that fails
    its checksum, if one does, is named in the error."""
    from ..errors import CorruptTraceError
    from . import split_rows_key

    edge = verifier.checked_rows() if verifier.kind else None
    split = split_rows_key(key, arr.shape) if edge is not None else None
    if split is not None and split[1] > edge:  # type: ignore[operator]
        start, stop, rest, drop = split
        parts = []
        if start < edge:  # type: ignore[operator]
            parts.append(read_verified(arr, (slice(start, edge), *rest), verifier, read,
                                       read_unchecked))
        parts.append(read_unchecked((slice(max(start, edge), stop), *rest)))  # type: ignore[type-var]
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return rows[0] if drop else rows
    try:
        return read(key)
    except CorruptTraceError:
        if verifier.kind:
            for problem in arr.verify_chunks(verifier.bound):
                raise CorruptTraceError(problem) from None
        raise
