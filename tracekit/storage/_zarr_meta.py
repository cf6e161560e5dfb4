"""The zarr v3 metadata documents of the zarr backend: reading and atomically writing
``zarr.json``, the codec allowlist, array and group documents, chunk keys and the removal of
chunks outside a shrunk grid. Importing it registers the size-bounded gzip/zstd/blosc
decoders (against decompression bombs) with zarr."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import (
    CorruptTraceError,
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
)
from ..format import ROOT_KEY
from . import MAX_METADATA_BYTES
from ._safety import LinkError, check_encodable
from ._zarr_checksums import (
    CHECKED_CRC32C,
    UNCHECKED_CRC32C,
    has_crc32c,
)

ALLOWED_CODECS = frozenset(
    {"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose", "sharding_indexed"}
)


def _read_json(source: Any, rel: str, what: str) -> dict[str, Any]:
    """The JSON object at key ``rel`` of a trace's ``source``: at most MAX_METADATA_BYTES,
    from a regular file only where the source is a folder (see ``_safety``)."""
    return _parse_json(_read_document(source, rel, what), rel, what)


def _parse_json(raw: bytes, rel: str, what: str) -> dict[str, Any]:
    """The JSON object in document ``rel`` (``raw``, at most MAX_METADATA_BYTES)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise MetadataError(f"{what}: {rel} is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise MetadataError(f"{what}: {rel} is not a JSON object")
    check_encodable(obj, raw, what)
    return obj


def _read_document(source: Any, rel: str, what: str) -> bytes:
    """The bytes of metadata document ``rel``; MissingArrayError when absent,
    MetadataError when unreadable or over the limit."""
    try:
        raw = source.get(rel, MAX_METADATA_BYTES)
    except LinkError as exc:
        raise MetadataError(f"{what}: {exc}") from exc
    except CorruptTraceError as exc:  # over the limit, not a regular file, unreadable
        raise MetadataError(f"{what}: {exc}") from exc
    if raw is None:
        raise MissingArrayError(f"{what}: {rel} is missing")
    return raw


def _check_codecs(name: str, codecs: Any) -> None:
    if not isinstance(codecs, list):
        raise CorruptTraceError(f"array {name!r}: codecs must be a list")
    for codec in codecs:
        cname = codec.get("name") if isinstance(codec, dict) else codec
        if cname not in ALLOWED_CODECS:
            raise DisallowedCodecError(f"array {name!r} uses disallowed codec {cname!r}")
        if cname == "sharding_indexed":
            conf = codec.get("configuration", {})
            _check_codecs(name, conf.get("codecs", []))
            _check_codecs(name, conf.get("index_codecs", []))


# -- decompression bombs --------------------------------------------------------------------
# zarr's compressors inflate a chunk to whatever size its bytes say: a 1 MB gzip chunk became a
# 1 GiB allocation. These read-side variants refuse a chunk that decodes to more bytes than
# the chunk holds, before allocating that much (gzip: bounded inflate; zstd and blosc: their
# headers' sizes are checked against an output buffer of the chunk's size).
def _chunk_nbytes(chunk_spec: Any) -> int:
    return math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize


class _BoundedGzipCodec(zarr.codecs.GzipCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        import zlib

        limit = _chunk_nbytes(chunk_spec)
        inflater = zlib.decompressobj(wbits=31)
        out = inflater.decompress(chunk_bytes.as_numpy_array().tobytes(), limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise ValueError(f"gzip chunk inflates beyond the chunk's {limit} bytes")
        return chunk_spec.prototype.buffer.from_bytes(out)


def _decode_into_chunk(codec: Any, chunk_bytes: Any, chunk_spec: Any) -> Any:
    """numcodecs zstd/blosc check the size in the frame header against ``out`` first."""
    out = np.empty(_chunk_nbytes(chunk_spec), dtype=np.uint8)
    codec.decode(chunk_bytes.as_numpy_array(), out=out)
    return chunk_spec.prototype.buffer.from_bytes(out)


class _BoundedZstdCodec(zarr.codecs.ZstdCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return _decode_into_chunk(self._zstd_codec, chunk_bytes, chunk_spec)


class _BoundedBloscCodec(zarr.codecs.BloscCodec):
    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return _decode_into_chunk(self._blosc_codec, chunk_bytes, chunk_spec)


for _key, _cls in (("gzip", _BoundedGzipCodec), ("zstd", _BoundedZstdCodec),
                   ("blosc", _BoundedBloscCodec)):
    zarr.registry.register_codec(_key, _cls)
#: Used only while tracekit opens an array; zarr's defaults stay as they are elsewhere.
_BOUNDED_CODECS = {f"codecs.{key}": f"{cls.__module__}.{cls.__qualname__}" for key, cls in (
    ("gzip", _BoundedGzipCodec), ("zstd", _BoundedZstdCodec), ("blosc", _BoundedBloscCodec))}


_UNCHECKED_CODECS = {**_BOUNDED_CODECS, **UNCHECKED_CRC32C}
_CHECKED_CODECS = {**_BOUNDED_CODECS, **CHECKED_CRC32C}


def _raw_writable(meta: dict[str, Any]) -> bool:
    """True when chunks are raw little-endian C-order bytes (then their crc32c, if any) whole
    along every axis but the first and the last (attention's key axis is chunked too):
    tracekit writes rows of such arrays into the chunk files itself."""
    codecs = meta.get("codecs")
    if isinstance(codecs, list) and has_crc32c(meta):
        codecs = codecs[:-1]
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)):
        return False
    codec = codecs[0]
    endian = (codec.get("configuration") or {}).get("endian", "little")
    grid = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    enc = meta.get("chunk_key_encoding") or {}
    shape = meta.get("shape")
    return (codec.get("name") == "bytes" and endian == "little" and meta.get("fill_value") == 0
            and isinstance(grid, list) and isinstance(shape, list) and len(grid) == len(shape)
            and len(shape) >= 1 and grid[1:-1] == shape[1:-1] and all(g >= 1 for g in grid)
            and enc.get("name") == "default" and _separator(meta) in ("/", "."))


def _separator(meta: dict[str, Any]) -> str:
    """The separator of the array's ``default`` chunk key encoding (zarr's default is "/")."""
    enc = meta.get("chunk_key_encoding") or {}
    return (enc.get("configuration") or {}).get("separator", "/")


def chunk_key(meta: dict[str, Any], index: Sequence[int]) -> str:
    """The store key of chunk ``index`` under the array's folder: ``c/0/1`` or ``c.0.1``."""
    return _separator(meta).join(["c", *map(str, index)])


def _direct_readable(meta: dict[str, Any]) -> bool:
    """True when chunks are raw little-endian C-order bytes holding whole rows, so rows can be
    read with plain file reads (the layout tracekit writes for uncompressed arrays)."""
    if not _raw_writable(meta):
        return False
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return grid[1:] == meta["shape"][1:]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a metadata document atomically (temporary file, then rename), as zarr does."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(obj))  # no indent: json's C encoder runs only without one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write leaves no stray temporary file
        raise


def array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                   dims: tuple[str, ...], attrs: dict[str, Any],
                   compression: str | None, separator: str = ".",
                   checksum: bool = True) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of a regular-grid array with fill value 0, the document
    zarr-python writes for the same array (tests check that zarr and xarray open it).
    ``checksum``: end every chunk with its CRC-32C (the ``crc32c`` codec, format 1.1).

    Chunk keys use ``separator``: "." keeps an array's chunks as files of its one folder;
    with zarr's default "/" every new chunk along positions needs new directories, which
    cost more than writing the chunk."""
    dtype = np.dtype(dtype)
    codecs: list[dict[str, Any]] = [
        {"name": "bytes"} if dtype.itemsize == 1 else
        {"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    elif compression == "gzip":
        codecs.append({"name": "gzip", "configuration": {"level": 1}})
    elif compression == "packed":  # written once, read whole: byte shuffle + zstd
        codecs.append({"name": "blosc", "configuration": {
            "typesize": dtype.itemsize, "cname": "zstd", "clevel": 5,
            "shuffle": "shuffle" if dtype.itemsize > 1 else "noshuffle", "blocksize": 0}})
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}")
    if checksum:
        codecs.append({"name": "crc32c"})
    fill: Any = False if dtype.kind == "b" else (0.0 if dtype.kind == "f" else 0)
    return {
        "shape": [int(n) for n in shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [int(c) for c in chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": dict(attrs),
        "dimension_names": list(dims),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _remove_chunks_outside(folder: Path, meta: dict[str, Any], old: list[int],
                           new: list[int]) -> None:
    """Delete the chunk files wholly outside a smaller chunk grid (as zarr's resize does);
    ``old`` and ``new`` count chunks per axis. With "/" keys only axes that shrank are walked."""
    last = max((i for i, (a, b) in enumerate(zip(old, new, strict=True)) if b < a), default=-1)
    if last < 0:
        return
    if _separator(meta) == ".":
        for entry in os.scandir(folder):
            parts = entry.name.split(".")
            if parts[0] != "c" or len(parts) != len(new) + 1:
                continue
            try:
                index = [int(x) for x in parts[1:]]
            except ValueError:
                continue
            if any(i >= n for i, n in zip(index, new, strict=True)):
                os.unlink(entry.path)
        return

    def walk(path: str, depth: int) -> None:
        for entry in os.scandir(path):
            try:
                index = int(entry.name)
            except ValueError:
                continue
            if index >= new[depth]:
                shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
            elif depth < last and entry.is_dir():
                walk(entry.path, depth + 1)

    if (folder / "c").is_dir():
        walk(str(folder / "c"), 0)


def _group_document(meta: dict[str, Any],
                    arrays: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The root group's zarr.json: tracekit's metadata as its one attribute and, once sealed,
    every array's metadata consolidated inline."""
    consolidated = None if arrays is None else {
        "kind": "inline", "must_understand": False, "metadata": dict(sorted(arrays.items()))}
    return {"attributes": {ROOT_KEY: meta}, "zarr_format": 3,
            "consolidated_metadata": consolidated, "node_type": "group"}
