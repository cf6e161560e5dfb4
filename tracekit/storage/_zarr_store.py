"""zarr-python's view of a trace: a read-only zarr ``Store`` over a :class:`Source`.

tracekit reads raw chunks itself; zarr-python decodes the compressed ones. Both read the same
bytes through the same source (a local folder, a pack, a URL), with the same limits: metadata
documents at most ``MAX_METADATA_BYTES``, a chunk at most what its array may declare.
Documents already read (the consolidated metadata of a finished trace holds every array's)
are served from memory, so opening an array costs no request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import numpy as np
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)

from ..errors import CorruptTraceError
from ..format import MAX_CHUNK_BYTES
from . import MAX_METADATA_BYTES
from ._source import Read, Source
from ._zarr_checks import CHUNK_FILE_SLACK


def key_cap(key: str) -> int:
    """The most bytes the object ``key`` of a zarr trace may hold."""
    if key.rsplit("/", 1)[-1] == "zarr.json":
        return MAX_METADATA_BYTES
    return MAX_CHUNK_BYTES + CHUNK_FILE_SLACK


def read_key(source: Source, key: str, byte_range: ByteRequest | None) -> bytes | None:
    """A zarr store value (``byte_range`` of it) read from ``source``, capped by
    :func:`key_cap`; None when absent."""
    if byte_range is None:
        return source.get(key, key_cap(key))
    if isinstance(byte_range, RangeByteRequest):
        start, stop = byte_range.start, byte_range.end
    else:
        size = source.size(key)
        if size is None:
            return None
        if isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
    if stop - start > key_cap(key):
        raise CorruptTraceError(f"{key}: a read of {stop - start} bytes exceeds the limit "
                                f"of {key_cap(key)} bytes")
    read = Read(key, start, np.empty(max(0, stop - start), np.uint8))
    source.fetch([read])
    return read.out.tobytes() if read.found else None


class SourceStore(Store):
    """A read-only zarr v3 store whose every read goes through ``source``."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, source: Source, documents: Mapping[str, bytes] | None = None) -> None:
        super().__init__(read_only=True)
        self.source = source
        self._documents = dict(documents or {})

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if byte_range is None and key in self._documents:
            return self._documents[key]
        return read_key(self.source, key, byte_range)

    async def get(self, key: str, prototype: Any = None,
                  byte_range: ByteRequest | None = None) -> Any:
        from zarr.core.buffer.core import default_buffer_prototype

        data = await asyncio.to_thread(self._read, key, byte_range)
        prototype = prototype or default_buffer_prototype()
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Any]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range)
                                           for key, byte_range in key_ranges)))

    async def exists(self, key: str) -> bool:
        if key in self._documents:
            return True
        return await asyncio.to_thread(self.source.size, key) is not None

    async def set(self, key: str, value: Any) -> None:
        raise PermissionError("a trace opened for reading is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError("a trace opened for reading is read-only")

    async def list(self) -> AsyncIterator[str]:
        async for key in self.list_prefix(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        stack = [prefix.rstrip("/")]
        while stack:
            folder = stack.pop()
            for name in await self._names(folder):
                key = f"{folder}/{name}" if folder else name
                if await asyncio.to_thread(self.source.size, key) is None:
                    stack.append(key)  # not an object: a folder
                else:
                    yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for name in await self._names(prefix.rstrip("/")):
            yield name

    async def _names(self, folder: str) -> list[str]:
        names = await asyncio.to_thread(self.source.list, folder)
        return names or []
