"""zarr's ``crc32c`` codec as tracekit uses it: which arrays have it, a variant that strips the
checksum unchecked (for the chunks of a trace still being recorded that may hold a stale one,
spec section 5), and a check of every stored chunk file (``validate --deep``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import CorruptTraceError
from ._checksums import CHUNK_CHECKSUM_BYTES, ChunkVerifier
from ._safety import open_file, read_fd_capped


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


def verify_chunk_files(name: str, folder: Path, keys: Iterable[str],
                       chunk_bytes: int) -> list[str]:
    """Check the crc32c of each stored chunk file among ``keys`` (absent ones are skipped);
    one line per chunk that fails. A file far larger than its chunk (compressed chunks of
    random bytes grow by a few bytes at most) is reported unread."""
    problems = []
    check = ChunkVerifier(name, "crc32c", 1, 0, str)
    limit = 2 * chunk_bytes + (1 << 16) + CHUNK_CHECKSUM_BYTES
    for key in keys:
        try:
            # Beneath the array's folder, never through a link, regular files only.
            fd = open_file(folder, key)
        except FileNotFoundError:
            continue
        except CorruptTraceError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"array {name!r}: chunk {key} unreadable ({exc})")
            continue
        try:
            data = read_fd_capped(fd, limit)
            if data is None:
                problems.append(f"array {name!r}: chunk {key} has more bytes than a chunk of "
                                f"{chunk_bytes} can take")
                continue
            check.check_bytes(key, np.frombuffer(data, dtype=np.uint8))
        except CorruptTraceError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"array {name!r}: chunk {key} unreadable ({exc})")
        finally:
            os.close(fd)
    return problems
