"""Lazy, bounded reading of a trace for the viewer.

A frame reads only what it shows: the summaries (norms, top-k attention) of the visible
positions for the city, and full vectors only for the focused layer and the traced token.
Everything is read in aligned blocks of positions and kept in one least-recently-used cache
with a byte budget, so memory stays flat however large the trace and however long one
scrubs. Reads are one at a time; a thread can ask for cache hits only (:meth:`TraceSource.
cache_only`: the window's thread, which must never wait on a slow store) or have its reads
abandoned between two reads (:meth:`TraceSource.interruptible`: a fetch that a newer request
superseded). :mod:`tracekit_viewer.fetch` runs the reads in the background.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

import tracekit
from tracekit.errors import CorruptTraceError, DisallowedCodecError, MissingArrayError
from tracekit.format import decode_token_text

from .scene import combine_heads, sparse_rows_to_dense

__all__ = ["BlockCache", "NotCached", "TraceSource", "METRICS", "id_label"]

#: What the city's heights and colours can show, and the summary array each reads.
METRICS = {"residual": "residual_norm", "attn_out": "attn_out_norm", "mlp_out": "mlp_out_norm"}
METRIC_TITLES = {"residual": "residual norm", "attn_out": "attention out norm",
                 "mlp_out": "MLP out norm"}

DEFAULT_CACHE_BYTES = 64 << 20  # a frame needs a few MB; this holds dozens of steps
SUMMARY_BLOCK = 256  # positions per cached block of summaries
ROW_BLOCK = 16  # positions per cached block of full vectors
KEY_BLOCK = 256  # keys per cached block of the attention matrix


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value) + 64
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values()) + 64
    if isinstance(value, str):
        return len(value) + 50
    return 64


def id_label(token_id: int, text: str | None) -> str:
    """How a token id shows in the panels: its text quoted, with newlines and invalid bytes
    escaped (``'fib'``, ``'\\n   '``), or ``#id`` when there is no text for it."""
    return repr(text) if text is not None else f"#{int(token_id)}"


class NotCached(LookupError):
    """A read was needed where only cache hits are allowed (see :meth:`TraceSource.cache_only`)."""


class BlockCache:
    """A thread-safe least-recently-used cache of arrays, bounded by their total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.stored_bytes = 0  # bytes ever put in (a prefetch measures what it read by it)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def lookup(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return False, None
            self._items.move_to_end(key)
            self.hits += 1
            return True, item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (value, size)
            self.nbytes += size
            self.stored_bytes += size
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, (_, s) = self._items.popitem(last=False)
                self.nbytes -= s

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


class TraceSource:
    """The viewer's window onto a :class:`tracekit.Trace`: bounded, cached block reads.

    Floors are the captured layers (``floors[f]`` is the model layer of floor ``f``); floor
    ``f`` shows the residual stream at the output of its block.
    """

    def __init__(self, trace: tracekit.Trace | str | os.PathLike[str], *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._owns_trace = not isinstance(trace, tracekit.Trace)
        self.trace = tracekit.open(trace) if self._owns_trace else trace
        t = self.trace
        self.cache = BlockCache(cache_bytes)
        self._read_lock = threading.RLock()
        self.n_positions = t.n_positions
        self.n_steps = t.n_steps
        self.floors: list[int] = t.layers
        self.points: list[int] = t.points
        self.n_floors = len(self.floors)
        self.n_heads = int(t.model["n_heads"])
        self.model_name = str(t.model.get("name"))
        self.out_points = [self.points.index(layer + 1) for layer in self.floors]
        self.in_points = [self.points.index(layer) for layer in self.floors]
        self.metrics = [m for m, s in METRICS.items() if s in t]
        self.has_attention_summary = "attention_top_keys" in t
        self.has_attention = "attention" in t
        self.vector_arrays = [a for a in ("residual", "attn_out", "mlp_out") if a in t]
        self._ranges: dict[str, tuple[float, float]] = {}
        self._scales: dict[tuple[str, int], float] = {}
        self._id_text: dict[int, str] = {}
        self._vocab: Any = None  # the trace's vocabulary (format 1.1), read on first use
        self._vocab_tried = not t.has_vocab
        self._policy = threading.local()  # per thread: cache_only, before_read

    # -- read policy per thread -------------------------------------------------------------
    @contextlib.contextmanager
    def cache_only(self) -> Iterator[None]:
        """Within this block, on this thread, anything not cached raises :class:`NotCached`
        instead of being read: the window's thread computes a frame this way, so it never
        waits on a slow store."""
        old = getattr(self._policy, "cache_only", False)
        self._policy.cache_only = True
        try:
            yield
        finally:
            self._policy.cache_only = old

    @contextlib.contextmanager
    def interruptible(self, check: Callable[[], None]) -> Iterator[None]:
        """Within this block, on this thread, ``check()`` runs before every read; what it
        raises abandons the work between two reads (what was read stays cached)."""
        old = getattr(self._policy, "check", None)
        self._policy.check = check
        try:
            yield
        finally:
            self._policy.check = old

    def _before_read(self, what: Hashable) -> None:
        if getattr(self._policy, "cache_only", False):
            raise NotCached(what)
        check = getattr(self._policy, "check", None)
        if check is not None:
            check()

    # -- cache plumbing ---------------------------------------------------------------------
    def _cached(self, key: Hashable, load: Callable[[], Any]) -> Any:
        found, value = self.cache.lookup(key)
        if found:
            return value
        self._before_read(key)
        with self._read_lock:  # one reader at a time; another thread may have just loaded it
            found, value = self.cache.lookup(key)
            if found:
                return value
            self._before_read(key)  # (a newer request may have come while waiting)
            self.cache.misses += 1
            value = load()
        self.cache.put(key, value)
        return value

    def _rows(self, key: tuple, a: int, b: int, block: int, total: int,
              load: Callable[[int, int], Any]) -> list[tuple[Any, int, int]]:
        """Blocks covering rows [a, b): (block value, first row, last row) in block terms."""
        out = []
        for i in range(a // block, -(-b // block) if b > a else a // block):
            lo, hi = i * block, min(total, (i + 1) * block)
            value = self._cached((*key, block, i), lambda lo=lo, hi=hi: load(lo, hi))
            out.append((value, max(a, lo) - lo, min(b, hi) - lo))
        return out

    def _array_rows(self, name: str, a: int, b: int, tail: tuple = (),
                    block: int = SUMMARY_BLOCK, dtype: Any = None) -> np.ndarray:
        total = self.n_steps if name.startswith("step_") else self.n_positions

        def load(lo: int, hi: int) -> np.ndarray:  # (opening an array may read its metadata)
            data = self.trace[name][(slice(lo, hi), *tail)]
            return data.astype(dtype) if dtype is not None else data

        parts = self._rows((name, tail, str(dtype)), a, b, block, total, load)
        if not parts:
            return load(0, 0)
        return np.concatenate([v[i0:i1] for v, i0, i1 in parts], axis=0)

    # -- steps and tokens -------------------------------------------------------------------
    def step_range(self, step: int) -> range:
        """Positions computed by ``step``."""
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range (0..{self.n_steps - 1})")
        start = int(self._array_rows("step_start", step, step + 1, block=4096)[0])
        n = int(self._array_rows("step_positions", step, step + 1, block=4096)[0])
        return range(start, start + n)

    def step_of_position(self, position: int) -> int:
        return int(self._array_rows("token_step", position, position + 1)[0])

    def texts(self, a: int, b: int) -> list[str]:
        """Display texts of positions [a, b)."""
        def load(lo: int, hi: int) -> tuple[list[str], np.ndarray]:
            raw = self.trace["token_bytes"][lo:hi]
            nb = self.trace["token_nbytes"][lo:hi]
            ids = self.trace["token_id"][lo:hi]
            width = raw.shape[1]
            texts = [decode_token_text(bytes(raw[i, : max(0, min(int(nb[i]), width))]))
                     for i in range(hi - lo)]
            return texts, ids

        out: list[str] = []
        for (texts, ids), i0, i1 in self._rows(("texts",), a, b, SUMMARY_BLOCK,
                                               self.n_positions, load):
            out.extend(texts[i0:i1])
            for j in range(i0, i1):
                self._id_text.setdefault(int(ids[j]), texts[j])
        return out

    def token_text(self, position: int) -> str:
        return self.texts(position, position + 1)[0]

    def id_text(self, token_id: int) -> str:
        """Label of a vocabulary id (a prediction, the logit lens): its text from the trace's
        vocabulary; without one (format 1.0), from the positions read so far; else ``#id``."""
        i = int(token_id)
        vocab = self._vocabulary()
        if vocab is None:  # (also while the vocabulary is still to be read)
            return id_label(i, self._id_text.get(i))
        try:
            return id_label(i, vocab.text(i))
        except tracekit.TraceError:  # an id outside the vocabulary (a corrupt trace)
            return id_label(i, None)

    def _vocabulary(self) -> Any:
        if not self._vocab_tried:
            self._before_read("vocab")
            with self._read_lock:
                if not self._vocab_tried:
                    # A corrupt vocabulary leaves the ids as they are, for good; a read that
                    # failed otherwise (a time-out on a network) fails this frame, which is
                    # read again later.
                    with contextlib.suppress(CorruptTraceError, DisallowedCodecError,
                                             MissingArrayError):
                        self._vocab = self.trace.vocab
                    self._vocab_tried = True
        return self._vocab

    # -- summaries for the city -------------------------------------------------------------
    def value_range(self, metric: str) -> tuple[float, float]:
        """Fixed (min, max) of a metric over the whole trace, for colour bars that hold."""
        if metric not in self._ranges:
            self._before_read(("range", metric))
            with self._read_lock:
                self._ranges[metric] = self.trace.value_range(METRICS[metric])
        return self._ranges[metric]

    def metric(self, metric: str, a: int, b: int) -> np.ndarray:
        """[b - a, n_floors] float32 values of ``metric`` (NaN if not captured)."""
        if metric not in self.metrics:
            return np.full((max(0, b - a), self.n_floors), np.nan, np.float32)
        rows = self._array_rows(METRICS[metric], a, b, dtype=np.float32)
        return rows[:, self.out_points] if metric == "residual" else rows

    def contribution(self, a: int, b: int) -> np.ndarray | None:
        """[b - a, n_floors]: (|attn_out| + |mlp_out|) / |residual in| of each block."""
        if not {"residual", "attn_out", "mlp_out"} <= set(self.metrics):
            return None
        r_in = self._array_rows("residual_norm", a, b, dtype=np.float32)[:, self.in_points]
        added = self.metric("attn_out", a, b) + self.metric("mlp_out", a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(r_in > 0, added / r_in, np.nan).astype(np.float32)

    def top_attention(self, a: int, b: int, heads: str | int) -> tuple[np.ndarray, np.ndarray]:
        """Top keys and weights [b - a, n_floors, rank] of the visible queries, heads combined
        (see :func:`tracekit_viewer.scene.combine_heads`)."""
        if not self.has_attention_summary:
            z = np.zeros((max(0, b - a), self.n_floors, 1))
            return z.astype(np.int32) - 1, z.astype(np.float32)
        def load(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            return combine_heads(self.trace["attention_top_keys"][lo:hi],
                                 self.trace["attention_top_weights"][lo:hi], heads)

        parts = self._rows(("top", str(heads)), a, b, SUMMARY_BLOCK, self.n_positions, load)
        if not parts:
            K = self.trace["attention_top_keys"].shape[-1]
            return (np.zeros((0, self.n_floors, K), np.int32),
                    np.zeros((0, self.n_floors, K), np.float32))
        keys = np.concatenate([v[0][i0:i1] for v, i0, i1 in parts])
        weights = np.concatenate([v[1][i0:i1] for v, i0, i1 in parts])
        return keys, weights

    # -- full vectors for the focused layer and the traced token ----------------------------
    def vectors(self, array: str, floor: int, a: int, b: int) -> np.ndarray:
        """[b - a, hidden] float32: ``array`` at ``floor`` (residual: the block's output)."""
        index = self.out_points[floor] if array == "residual" else floor
        return self._array_rows(array, a, b, tail=(index,), block=ROW_BLOCK, dtype=np.float32)

    def token_state(self, position: int) -> dict[str, np.ndarray]:
        """Everything about one position: full vectors, predictions, logit lens."""
        def load() -> dict[str, np.ndarray]:
            out = {}
            for name in ("residual", "attn_out", "mlp_out"):
                if name in self.trace:
                    out[name] = self.trace[name][position].astype(np.float32)
            for name in ("top_ids", "top_logprobs", "lens_ids", "lens_logprobs"):
                if name in self.trace:
                    out[name] = self.trace[name][position]
            return out

        return self._cached(("token", position), load)

    def attention_matrix(self, floor: int, heads: str | int, q0: int, q1: int, k0: int,
                         k1: int) -> np.ndarray:
        """Dense [q1 - q0, k1 - k0] attention of ``floor`` (heads combined: mean, max or one).

        Read from the full attention array where the trace has it, else rebuilt from the
        top-k summary (keys outside a head's top-k count as 0)."""
        nq, nk = max(0, q1 - q0), max(0, k1 - k0)
        out = np.zeros((nq, nk), np.float32)
        if nq == 0 or nk == 0:
            return out
        if not self.has_attention:
            if not self.has_attention_summary:
                return out
            if isinstance(heads, str):
                mats = []
                for h in range(self.n_heads):
                    kk = self._array_rows("attention_top_keys", q0, q1, tail=(floor, h))
                    ww = self._array_rows("attention_top_weights", q0, q1, tail=(floor, h))
                    mats.append(sparse_rows_to_dense(kk, ww, k0, nk))
                stack = np.stack(mats)
                return stack.mean(0) if heads == "mean" else stack.max(0)
            kk = self._array_rows("attention_top_keys", q0, q1, tail=(floor, int(heads)))
            ww = self._array_rows("attention_top_weights", q0, q1, tail=(floor, int(heads)))
            return sparse_rows_to_dense(kk, ww, k0, nk)
        for kb in range(k0 // KEY_BLOCK, -(-k1 // KEY_BLOCK)):
            klo, khi = kb * KEY_BLOCK, min(self.n_positions, (kb + 1) * KEY_BLOCK)

            def load(lo: int, hi: int, klo: int = klo, khi: int = khi) -> np.ndarray:
                # [rows, head, key]
                block = self.trace["attention"][lo:hi, floor, :, klo:khi].astype(np.float32)
                if heads == "mean":
                    return block.mean(axis=1)
                if heads == "max":
                    return block.max(axis=1)
                return block[:, int(heads)]

            parts = self._rows(("attn", floor, str(heads), kb), q0, q1, ROW_BLOCK,
                               self.n_positions, load)
            rows = np.concatenate([v[i0:i1] for v, i0, i1 in parts])
            a, b = max(k0, klo), min(k1, khi)
            out[:, a - k0:b - k0] = rows[:, a - klo:b - klo]
        return out

    def robust_scale(self, array: str, floor: int | None = None, samples: int = 16) -> float:
        """A stable colour scale for full vectors: the 99th percentile of |value| over a fixed
        sample of positions spread over the whole trace (so it never changes while scrubbing
        and one huge outlier dimension does not wash everything out)."""
        key = (array, -1 if floor is None else floor)
        if key not in self._scales:
            n = self.n_positions
            picks = np.unique(np.linspace(0, max(0, n - 1), min(samples, n)).astype(int))
            vals = []
            for p in picks:
                self._before_read(("scale", key))
                with self._read_lock:
                    row = self.trace[array][int(p)] if floor is None else (
                        self.trace[array][int(p), self.out_points[floor] if array == "residual"
                                          else floor])
                vals.append(np.abs(np.asarray(row, np.float32)).ravel())
            allv = np.concatenate(vals) if vals else np.zeros(1)
            scale = float(np.percentile(allv, 99)) if allv.size else 1.0
            self._scales[key] = scale if scale > 0 else 1.0
        return self._scales[key]

    def close(self) -> None:
        self.cache.clear()
        if self._owns_trace:
            self.trace.close()
