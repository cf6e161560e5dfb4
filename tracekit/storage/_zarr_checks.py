"""What a zarr array's ``zarr.json`` must look like before anything of it is used, and the
store through which zarr-python reads an untrusted trace.

The checks refuse, with a TraceError naming the array and the field, every document tracekit
or zarr-python would otherwise trip over (a KeyError on a missing ``data_type``, an
AttributeError on a codec ``configuration`` that is a list, numpy allocating a sub-array
``data_type`` such as ``(100000000000,)i8``) or silently misread (a ``v2`` chunk key
encoding: the chunk files are not found and the array reads as zeros), and every chunk too
large to decode in memory.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import zarr.storage

from ..errors import CorruptTraceError, DisallowedCodecError
from ..format import MAX_CHUNK_BYTES, MAX_TRACE_BYTES
from . import ALLOWED_DTYPES

#: zarr v3 ``data_type`` names of the allowed dtypes (never given to numpy unchecked).
DATA_TYPES = {"bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1,
              "uint16": 2, "uint32": 4, "uint64": 8, "float16": 2, "float32": 4, "float64": 8}
assert len(DATA_TYPES) == len(ALLOWED_DTYPES)
MAX_RANK = 32
#: Inner chunks one shard may hold (its index takes 16 bytes each, decoded whole).
MAX_SHARD_CHUNKS = 1 << 20
#: A stored chunk may be larger than its decoded size by a compressor's framing, not more.
CHUNK_FILE_SLACK = 1 << 20


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_list(value: Any, minimum: int) -> bool:
    return isinstance(value, list) and len(value) <= MAX_RANK and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)


def _check_codec_list(name: str, codecs: Any, where: str) -> None:
    if not isinstance(codecs, list):
        raise CorruptTraceError(f"array {name!r}: {where} must be a list, not {_short(codecs)}")
    for codec in codecs:
        if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
            raise CorruptTraceError(f"array {name!r}: {where} entry {_short(codec)} has no "
                                    f"string 'name'")
        conf = codec.get("configuration", {})
        if not isinstance(conf, dict):
            raise CorruptTraceError(f"array {name!r}: codec {codec['name']!r} configuration "
                                    f"must be an object, not {_short(conf)}")
        if codec["name"] == "sharding_indexed":
            _check_codec_list(name, conf.get("codecs", []), "sharding codecs")
            _check_codec_list(name, conf.get("index_codecs", []), "sharding index_codecs")


def _check_sharding(name: str, codecs: list[Any], chunk_shape: list[int]) -> None:
    for codec in codecs:
        if not (isinstance(codec, dict) and codec.get("name") == "sharding_indexed"):
            continue
        inner = codec.get("configuration", {}).get("chunk_shape")
        if not _int_list(inner, 1) or len(inner) != len(chunk_shape):
            raise CorruptTraceError(f"array {name!r}: sharding chunk_shape {_short(inner)} is "
                                    f"not {len(chunk_shape)} positive integers")
        count = math.prod(-(-c // i) for c, i in zip(chunk_shape, inner, strict=True))
        if count > MAX_SHARD_CHUNKS:
            raise CorruptTraceError(f"array {name!r}: a shard of {count} inner chunks exceeds "
                                    f"the limit of {MAX_SHARD_CHUNKS}")


def check_array_metadata(name: str, meta: dict[str, Any]) -> None:
    """Refuse an array ``zarr.json`` whose fields tracekit or zarr-python could not use as
    they are, or whose chunks or whole array declare more bytes than the limits."""
    if meta.get("zarr_format") != 3:
        raise CorruptTraceError(f"array {name!r}: zarr_format is {_short(meta.get('zarr_format'))},"
                                f" expected 3")
    dtype = meta.get("data_type")
    if dtype is None:
        raise CorruptTraceError(f"array {name!r}: data_type is missing")
    if not isinstance(dtype, str) or dtype not in DATA_TYPES:
        raise DisallowedCodecError(f"array {name!r} has disallowed data type {_short(dtype)}")
    shape = meta.get("shape")
    if not _int_list(shape, 0):
        raise CorruptTraceError(f"array {name!r}: malformed shape {_short(shape)}")
    dims = meta.get("dimension_names")
    if not isinstance(dims, list) or len(dims) != len(shape) or not all(
            isinstance(d, str) for d in dims):
        raise CorruptTraceError(f"array {name!r}: dimension_names missing, wrong length or "
                                f"not strings")
    grid = meta.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    chunk_shape = conf.get("chunk_shape") if isinstance(conf, dict) else None
    if (not isinstance(grid, dict) or grid.get("name") != "regular"
            or not _int_list(chunk_shape, 1) or len(chunk_shape) != len(shape)):
        raise CorruptTraceError(f"array {name!r}: malformed chunk grid {_short(grid)}")
    enc = meta.get("chunk_key_encoding")
    enc_conf = enc.get("configuration", {}) if isinstance(enc, dict) else None
    if (not isinstance(enc, dict) or enc.get("name") != "default"
            or not isinstance(enc_conf, dict) or enc_conf.get("separator", "/") not in ("/", ".")):
        raise CorruptTraceError(
            f"array {name!r}: chunk_key_encoding {_short(enc)} is not 'default' with "
            f"separator '/' or '.' (the format's chunk keys; others would read as fill values)")
    if meta.get("storage_transformers", []) != []:
        raise DisallowedCodecError(f"array {name!r}: storage_transformers are not allowed")
    codecs = meta.get("codecs")
    _check_codec_list(name, codecs, "codecs")
    itemsize = DATA_TYPES[dtype]
    chunk_bytes = math.prod(chunk_shape) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise CorruptTraceError(f"array {name!r}: chunk_shape {_short(chunk_shape)} declares "
                                f"{chunk_bytes} bytes per chunk (limit {MAX_CHUNK_BYTES})")
    total = math.prod(shape) * itemsize
    if total > MAX_TRACE_BYTES:
        raise CorruptTraceError(f"array {name!r}: shape {_short(shape)} declares {total} bytes "
                                f"(limit {MAX_TRACE_BYTES} for a whole trace)")
    _check_sharding(name, codecs, chunk_shape)


def _read_key(root: Path, key: str, byte_range: Any) -> bytes | None:
    """One store value, read without following links, from regular files only, capped."""
    from ._source import LocalDirSource
    from ._zarr_store import read_key

    with LocalDirSource(root) as source:
        try:
            return read_key(source, key, byte_range)
        except CorruptTraceError as exc:
            if isinstance(exc.__cause__, (IsADirectoryError, NotADirectoryError)):
                return None
            raise


class SafeLocalStore(zarr.storage.LocalStore):
    """zarr's local store, except that every read goes through :func:`_read_key`: zarr-python
    reads compressed chunks itself, and its own reads follow links and block on FIFOs."""

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        from zarr.core.buffer.core import default_buffer_prototype

        self._ensure_open_sync()
        data = _read_key(self.root, key, byte_range)
        prototype = prototype or default_buffer_prototype()
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        from zarr.core.buffer.core import default_buffer_prototype

        if not self._is_open:
            await self._open()
        data = await asyncio.to_thread(_read_key, self.root, key, byte_range)
        prototype = prototype or default_buffer_prototype()
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
