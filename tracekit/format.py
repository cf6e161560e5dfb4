"""The logical trace model of format v1: which arrays exist, their dimensions, dtypes and chunks.

This module is pure data and arithmetic (numpy only). Storage backends, the writer and the reader
all derive what they do from :class:`TracePlan`, so that the spec in ``schemas/`` is implemented
in exactly one place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from ._sizes import (  # noqa: F401  (part of the format module's names)
    ATTENTION_TILES,
    CHUNK_CHECKSUM_BYTES,
    COORD_CHUNK,
    HDF5_ARRAY_BYTES,
    HDF5_BASE_BYTES,
    HDF5_CHUNK_BYTES,
    HDF5_PAGE_BYTES,
    MIN_ATTENTION_TILE,
    VOCAB_ID_COST,
    VOCAB_TEXT_BYTE_COST,
    ZARR_ARRAY_BYTES,
    ZARR_BASE_BYTES,
    _fill_pages,
)
from ._specs import (  # noqa: F401  (part of the format module's names)
    ARRAY_SPECS,
    CAPTURE_GROUPS,
    DIMENSIONS,
    PACKED,
    SPECS_BY_NAME,
    STEP_INPUT_ARRAYS,
    VOCAB_GROUP,
    ArraySpec,
)
from .errors import CorruptTraceError, MetadataError

SCHEMA_NAME = "tracekit.trace"
FORMAT_VERSION = (1, 1)
FORMAT_VERSION_STR = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
ROOT_KEY = "tracekit"  # root attribute that holds the metadata object

#: ``truncated``: recording stopped before its planned end because the next step would have
#: taken the trace past its size cap (``--max-size``); every committed step is intact.
STATUSES = ("recording", "complete", "aborted", "truncated")


#: Stored dtypes for activations. bfloat16 is stored as uint16 bits with ``logical_dtype``.
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")

#: Dimensions whose length grows with the recording (trimmed to the committed length at the end).
GROWING_DIMS = ("position", "step", "key")

# Safety limits checked before anything is allocated when opening untrusted files.
MAX_POSITIONS = 1 << 24
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_TOP_K = 1024
MAX_TOKEN_BYTES = 4096
# A stored vocabulary is read whole: bounded well above real ones (256k ids, ~2 MiB of text).
MAX_VOCAB_SIZE = 1 << 22
MAX_VOCAB_BYTES = 1 << 26
#: Bytes one stored chunk may declare (chunk shape x item size): a chunk is decoded whole, so
#: this bounds what decoding one costs. Far above any model's row (a 405B model's ``neurons``
#: row is 13 MB), far below a machine's memory.
MAX_CHUNK_BYTES = 256 << 20
#: Bytes all arrays of a trace may declare together (shapes x item sizes, allocated lengths).
#: The per-dimension limits alone allowed products far beyond any disk (and int64). 16 TiB
#: holds full-length attention of a 70B model at 32k positions.
MAX_TRACE_BYTES = 1 << 44

DEFAULT_TOP_K = 10
DEFAULT_ATTENTION_TOP_K = 8
DEFAULT_TOKEN_BYTES = 64
DEFAULT_CHUNK_BYTES = 4 << 20
STEP_CHUNK = 4096


def storage_dtype(logical: str) -> np.dtype:
    """The numpy dtype an array is stored with: bfloat16 travels as its uint16 bits."""
    if logical == "bfloat16":
        return np.dtype(np.uint16)
    return np.dtype(logical)


def logical_numpy_dtype(logical: str) -> np.dtype:
    """The numpy dtype readers hand out (ml_dtypes.bfloat16 for bfloat16)."""
    if logical == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(logical)


@dataclass(frozen=True)
class ModelInfo:
    """What the recorded model is. Stored under ``model`` in the metadata."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    d_mlp: int | None = None
    architecture: str | None = None
    model_type: str | None = None
    kind: str = "causal"  # "causal" (generates) or "encoder" (one forward step)
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "kind": self.kind,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ModelInfo:
        return cls(
            name=obj["name"],
            n_layers=int(obj["n_layers"]),
            d_model=int(obj["d_model"]),
            n_heads=int(obj["n_heads"]),
            vocab_size=int(obj["vocab_size"]),
            d_mlp=None if obj.get("d_mlp") is None else int(obj["d_mlp"]),
            architecture=obj.get("architecture"),
            model_type=obj.get("model_type"),
            kind=obj.get("kind", "causal"),
            revision=obj.get("revision"),
        )


@dataclass(frozen=True)
class TracePlan:
    """Everything that fixes a trace's layout before recording starts.

    ``layers`` are the block indices captured; residual points are the inputs and outputs of
    those blocks (point ``p`` is the input of block ``p``; point ``n_layers`` is the output of
    the last block, before the final norm).
    """

    model: ModelInfo
    max_positions: int
    captured: frozenset[str] = frozenset(CAPTURE_GROUPS)
    layers: tuple[int, ...] | None = None
    stored_dtype: str = "float16"
    top_k: int = DEFAULT_TOP_K
    attention_top_k: int = DEFAULT_ATTENTION_TOP_K
    token_bytes: int = DEFAULT_TOKEN_BYTES
    compression: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Total bytes of the stored vocabulary's texts; None when the trace stores no vocabulary.
    vocab_bytes: int | None = None
    _chunk_positions: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        layers = tuple(range(self.model.n_layers)) if self.layers is None else self.layers
        object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in layers))))
        object.__setattr__(self, "captured", frozenset(self.captured))
        self.check()

    # -- validation -------------------------------------------------------------------------
    def check(self) -> None:
        """Raise MetadataError when the plan is inconsistent or exceeds the safety limits."""
        m = self.model
        problems = []
        unknown = set(self.captured) - set(CAPTURE_GROUPS)
        if unknown:
            problems.append(f"unknown capture group(s) {sorted(unknown)}; known: {CAPTURE_GROUPS}")
        if self.stored_dtype not in ACTIVATION_DTYPES:
            problems.append(f"stored dtype {self.stored_dtype!r} not one of {ACTIVATION_DTYPES}")
        if not 1 <= self.max_positions <= MAX_POSITIONS:
            problems.append(f"max_positions {self.max_positions} outside 1..{MAX_POSITIONS}")
        for label, value, cap in (
            ("n_layers", m.n_layers, MAX_LAYERS),
            ("d_model", m.d_model, MAX_DIM),
            ("n_heads", m.n_heads, MAX_HEADS),
            ("vocab_size", m.vocab_size, 1 << 31),
            ("top_k", self.top_k, MAX_TOP_K),
            ("attention_top_k", self.attention_top_k, MAX_TOP_K),
            ("token_bytes", self.token_bytes, MAX_TOKEN_BYTES),
        ):
            if not isinstance(value, int) or not 1 <= value <= cap:
                problems.append(f"{label} = {value!r} outside 1..{cap}")
        if m.d_mlp is not None and not 1 <= m.d_mlp <= MAX_DIM:
            problems.append(f"d_mlp = {m.d_mlp!r} outside 1..{MAX_DIM}")
        if "neurons" in self.captured and m.d_mlp is None:
            problems.append("capturing neurons needs model.d_mlp")
        if m.kind not in ("causal", "encoder"):
            problems.append(f"model kind {m.kind!r} is neither 'causal' nor 'encoder'")
        if not self.layers:
            problems.append("no layers selected")
        elif self.layers[0] < 0 or self.layers[-1] >= m.n_layers:
            problems.append(f"layers {list(self.layers)} outside 0..{m.n_layers - 1}")
        if self.vocab_bytes is not None:
            if not isinstance(self.vocab_bytes, int) or not (
                    0 <= self.vocab_bytes <= MAX_VOCAB_BYTES):
                problems.append(f"vocab_bytes = {self.vocab_bytes!r} outside 0..{MAX_VOCAB_BYTES}")
            if m.vocab_size > MAX_VOCAB_SIZE:
                problems.append(f"a stored vocabulary of {m.vocab_size} ids exceeds "
                                f"{MAX_VOCAB_SIZE}")
        if self.compression not in (None, "zstd", "gzip"):
            problems.append(f"compression {self.compression!r} not one of none, zstd, gzip")
        if not problems:
            problems += self._size_problems()
        if problems:
            raise MetadataError("; ".join(problems))

    def _size_problems(self) -> list[str]:
        """The trace-wide budget: declared bytes of every array, and of each one's chunks."""
        problems = []
        total = self.declared_bytes()
        if total > MAX_TRACE_BYTES:
            problems.append(f"the layout declares {total} bytes of arrays (limit "
                            f"{MAX_TRACE_BYTES})")
        for spec in self.array_specs():
            item = storage_dtype(self.logical_dtype(spec)).itemsize
            chunk = math.prod(self.chunks(spec)) * item
            if chunk > MAX_CHUNK_BYTES:
                problems.append(f"array {spec.name!r}: chunks of {chunk} bytes (limit "
                                f"{MAX_CHUNK_BYTES}); lower chunk_positions")
                break
        return problems

    # -- derived layout ---------------------------------------------------------------------
    @property
    def has_vocab(self) -> bool:
        """Whether the trace stores the text of every token id (``vocab_*`` arrays)."""
        return self.vocab_bytes is not None

    @property
    def points(self) -> tuple[int, ...]:
        """Residual-stream points captured: input and output of every captured block."""
        return tuple(sorted({p for layer in self.layers for p in (layer, layer + 1)}))

    def dim_sizes(self) -> dict[str, int]:
        """Length of every dimension at allocation time."""
        return dict(self._dim_sizes)

    @functools.cached_property
    def _dim_sizes(self) -> dict[str, int]:
        return {
            "position": self.max_positions,
            "step": self.max_positions,
            "key": self.max_positions,
            "point": len(self.points),
            "layer": len(self.layers),
            "head": self.model.n_heads,
            "hidden": self.model.d_model,
            "neuron": self.model.d_mlp or 0,
            "rank": self.top_k,
            "attn_rank": self.attention_top_k,
            "bound": 2,
            "byte": self.token_bytes,
            "commit_field": 2,
            "vocab": self.model.vocab_size if self.has_vocab else 0,
            "vocab_byte": self.vocab_bytes or 0,
        }

    def coordinate_values(self, dim: str) -> np.ndarray:
        """Values of the coordinate array of ``dim`` (indices unless the dim is a selection)."""
        if dim == "point":
            return np.asarray(self.points, dtype=np.int64)
        if dim == "layer":
            return np.asarray(self.layers, dtype=np.int64)
        return np.arange(self.dim_sizes()[dim], dtype=np.int64)

    def array_specs(self) -> list[ArraySpec]:
        """Specs of the data arrays this plan writes (coordinates excluded)."""
        return [s for s in ARRAY_SPECS if s.group is None or s.group in self.captured
                or (s.group == VOCAB_GROUP and self.has_vocab)]

    def used_dims(self) -> list[str]:
        used = {d for s in self.array_specs() for d in s.dims}
        return [d for d in DIMENSIONS if d in used]

    def logical_dtype(self, spec: ArraySpec) -> str:
        return self.stored_dtype if spec.dtype == "activation" else spec.dtype

    def shape(self, spec: ArraySpec) -> tuple[int, ...]:
        sizes = self.dim_sizes()
        return tuple(sizes[d] for d in spec.dims)

    def _row_bytes(self, spec: ArraySpec) -> int:
        """Bytes of one position of one chunk of ``spec`` (the key axis counts one tile)."""
        sizes = self.dim_sizes()
        n = 1
        for d in spec.dims[1:]:
            n *= self.attention_tile[1] if d == "key" else sizes[d]
        return n * storage_dtype(self.logical_dtype(spec)).itemsize

    @functools.cached_property
    def attention_tile(self) -> tuple[int, int]:
        """(positions, keys) of one tile of the key-indexed arrays (attention).

        Square, ``max_positions / ATTENTION_TILES`` on a side (at least
        ``MIN_ATTENTION_TILE`` and about a page, at most the length); halved along positions,
        then keys, while a tile would exceed ``chunk_bytes`` (models with many layers x heads);
        then reshaped by a few rows or keys to fill its HDF5 pages (:func:`_fill_pages`)."""
        P = self.max_positions
        cell = len(self.layers) * self.model.n_heads * storage_dtype(self.stored_dtype).itemsize
        # Not below about a page either: a zarr tile is a file, and takes a block.
        fill = math.isqrt(max(1, (HDF5_PAGE_BYTES - CHUNK_CHECKSUM_BYTES) // cell))
        side = max(MIN_ATTENTION_TILE, fill, P // ATTENTION_TILES)
        rows, keys = min(side, P), min(side, P)
        while rows * keys * cell > self.chunk_bytes and max(rows, keys) > 1:
            if rows >= keys:
                rows = max(1, rows // 2)
            else:
                keys = max(1, keys // 2)
        return _fill_pages(rows, keys, cell, P)

    @property
    def chunk_positions(self) -> int:
        """Commit block: positions per chunk of the largest per-position array.

        Large arrays are chunked by exactly this many positions, so a commit at a block boundary
        writes whole chunks (no read-modify-write). Attention's tiles are written in place as
        rows arrive, so they do not set it."""
        if self._chunk_positions is not None:
            return self._chunk_positions
        return self._auto_chunk_positions

    @functools.cached_property
    def _auto_chunk_positions(self) -> int:
        biggest = max((self._row_bytes(s) for s in self.array_specs()
                       if s.dims[0] == "position" and "key" not in s.dims), default=1)
        return max(1, min(self.max_positions, self.chunk_bytes // max(1, biggest)))

    @functools.cached_property
    def _stored_layout(self) -> tuple[list[tuple[ArraySpec, tuple[int, ...], int]],
                                      list[tuple[str, int, int]]]:
        """What :meth:`data_bytes` counts, computed once: each array's spec, chunk shape and
        item size; each coordinate's dimension, length and chunk length."""
        arrays = [(spec, self.chunks(spec), storage_dtype(self.logical_dtype(spec)).itemsize)
                  for spec in self.array_specs()]
        sizes = self.dim_sizes()
        coords = [(dim, sizes[dim], max(1, min(sizes[dim], COORD_CHUNK)))
                  for dim in self.used_dims()]
        return arrays, coords

    def chunks(self, spec: ArraySpec) -> tuple[int, ...]:
        """Chunk shape: whole rows, ``chunk_positions`` (or a small multiple for small arrays);
        key-indexed arrays: :attr:`attention_tile` positions x keys, whole along the rest."""
        sizes = self.dim_sizes()
        block = self.chunk_positions
        first = spec.dims[0]
        if "key" in spec.dims:
            rows, keys = self.attention_tile
            return tuple(rows if d == "position" else keys if d == "key" else max(1, sizes[d])
                         for d in spec.dims)
        if first == "position":
            fit = self.chunk_bytes // max(1, self._row_bytes(spec))
            lead = max(block, min(64 * block, (fit // block) * block))
            lead = min(lead, self.max_positions)
        elif first == "step":
            lead = min(STEP_CHUNK, self.max_positions)
        else:
            lead = max(1, sizes[first])
        return (lead, *(max(1, sizes[d]) for d in spec.dims[1:]))

    def compression_for(self, spec: ArraySpec) -> str | None:
        """The plan's compression; the vocabulary is always packed (see :data:`PACKED`)."""
        return PACKED if spec.group == VOCAB_GROUP else self.compression

    def declared_bytes(self) -> int:
        """Bytes of every array at its allocated shape, coordinates included: what a reader
        checks against MAX_TRACE_BYTES before reading anything."""
        total = sum(math.prod(self.shape(s)) * storage_dtype(self.logical_dtype(s)).itemsize
                    for s in self.array_specs())
        return total + 8 * sum(self.dim_sizes()[d] for d in self.used_dims())

    def stored_chunks(self, spec: ArraySpec, positions: int, steps: int) -> int:
        """Chunks of ``spec`` a trace of ``positions`` positions in ``steps`` steps stores.

        Every chunk along positions (or steps) that holds a committed row, whole along the
        other axes; attention of a causal model only the tiles on or below the diagonal."""
        chunks = self._chunks_of(spec)
        first = spec.dims[0]
        rows = positions if first == "position" else steps if first == "step" else None
        if rows is None:
            return 1
        if "key" not in spec.dims:
            return math.ceil(rows / chunks[0])
        tile_rows, tile_keys = self.attention_tile
        row_tiles = math.ceil(rows / tile_rows)
        if self.model.kind != "causal":
            return row_tiles * math.ceil(rows / tile_keys)
        return sum(math.ceil(min(rows, (i + 1) * tile_rows) / tile_keys)
                   for i in range(row_tiles))

    def data_bytes(self, positions: int | None = None, steps: int | None = None,
                   format: str = "zarr") -> int:
        """Bytes of the chunks (data and coordinate arrays, each chunk with its checksum) of a
        trace holding ``positions`` (default: all planned) in ``steps`` steps (default: one
        per position, the most a recording can take). Stored chunks are whole even at the
        array's edge, as zarr and HDF5 store them; uncompressed (compression only shrinks).
        HDF5 gives a chunk of a page or more whole pages (its paged file space)."""
        n = self.max_positions if positions is None else positions
        s = n if steps is None else steps
        page = HDF5_PAGE_BYTES if format == "hdf5" else 1

        def stored(nbytes: int) -> float:
            nbytes += CHUNK_CHECKSUM_BYTES
            if nbytes >= page:
                return -(-nbytes // page) * page
            return page / (page // nbytes)  # small chunks share pages, as many as fit

        total = 0.0
        arrays, coords = self._stored_layout
        vocab_dims = {d for spec, _, _ in arrays if spec.group == VOCAB_GROUP for d in spec.dims}
        for spec, chunks, item in arrays:
            if spec.group != VOCAB_GROUP:  # compressed: counted by its content, below
                total += self.stored_chunks(spec, n, s) * stored(math.prod(chunks) * item)
        for dim, length, chunk in coords:
            if dim not in vocab_dims:
                kept = math.ceil((n if dim in GROWING_DIMS else length) / chunk)
                total += kept * stored(chunk * 8)
        if self.has_vocab:
            total += (VOCAB_TEXT_BYTE_COST * (self.vocab_bytes or 0)
                      + VOCAB_ID_COST * self.model.vocab_size)
        return math.ceil(total)

    def _chunks_of(self, spec: ArraySpec) -> tuple[int, ...]:
        for known, chunks, _ in self._stored_layout[0]:
            if known is spec:
                return chunks
        return self.chunks(spec)

    def estimated_bytes(self, format: str = "zarr", positions: int | None = None,
                        steps: int | None = None) -> int:
        """Bytes on disk (the sum of the files' sizes) of the finished trace in ``format``
        holding ``positions`` (default: all planned) in ``steps`` steps: :meth:`data_bytes`
        plus the layout's metadata (zarr: one zarr.json per array and its copy in the group's;
        HDF5: object headers, chunk indexes, pages). Within a few percent of the real size at
        any length (tests check it); an upper bound with compression."""
        n = self.max_positions if positions is None else positions
        s = n if steps is None else steps
        specs, coords = self._stored_layout
        arrays = len(specs) + len(coords)
        data = self.data_bytes(n, s, format)
        if format == "hdf5":
            chunks = sum(self.stored_chunks(spec, n, s) for spec, _, _ in specs)
            total = data + HDF5_BASE_BYTES + arrays * HDF5_ARRAY_BYTES + chunks * HDF5_CHUNK_BYTES
            return -(-total // HDF5_PAGE_BYTES) * HDF5_PAGE_BYTES
        return data + ZARR_BASE_BYTES + arrays * ZARR_ARRAY_BYTES

    # -- metadata ---------------------------------------------------------------------------
    def capture_json(self) -> dict[str, Any]:
        return {
            "captured": [g for g in CAPTURE_GROUPS if g in self.captured],
            "layers": list(self.layers),
            "points": list(self.points),
            "stored_dtype": self.stored_dtype,
            "top_k": self.top_k,
            "attention_top_k": self.attention_top_k,
            "token_bytes": self.token_bytes,
            "max_positions": self.max_positions,
            "chunk_positions": self.chunk_positions,
            "compression": self.compression,
            "vocab_bytes": self.vocab_bytes,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> TracePlan:
        """Rebuild the plan from a trace's metadata (raises MetadataError if inconsistent)."""
        try:
            cap = meta["capture"]
            plan = cls(
                model=ModelInfo.from_json(meta["model"]),
                max_positions=int(cap["max_positions"]),
                captured=frozenset(cap["captured"]),
                layers=tuple(int(x) for x in cap["layers"]),
                stored_dtype=cap["stored_dtype"],
                top_k=int(cap["top_k"]),
                attention_top_k=int(cap["attention_top_k"]),
                token_bytes=int(cap["token_bytes"]),
                compression=cap.get("compression"),
                vocab_bytes=None if cap.get("vocab_bytes") is None else int(cap["vocab_bytes"]),
                _chunk_positions=int(cap["chunk_positions"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"metadata does not describe a valid layout: {exc!r}") from exc
        if list(plan.points) != list(cap.get("points", plan.points)):
            raise MetadataError(
                f"metadata points {cap.get('points')} do not match layers {list(plan.layers)}"
            )
        return plan


def parse_version(text: Any) -> tuple[int, int]:
    """Parse ``"major.minor"``; anything else is a MetadataError."""
    if not isinstance(text, str):
        raise MetadataError(f"format version must be a 'major.minor' string, got {text!r}")
    parts = text.split(".")
    # isascii: str.isdigit accepts "²" and other digits int() refuses.
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise MetadataError(f"format version must be 'major.minor', got {text!r}")
    return int(parts[0]), int(parts[1])


def decode_token_text(raw: bytes) -> str:
    """Token bytes as display text: invalid UTF-8 (partial byte-level tokens) is escaped."""
    return raw.decode("utf-8", errors="backslashreplace")


def check_shape(name: str, actual: Iterable[int], expected: Iterable[int], dims: Iterable[str],
                committed: Mapping[str, int]) -> None:
    """Growing dims may be anywhere from the committed length to the allocation; others exact."""
    actual, expected, dims = tuple(actual), tuple(expected), tuple(dims)
    if len(actual) != len(expected):
        raise CorruptTraceError(f"array {name!r} has {len(actual)} dimensions, expected "
                                f"{len(expected)} {dims}")
    for a, e, d in zip(actual, expected, dims, strict=True):
        if d in GROWING_DIMS:
            if not committed.get(d, 0) <= a <= e:
                raise CorruptTraceError(
                    f"array {name!r} dimension {d!r} has length {a}, expected between "
                    f"{committed.get(d, 0)} (committed) and {e} (allocated)")
        elif a != e:
            raise CorruptTraceError(
                f"array {name!r} dimension {d!r} has length {a}, expected {e}")
