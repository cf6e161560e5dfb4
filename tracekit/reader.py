"""Reading traces: :func:`open` returns a :class:`Trace` of lazy, named arrays.

Nothing is read until it is indexed: slicing a :class:`LazyArray` reads only the chunks it
touches, and every shape is bounded by the committed counter, so a trace still being recorded
(or whose writer was killed) reads as exactly its committed positions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from .errors import CorruptTraceError, MissingArrayError, TraceError
from .format import (
    GROWING_DIMS,
    SPECS_BY_NAME,
    TracePlan,
    check_shape,
    decode_token_text,
    logical_numpy_dtype,
)
from .schema import check_metadata
from .storage import Backend, StoredArray, is_url, open_backend
from .vocab import Vocabulary


class LazyArray:
    """A named, read-only n-d array view over stored chunks, bounded by the committed length.

    Supports numpy basic indexing (ints, slices with any step, ``...``) and one 1-d integer
    array; returns numpy arrays in the logical dtype (``ml_dtypes.bfloat16`` for bfloat16).
    """

    def __init__(self, stored: StoredArray, dims: tuple[str, ...], shape: tuple[int, ...],
                 logical_dtype: str) -> None:
        self._stored = stored
        self.name = stored.name
        self.dims = dims
        self.shape = shape
        self.logical_dtype = logical_dtype
        self.dtype = logical_numpy_dtype(logical_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._stored.chunks

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}: {s}" for d, s in zip(self.dims, self.shape, strict=True))
        return f"<LazyArray {self.name} ({dims}) {self.logical_dtype}>"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        plan, post, fancy_axis, fancy = _normalize_index(key, self.shape)
        if fancy is not None:
            order = np.argsort(fancy, kind="stable")
            uniq, inverse = np.unique(fancy[order], return_inverse=True)
            plan = list(plan)
            plan[fancy_axis] = uniq  # type: ignore[call-overload]
            data = self._read_fancy(tuple(plan), fancy_axis)
            take = np.empty(len(fancy), dtype=np.int64)
            take[order] = inverse
            data = np.take(data, take, axis=_axis_after_ints(plan, fancy_axis))
        else:
            data = self._stored[tuple(plan)] if all(
                not (isinstance(p, slice) and p.stop <= p.start) for p in plan
            ) else np.zeros(_empty_shape(plan), dtype=self._stored.dtype)
        if post:
            data = data[post]
        if self.logical_dtype == "bfloat16":
            data = np.asarray(data).view(self.dtype)  # same itemsize: any strides, any ndim
        return data

    def _read_fancy(self, plan: tuple, axis: int) -> np.ndarray:
        idx = plan[axis]
        parts = []
        for i in idx:
            sub = list(plan)
            sub[axis] = slice(int(i), int(i) + 1)
            parts.append(self._stored[tuple(sub)])
        kept_axis = _axis_after_ints(list(plan), axis)
        return np.concatenate(parts, axis=kept_axis)


def _axis_after_ints(plan: Sequence[Any], axis: int) -> int:
    """Position of ``axis`` in the result after integer-indexed axes are dropped."""
    return sum(1 for p in plan[:axis] if not isinstance(p, (int, np.integer)))


def _empty_shape(plan: Sequence[Any]) -> tuple[int, ...]:
    return tuple(max(0, p.stop - p.start) for p in plan if isinstance(p, slice))


def _normalize_index(key: Any, shape: tuple[int, ...]):
    """Turn a numpy-style key into in-bounds ints and step-1 slices for the store, plus a
    post-processing slice (for negative or >1 steps) and at most one integer-array axis."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices: {len(key)} for {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    plan: list[Any] = []
    post: list[Any] = []
    fancy_axis, fancy = -1, None
    for axis, (k, n) in enumerate(zip(key, shape, strict=True)):
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} out of range for axis {axis} of length {n}")
            plan.append(i)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step == 1:
                plan.append(slice(start, max(start, stop)))
                post.append(slice(None))
            elif step > 1:
                stop = max(start, stop)
                plan.append(slice(start, stop))
                post.append(slice(None, None, step))
            else:  # negative step: read the covered range forwards, then reverse
                count = len(range(start, stop, step))
                lo = start + (count - 1) * step if count else 0
                plan.append(slice(lo, lo + (count - 1) * -step + 1 if count else 0))
                post.append(slice(None, None, step))
        elif isinstance(k, (list, np.ndarray)) and np.asarray(k).ndim == 1 and (
            np.asarray(k).dtype.kind in "iu" or len(k) == 0
        ):
            if fancy is not None:
                raise IndexError("only one integer-array index is supported")
            arr = np.asarray(k, dtype=np.int64)
            arr = np.where(arr < 0, arr + n, arr)
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise IndexError(f"index out of range for axis {axis} of length {n}")
            fancy_axis, fancy = axis, arr
            plan.append(slice(0, 0))
            post.append(slice(None))
        else:
            raise IndexError(f"unsupported index {k!r} (ints, slices, ... and one int array)")
    post_t = tuple(post) if any(p != slice(None) for p in post) else ()
    return plan, post_t, fancy_axis, fancy


@dataclass(frozen=True)
class Token:
    """One position of the sequence."""

    position: int
    id: int
    text: str
    raw: bytes
    step: int
    is_prompt: bool
    truncated: bool


@dataclass(frozen=True)
class Prediction:
    """One of the top-k next tokens predicted at a position (or read by the logit lens)."""

    rank: int
    id: int
    text: str
    logprob: float

    @property
    def prob(self) -> float:
        return float(np.exp(self.logprob))


class Tokens(Sequence[Token]):
    """The committed tokens, loaded on first use (a few bytes per position)."""

    def __init__(self, trace: Trace) -> None:
        self._trace = trace
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None or len(self._cache[0]) != self._trace.n_positions:
            t = self._trace
            self._cache = (t["token_id"][:], t["token_bytes"][:], t["token_nbytes"][:],
                           t["token_step"][:])
        return self._cache

    def __len__(self) -> int:
        return self._trace.n_positions

    @property
    def ids(self) -> np.ndarray:
        return self._load()[0]

    @property
    def texts(self) -> list[str]:
        return [self[i].text for i in range(len(self))]

    @overload
    def __getitem__(self, i: int) -> Token: ...
    @overload
    def __getitem__(self, i: slice) -> list[Token]: ...

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token {i} out of range ({n} positions)")
        ids, tb, nb, steps = self._load()
        length = int(nb[i])
        width = tb.shape[1]
        raw = bytes(tb[i, : min(max(length, 0), width)])
        return Token(position=i, id=int(ids[i]), text=decode_token_text(raw), raw=raw,
                     step=int(steps[i]), is_prompt=i < self._trace.prompt_length,
                     truncated=length > width)

    def __iter__(self) -> Iterator[Token]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"<Tokens {len(self)}: {''.join(t.text for t in self[:40])!r}...>"


class Trace:
    """An open trace: metadata, tokens and lazy named arrays. Use as a context manager."""

    def __init__(self, backend: Backend, path: Path | None = None,
                 location: str | None = None) -> None:
        self._backend = backend
        #: The local path of the trace (None for a URL or an in-memory trace).
        self.path = path
        #: Where the trace is, as messages name it: its path, or its URL.
        self.location = location or (str(path) if path is not None else None)
        try:
            self.metadata: dict[str, Any] = backend.read_root_meta()
            self.version, newer_minor = check_metadata(self.metadata)
            if newer_minor:
                warnings.warn(
                    f"{self.location or 'trace'} uses format {self.metadata['version']}, newer "
                    f"than this reader's; unknown fields are ignored (upgrade tracekit to use "
                    f"them)",
                    stacklevel=2,
                )
            self.plan = TracePlan.from_metadata(self.metadata)
            self._arrays: dict[str, LazyArray] = {}
            self._vocab: Vocabulary | None = None
            self._load_commit()
        except BaseException:
            backend.close()
            raise
        self.tokens = Tokens(self)

    # -- structure --------------------------------------------------------------------------
    def _load_commit(self) -> None:
        stored = self._backend.get_array("commit", dims=("commit_field",))
        if stored.shape != (2,):
            raise CorruptTraceError(f"commit counter has shape {stored.shape}, expected (2,)")
        positions, steps = (int(v) for v in stored[(slice(0, 2),)])
        P = self.plan.max_positions
        if not (0 <= positions <= P and 0 <= steps <= positions):
            raise CorruptTraceError(
                f"commit counter [{positions}, {steps}] impossible for max_positions {P}")
        length = self.metadata.get("length")
        if self.metadata.get("status") in ("complete", "truncated") and isinstance(
                length, dict) and (
            length.get("positions") != positions or length.get("steps") != steps
        ):
            raise CorruptTraceError(
                f"{self.metadata.get('status')} trace says {length} but its commit counter says "
                f"positions={positions}, steps={steps}")
        self.n_positions, self.n_steps = positions, steps
        self._arrays.clear()

    def refresh(self) -> int:
        """Catch up with a recording in progress: re-read the commit counter and the metadata,
        so that ``n_positions``, ``n_steps``, arrays' lengths and ``status`` are those of the
        trace now. Returns ``n_positions``.

        A writer commits every second or so; poll until ``status`` is no longer
        ``recording`` (the writer finished: ``complete``, or ``aborted`` with its
        ``stop_reason``). A writer that was killed leaves ``recording`` for good, so bound the
        wait::

            with tracekit.open("run.zarr") as trace:
                while trace.status == "recording" and time.time() < deadline:
                    time.sleep(1)
                    trace.refresh()
        """
        self._backend.refresh()
        meta = self._backend.read_root_meta()
        check_metadata(meta)
        self.metadata = meta
        self._load_commit()
        return self.n_positions

    @property
    def format(self) -> str:
        return self._backend.format_name

    @property
    def status(self) -> str:
        return str(self.metadata.get("status"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def model(self) -> dict[str, Any]:
        return self.metadata["model"]

    @property
    def prompt_length(self) -> int:
        return int(self.metadata.get("prompt_length", 0))

    @property
    def captured(self) -> list[str]:
        return list(self.metadata["capture"]["captured"])

    @property
    def layers(self) -> list[int]:
        return list(self.plan.layers)

    @property
    def points(self) -> list[int]:
        return list(self.plan.points)

    def array_names(self) -> list[str]:
        """Data arrays this trace has (coordinates excluded), in spec order."""
        return [s.name for s in self.plan.array_specs()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.array_names()

    def __getitem__(self, name: str) -> LazyArray:
        if name in self._arrays:
            return self._arrays[name]
        if name in SPECS_BY_NAME:
            spec = SPECS_BY_NAME[name]
            if spec not in self.plan.array_specs():
                raise MissingArrayError(
                    f"array {name!r} was not captured (captured groups: {self.captured})")
            dims, expected = spec.dims, self.plan.shape(spec)
            logical = self.plan.logical_dtype(spec)
        elif name in self.plan.used_dims():
            dims, expected = (name,), (self.plan.dim_sizes()[name],)
            logical = "int64"
        else:
            raise MissingArrayError(f"no array named {name!r} in the format")
        stored = self._backend.get_array(name, dims=dims)
        if tuple(stored.dims) != dims:
            raise CorruptTraceError(
                f"array {name!r} has dimensions {tuple(stored.dims)}, expected {dims}")
        committed = {"position": self.n_positions, "key": self.n_positions,
                     "step": self.n_steps}
        check_shape(name, stored.shape, expected, dims, committed)
        _check_chunks(name, stored.chunks, expected, dims)
        want = np.dtype(np.uint16) if logical == "bfloat16" else np.dtype(logical)
        if stored.dtype != want:
            raise CorruptTraceError(f"array {name!r} is stored as {stored.dtype}, expected {want}")
        shape = tuple(committed[d] if d in GROWING_DIMS else s
                      for d, s in zip(dims, stored.shape, strict=True))
        # Chunk checksums are verified on read; in a trace still being recorded (or whose
        # writer died) a chunk extending past the committed rows may hold a stale one.
        # Coordinates are written whole before the trace gets its name.
        finalized = self.status in ("complete", "aborted")
        stored.verify_below(None if finalized or dims[0] not in GROWING_DIMS
                            or name not in SPECS_BY_NAME else committed[dims[0]])
        arr = LazyArray(stored, dims, shape, logical)
        self._arrays[name] = arr
        return arr

    def coords(self, dim: str) -> np.ndarray:
        """The coordinate values of a dimension (e.g. which layer each ``layer`` index is)."""
        return self[dim][:]

    def step_positions(self, step: int) -> range:
        """Positions computed by ``step``."""
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range ({self.n_steps} committed steps)")
        start = int(self["step_start"][step])
        return range(start, start + int(self["step_positions"][step]))

    def value_range(self, name: str) -> tuple[float, float]:
        """Global (min, max) of an array with a range summary, for stable colour scales."""
        summary = self.metadata.get("summary") or {}
        ranges = summary.get("value_ranges") or {}
        if name in ranges:
            lo, hi = ranges[name]
            return float(lo), float(hi)
        data = self[name][:] if name.endswith("_norm") else self[f"{name}_range"][:]
        if data.size == 0:
            return (0.0, 0.0)
        return float(np.min(data)), float(np.max(data))

    # -- vocabulary and predictions as text -------------------------------------------------
    @property
    def has_vocab(self) -> bool:
        """Whether the trace stores the text of every token id (format 1.1, optional)."""
        return self.plan.has_vocab

    @property
    def vocab(self) -> Vocabulary:
        """The stored vocabulary, read whole on first use (its size is checked first)."""
        if self._vocab is None:
            if not self.plan.has_vocab:
                raise MissingArrayError(
                    f"{self.location or 'this trace'} was recorded without a vocabulary (format "
                    f"{self.metadata['version']}); load its tokenizer "
                    f"({self.metadata.get('run', {}).get('tokenizer') or self.model['name']}) "
                    f"to turn token ids into text")
            # Shapes were checked against the metadata, whose sizes the plan bounds.
            self._vocab = Vocabulary(self["vocab_nbytes"][:], self["vocab_bytes"][:])
        return self._vocab

    def decode(self, ids: Any) -> list[str]:
        """The text of each token id (an int, or a sequence or array of ints, flattened):
        ``t.decode(t["top_ids"][5])``. Raises TokenIdError for an id outside the vocabulary,
        MissingArrayError when the trace stores none."""
        return self.vocab.decode(ids)

    def predictions(self, position: int) -> list[Prediction]:
        """The top-k next tokens predicted at ``position``, most likely first, as text."""
        return self._ranked(self["top_ids"], self["top_logprobs"], (position,))

    def lens_predictions(self, position: int, point: int) -> list[Prediction]:
        """The logit lens's top-k at ``position`` and residual point ``point`` (a point
        index as in ``t.points``, not an index into it), as text."""
        if point not in self.plan.points:
            raise IndexError(f"point {point} was not captured (points: {self.points})")
        index = self.plan.points.index(point)
        return self._ranked(self["lens_ids"], self["lens_logprobs"], (position, index))

    def _ranked(self, ids_arr: LazyArray, lp_arr: LazyArray, at: tuple) -> list[Prediction]:
        ids, logprobs = ids_arr[at], lp_arr[at]
        vocab = self.vocab
        return [Prediction(rank=r, id=int(i), text=vocab.text(int(i)), logprob=float(lp))
                for r, (i, lp) in enumerate(zip(ids, logprobs, strict=True)) if i >= 0]

    def to_xarray(self):  # -> xarray.Dataset
        """A lazy xarray Dataset with named dimensions and coordinates (needs xarray)."""
        try:
            from ._xarray import trace_to_dataset
        except ModuleNotFoundError as exc:
            if exc.name != "xarray":
                raise
            raise ModuleNotFoundError("to_xarray() needs xarray: python -m pip install xarray "
                                      "(or the tracekit[xarray] extra)", name="xarray") from None
        return trace_to_dataset(self)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Trace {self.location or self.format} {self.status} positions={self.n_positions} "
                f"model={self.model.get('name')!r} arrays={self.array_names()}>")


def _check_chunks(name: str, chunks: tuple[int, ...], allocated: tuple[int, ...],
                  dims: tuple[str, ...]) -> None:
    """Chunks no larger than the array was allocated (decoding one would cost more), and
    whole along every axis but the first and ``key`` (the format's layout; tiny chunks there
    would make reading a row take millions of chunk reads)."""
    for axis, (c, n, d) in enumerate(zip(chunks, allocated, dims, strict=True)):
        if c > max(n, 1):
            raise CorruptTraceError(f"array {name!r}: chunks {chunks} exceed its allocated "
                                    f"shape {allocated}")
        if axis and d != "key" and c < n:
            raise CorruptTraceError(f"array {name!r}: chunks {chunks} do not hold whole rows "
                                    f"along {d!r}")


def open(path: str | os.PathLike[str] | Backend, *,  # noqa: A001 - mirrors builtins
         storage_options: dict[str, Any] | None = None,
         cache_dir: str | os.PathLike[str] | None = None,
         cache_bytes: int | None = None) -> Trace:
    """Open a trace for reading: a zarr folder, an HDF5 file or a pack (told by their bytes),
    on this machine or at a URL (``https://``, ``s3://``, ``gs://``, ``az://``, any fsspec
    protocol; ``pip install 'tracekit[remote]'``). Remote traces fetch only the chunks read;
    ``storage_options`` go to fsspec (credentials otherwise come from the usual places, such
    as ``AWS_PROFILE``), and ``cache_dir`` keeps what was fetched on disk, at most
    ``cache_bytes``, so that reading it again costs no request."""
    if isinstance(path, Backend):
        return Trace(path)
    options = {"storage_options": storage_options, "cache_dir": cache_dir,
               "cache_bytes": cache_bytes}
    if is_url(path):
        return Trace(open_backend(str(path), **options), location=str(path))
    p = Path(path)
    return Trace(open_backend(p, **options), p)


def open_or_error(path: str | os.PathLike[str], **options: Any) -> Trace:
    """Like :func:`open`, but any unexpected failure of a hostile file becomes a TraceError."""
    try:
        return open(path, **options)
    except TraceError:
        raise
    except Exception as exc:
        raise CorruptTraceError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
