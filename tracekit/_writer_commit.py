"""The commit of a trace writer's handed-over steps (``_Committer``, a base of
:class:`tracekit.writer.TraceWriter`), run on its writer thread, and what it works on: the
handed-over steps (``_Step``) and their cast to the stored dtypes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from .format import SPECS_BY_NAME, storage_dtype
from .summaries import _NORMS, _RANGES, _as_float32, _summaries, attention_top_k

#: Steps at least this big (bytes per array) are written block by block, never joined.
_BIG_STEP = 256 << 10
#: Commits of an array at least this big compute its summaries while its data is written.
_OVERLAP_BYTES = 1 << 20


def _to_stored(x: np.ndarray, logical: str) -> np.ndarray:
    """Cast to the stored representation (bfloat16 -> its uint16 bits)."""
    if logical == "bfloat16":
        if x.dtype == np.uint16:
            return x
        if x.dtype != ml_dtypes.bfloat16:
            x = x.astype(ml_dtypes.bfloat16)
        return x.view(np.uint16)
    return np.asarray(x, dtype=storage_dtype(logical))


class _Step:
    """One or more consecutive steps handed over together: ``n`` positions from ``start``,
    steps ``index`` onwards with ``sizes`` positions each, computed at ``times``."""

    __slots__ = ("start", "n", "index", "ids", "texts", "arrays", "sizes", "times")

    def __init__(self, start, n, index, ids, texts, arrays, sizes, times):
        self.start, self.n, self.index = start, n, index
        self.ids, self.texts, self.arrays = ids, texts, arrays
        self.sizes, self.times = sizes, times


class _Committer:
    """The writer thread's commit of handed-over steps (a part of :class:`TraceWriter`, which
    has the arrays, the plan and the state these methods use): token and step arrays, the
    captured arrays with their summaries, attention tile by tile, then the commit counter."""

    def _write(self, name: str, region: tuple, data: np.ndarray) -> None:
        self._arrays[name][region] = data

    def _commit(self, steps: list[_Step]) -> None:
        plan = self.plan
        start = steps[0].start
        end = steps[-1].start + steps[-1].n
        rows = (slice(start, end),)
        n = end - start
        ids = np.concatenate([s.ids for s in steps])
        texts = [t for s in steps for t in s.texts]
        width = plan.token_bytes
        tb = np.zeros((n, width), dtype=np.uint8)
        nbytes = np.zeros(n, dtype=np.int32)
        for i, raw in enumerate(texts):
            nbytes[i] = len(raw)
            chunk = raw[:width]
            tb[i, : len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        token_step = np.concatenate(
            [np.repeat(np.arange(s.index, s.index + len(s.sizes), dtype=np.int32), s.sizes)
             for s in steps])
        self._write("token_id", rows, ids)
        self._write("token_bytes", rows, tb)
        self._write("token_nbytes", rows, nbytes)
        self._write("token_step", rows, token_step)

        for name in self._inputs:
            spec = SPECS_BY_NAME[name]
            logical = plan.logical_dtype(spec)
            if name == "attention":
                self._commit_attention(steps, start, end, logical)
                continue
            blocks = [_to_stored(s.arrays[name], logical) for s in steps]
            size = sum(b.nbytes for b in blocks)
            if len(blocks) > 1 and size < len(blocks) * _BIG_STEP:
                blocks = [np.concatenate(blocks)]  # small steps: one block, fewer calls
            # Large commits: the summaries are computed on a helper thread while the data is
            # written (numpy and file writes release the GIL).
            pending = (self._helper().submit(_summaries, name, steps, blocks, logical)
                       if size >= _OVERLAP_BYTES else None)
            # Big steps are written straight from the producer's buffers, without joining.
            self._arrays[name].write_rows(start, blocks)
            norms, rng = (pending.result() if pending is not None
                          else _summaries(name, steps, blocks, logical))
            if norms is not None:
                self._write(_NORMS[name], rows, norms)
                self._track(_NORMS[name], norms)
            if rng is not None:
                self._write(_RANGES[name], rows, rng)
                self._track(name, rng)

        s0, s1 = steps[0].index, steps[-1].index + len(steps[-1].sizes)
        srows = (slice(s0, s1),)
        sizes = [k for s in steps for k in s.sizes]
        starts = np.cumsum([start, *sizes[:-1]], dtype=np.int64)
        self._write("step_start", srows, starts)
        self._write("step_positions", srows, np.array(sizes, dtype=np.int32))
        self._write("step_time", srows, np.array([t for s in steps for t in s.times],
                                                 dtype=np.float64))

        # Data first, then the counter that makes it visible.
        self._backend.flush()
        self._durable = (end, s1)
        self._arrays["commit"][(slice(0, 2),)] = np.array([end, s1], dtype=np.int64)
        self._backend.flush()
        self._committed = (end, s1)
        if self._cap is not None:
            self._cap.measured(end, self._backend.allocated_bytes())

    def _helper(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tracekit-summaries")
        return self._pool

    def _commit_attention(self, steps: list[_Step], start: int, end: int, logical: str) -> None:
        n = end - start
        keys = max(s.arrays["attention"].shape[3] for s in steps)
        layers, heads = self.plan.dim_sizes()["layer"], self.plan.dim_sizes()["head"]
        if len(steps) == 1 and steps[0].arrays["attention"].shape[3] == keys:
            block = _to_stored(steps[0].arrays["attention"], logical)
        else:
            block = np.zeros((n, layers, heads, keys), dtype=storage_dtype(logical))
            for s in steps:
                a = s.arrays["attention"]
                block[s.start - start: s.start - start + s.n, :, :, : a.shape[3]] = _to_stored(
                    a, logical)
        self._write_attention_tiles(start, block)
        if all("attention_top_keys" in s.arrays for s in steps):
            top_k = np.concatenate([s.arrays["attention_top_keys"] for s in steps])
            top_w = np.concatenate([s.arrays["attention_top_weights"] for s in steps])
        else:
            top_k, top_w = attention_top_k(_as_float32(block), self.plan.attention_top_k)
        rows = (slice(start, end),)
        self._write("attention_top_keys", rows, np.asarray(top_k, dtype=np.int32))
        self._write("attention_top_weights", rows, np.asarray(top_w, dtype=np.float32))

    def _write_attention_tiles(self, start: int, block: np.ndarray) -> None:
        """Write attention rows ``start:start+len(block)`` tile row by tile row. A causal
        model's query attends to no later key, so each tile row is written only up to its last
        query's key: tiles wholly above the diagonal are never written (readers see the fill
        value, 0), and the trace costs about the triangle it holds."""
        arr = self._arrays["attention"]
        tile = self.plan.attention_tile[0]
        causal = self.plan.model.kind == "causal"
        end = start + len(block)
        lo = start
        while lo < end:
            hi = min(end, (lo // tile + 1) * tile)
            keys = min(block.shape[-1], hi) if causal else block.shape[-1]
            arr.write_rows(lo, [block[lo - start: hi - start, ..., :keys]])
            lo = hi

    def _track(self, name: str, values: np.ndarray) -> None:
        lo, hi = float(np.min(values)), float(np.max(values))
        cur = self._ranges.get(name)
        self._ranges[name] = [lo, hi] if cur is None else [min(cur[0], lo), max(cur[1], hi)]
