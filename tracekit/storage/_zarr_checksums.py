"""zarr's ``crc32c`` codec as tracekit uses it: which arrays have it, a variant that strips the
checksum unchecked (for the chunks of a trace still being recorded that may hold a stale one,
spec section 5), and a check of every stored chunk file (``validate --deep``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import CorruptTraceError
from ._checksums import CHUNK_CHECKSUM_BYTES, ChunkVerifier
from ._source import Read


class UncheckedCrc32cCodec(zarr.codecs.Crc32cCodec):
    """Strips the checksum without checking it: for the chunks a trace still being recorded
    may hold with a stale checksum (past its committed rows), and for nothing else."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        data = chunk_bytes.as_numpy_array()[:-CHUNK_CHECKSUM_BYTES]
        return chunk_spec.prototype.buffer.from_array_like(data)


zarr.registry.register_codec("crc32c", zarr.codecs.Crc32cCodec)  # zarr's own stays the default
zarr.registry.register_codec("crc32c", UncheckedCrc32cCodec)
#: zarr config entries choosing the crc32c implementation (used while opening an array).
CHECKED_CRC32C = {"codecs.crc32c": "zarr.codecs.crc32c_.Crc32cCodec"}
UNCHECKED_CRC32C = {"codecs.crc32c": f"{__name__}.UncheckedCrc32cCodec"}


def has_crc32c(meta: dict[str, Any]) -> bool:
    """Whether an array's chunks end with zarr's crc32c checksum (its last codec)."""
    codecs = meta.get("codecs")
    return (isinstance(codecs, list) and len(codecs) >= 2 and isinstance(codecs[-1], dict)
            and codecs[-1].get("name") == "crc32c")


def verify_chunk_files(name: str, source: Any, keys: Sequence[str],
                       chunk_bytes: int) -> list[str]:
    """Check the crc32c of each stored chunk of array ``name`` among ``keys`` (absent ones are
    skipped), read from ``source`` a batch at a time; one line per chunk that fails. A chunk
    far larger than its chunk (compressed chunks of random bytes grow by a few bytes at
    most) is reported unread."""
    problems = []
    check = ChunkVerifier(name, "crc32c", 1, 0, str)
    limit = 2 * chunk_bytes + (1 << 16) + CHUNK_CHECKSUM_BYTES
    batch = max(1, (64 << 20) // max(1, limit))  # about 64 MiB in flight at once
    for at in range(0, len(keys), batch):
        part = keys[at: at + batch]
        try:
            sizes = source.sizes([f"{name}/{key}" for key in part])
        except CorruptTraceError as exc:  # a link, a FIFO...: find which, one by one
            if len(part) == 1:
                problems.append(str(exc))
            else:
                for key in part:
                    problems += verify_chunk_files(name, source, [key], chunk_bytes)
            continue
        reads, which = [], []
        for key, size in zip(part, sizes, strict=True):
            if size is None:
                continue
            if size > limit:
                problems.append(f"array {name!r}: chunk {key} has more bytes than a chunk of "
                                f"{chunk_bytes} can take")
                continue
            reads.append(Read(f"{name}/{key}", 0, np.empty(size, np.uint8), whole=size))
            which.append(key)
        try:
            source.fetch(reads)
        except CorruptTraceError as exc:  # one unreadable chunk: check them one by one
            if len(reads) == 1:
                problems.append(f"array {name!r}: chunk {which[0]} unreadable ({exc})")
                continue
            for key in which:
                problems += verify_chunk_files(name, source, [key], chunk_bytes)
            continue
        for key, read in zip(which, reads, strict=True):
            if not read.found:
                continue
            try:
                check.check_bytes(key, read.out)
            except CorruptTraceError as exc:
                problems.append(str(exc))
    return problems
