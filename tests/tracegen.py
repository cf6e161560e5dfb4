"""Synthetic traces with deterministic data, for tests on every backend.

Every value of a synthetic trace is a function of ``(seed, position)`` only (plus the step
layout, which is a function of ``(seed, n_positions)``), so a test can recompute the exact
expected contents of any prefix of a trace, e.g. the committed part of a trace whose writer
was killed, without knowing when the writer stopped.

Typical use::

    plan = small_plan()
    expected = write_synthetic(tmp_path / "t.zarr", plan, seed=3)
    with tracekit.open(tmp_path / "t.zarr") as trace:
        assert_trace_matches(trace, expected)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import tracekit
from tracekit.format import CAPTURE_GROUPS, ModelInfo, TracePlan
from tracekit.storage import Backend

#: Wall-clock time of step 0; step i is ``STEP_TIME_0 + 0.5 * i`` (exact in float64).
STEP_TIME_0 = 1_700_000_000.0


def small_model(n_layers: int = 3, d_model: int = 8, n_heads: int = 2, d_mlp: int = 12,
                vocab_size: int = 500) -> ModelInfo:
    return ModelInfo(name="synthetic/tiny", n_layers=n_layers, d_model=d_model,
                     n_heads=n_heads, vocab_size=vocab_size, d_mlp=d_mlp,
                     architecture="SyntheticForCausalLM", model_type="synthetic")


def small_plan(*, max_positions: int = 20, captured: Sequence[str] = CAPTURE_GROUPS,
               layers: Sequence[int] | None = None, stored_dtype: str = "float16",
               chunk_bytes: int = 1024, top_k: int = 3, attention_top_k: int = 2,
               token_bytes: int = 6, compression: str | None = None,
               model: ModelInfo | None = None) -> TracePlan:
    """A plan small enough to write in milliseconds but with several chunks per array."""
    return TracePlan(model=model or small_model(), max_positions=max_positions,
                     captured=frozenset(captured), layers=None if layers is None else
                     tuple(layers), stored_dtype=stored_dtype, top_k=top_k,
                     attention_top_k=attention_top_k, token_bytes=token_bytes,
                     compression=compression, chunk_bytes=chunk_bytes)


# -- deterministic content ------------------------------------------------------------------
def step_sizes(seed: int, n_positions: int) -> list[int]:
    """How many positions each step computes: a prompt step, then mostly single tokens."""
    rng = np.random.default_rng([seed, 7_001])
    sizes: list[int] = []
    total = 0
    first = True
    while total < n_positions:
        n = int(rng.integers(1, 6)) if first else int(rng.choice([1, 1, 1, 2, 3]))
        n = min(n, n_positions - total)
        sizes.append(n)
        total += n
        first = False
    return sizes


def token_text(seed: int, position: int, width: int) -> bytes:
    """Token bytes: mostly ASCII, sometimes invalid UTF-8, sometimes longer than ``width``."""
    rng = np.random.default_rng([seed, position, 1])
    length = int(rng.integers(0, width + 3))
    if rng.random() < 0.25:
        return bytes(rng.integers(0, 256, size=length, dtype=np.uint8))
    return bytes(rng.integers(32, 127, size=length, dtype=np.uint8))


def position_rows(plan: TracePlan, seed: int, position: int) -> dict[str, Any]:
    """Everything the recorder would produce for one position (float32 before storing).

    ``attention`` is the row over keys ``0..position`` (causal); keys after it are zero.
    """
    rng = np.random.default_rng([seed, position])
    sizes = plan.dim_sizes()
    points, layers, heads = sizes["point"], sizes["layer"], sizes["head"]
    d, rank = sizes["hidden"], sizes["rank"]
    rows: dict[str, Any] = {
        "token_id": int(rng.integers(0, plan.model.vocab_size)),
        "token_text": token_text(seed, position, plan.token_bytes),
    }
    cap = plan.captured
    if "residual" in cap:
        rows["residual"] = rng.normal(0, 2, (points, d)).astype(np.float32)
    if "attn_out" in cap:
        rows["attn_out"] = rng.normal(0, 1, (layers, d)).astype(np.float32)
    if "mlp_out" in cap:
        rows["mlp_out"] = rng.normal(0, 1, (layers, d)).astype(np.float32)
    if "attention" in cap:
        w = rng.random((layers, heads, position + 1)).astype(np.float32) + np.float32(0.01)
        rows["attention"] = w / w.sum(axis=-1, keepdims=True)
    if "neurons" in cap:
        rows["neurons"] = rng.normal(0, 1, (layers, sizes["neuron"])).astype(np.float32)
    if "predictions" in cap:
        rows["top_ids"] = rng.integers(0, plan.model.vocab_size, rank).astype(np.int32)
        rows["top_logprobs"] = np.sort(-rng.exponential(2, rank)).astype(np.float32)[::-1]
    if "logit_lens" in cap:
        rows["lens_ids"] = rng.integers(0, plan.model.vocab_size, (points, rank)).astype(
            np.int32)
        rows["lens_logprobs"] = (-rng.exponential(2, (points, rank))).astype(np.float32)
    return rows


_INPUTS = ("residual", "attn_out", "mlp_out", "neurons", "top_ids", "top_logprobs",
           "lens_ids", "lens_logprobs")


def iter_steps(plan: TracePlan, seed: int, n_positions: int, sizes: Sequence[int] | None = None
               ) -> Iterator[tuple[list[int], list[bytes], dict[str, np.ndarray], float]]:
    """The ``write_step`` arguments of a synthetic recording, step by step.

    ``sizes`` (positions per step) defaults to :func:`step_sizes`."""
    sizes = step_sizes(seed, n_positions) if sizes is None else sizes
    assert sum(sizes) == n_positions and all(n >= 1 for n in sizes)
    start = 0
    for index, n in enumerate(sizes):
        rows = [position_rows(plan, seed, p) for p in range(start, start + n)]
        arrays = {name: np.stack([r[name] for r in rows]) for name in _INPUTS
                  if name in rows[0]}
        if "attention" in rows[0]:
            keys = start + n
            att = np.zeros((n, *rows[0]["attention"].shape[:2], keys), dtype=np.float32)
            for i, r in enumerate(rows):
                att[i, :, :, : start + i + 1] = r["attention"]
            arrays["attention"] = att
        yield ([r["token_id"] for r in rows], [r["token_text"] for r in rows], arrays,
               STEP_TIME_0 + 0.5 * index)
        start += n


# -- expected contents ----------------------------------------------------------------------
def stored_values(x: np.ndarray, stored_dtype: str) -> np.ndarray:
    """What the reader hands back for float32 data stored as ``stored_dtype``."""
    if stored_dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(np.dtype(stored_dtype))


@dataclass
class Expected:
    """The exact contents of the first ``n_positions`` positions of a synthetic trace."""

    plan: TracePlan
    seed: int
    n_positions: int
    n_steps: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    texts: list[bytes] = field(default_factory=list)


def expected_contents(plan: TracePlan, seed: int, n_positions: int,
                      sizes: Sequence[int] | None = None) -> Expected:
    """Expected arrays (logical dtypes) for positions ``0..n_positions`` of a synthetic trace.

    ``sizes`` are the positions per step (default :func:`step_sizes`). Since every commit ends
    at a step boundary, ``expected_contents(plan, seed, n)`` is also the exact committed
    content of a longer recording with the same seed that stopped after ``n`` positions."""
    sizes = list(step_sizes(seed, n_positions) if sizes is None else sizes)
    assert sum(sizes) == n_positions, "n_positions must end a step"
    n_steps = len(sizes)
    starts = np.cumsum([0, *sizes])[:-1]
    rows = [position_rows(plan, seed, p) for p in range(n_positions)]
    dt = plan.stored_dtype
    dims = plan.dim_sizes()
    arrays: dict[str, np.ndarray] = {
        "token_id": np.array([r["token_id"] for r in rows], dtype=np.int64),
        "token_nbytes": np.array([len(r["token_text"]) for r in rows], dtype=np.int32),
        "token_step": np.repeat(np.arange(n_steps, dtype=np.int32), sizes),
        "step_start": starts[:n_steps].astype(np.int64),
        "step_positions": np.array(sizes[:n_steps], dtype=np.int32),
        "step_time": STEP_TIME_0 + 0.5 * np.arange(n_steps, dtype=np.float64),
    }
    tb = np.zeros((n_positions, plan.token_bytes), dtype=np.uint8)
    for i, r in enumerate(rows):
        raw = r["token_text"][: plan.token_bytes]
        tb[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    arrays["token_bytes"] = tb

    def stack(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if not rows:
            return np.zeros((0, *shape), dtype=dtype)
        return np.stack([r[name] for r in rows]).astype(dtype)

    L, H, D = dims["layer"], dims["head"], dims["hidden"]
    for name, shape in (("residual", (dims["point"], D)), ("attn_out", (L, D)),
                        ("mlp_out", (L, D)), ("neurons", (L, dims["neuron"]))):
        if _group_of(name) in plan.captured:
            arrays[name] = stored_values(stack(name, shape, np.float32), dt)
    for name, shape, dtype in (("top_ids", (dims["rank"],), np.int32),
                               ("top_logprobs", (dims["rank"],), np.float32),
                               ("lens_ids", (dims["point"], dims["rank"]), np.int32),
                               ("lens_logprobs", (dims["point"], dims["rank"]), np.float32)):
        if _group_of(name) in plan.captured:
            arrays[name] = stack(name, shape, dtype)
    if "attention" in plan.captured:
        att = np.zeros((n_positions, L, H, n_positions), dtype=np.float32)
        for p, r in enumerate(rows):
            att[p, :, :, : p + 1] = r["attention"]
        arrays["attention"] = stored_values(att, dt)
    texts = [r["token_text"] for r in rows]
    return Expected(plan, seed, n_positions, n_steps, arrays, texts)


def _group_of(name: str) -> str:
    from tracekit.format import SPECS_BY_NAME

    return SPECS_BY_NAME[name].group  # type: ignore[return-value]


# -- writing --------------------------------------------------------------------------------
def write_synthetic(target: str | os.PathLike[str] | Backend, plan: TracePlan, seed: int = 0,
                    n_positions: int | None = None, *, sizes: Sequence[int] | None = None,
                    status: str = "complete",
                    format: str | None = None, **create_kwargs: Any) -> Expected:
    """Record a synthetic trace of ``n_positions`` (default: all planned) into ``target``,
    close it with ``status`` and return its exact expected contents."""
    n = plan.max_positions if n_positions is None else n_positions
    sizes = step_sizes(seed, n) if sizes is None else list(sizes)
    writer = create_synthetic(target, plan, seed, format=format,
                              prompt_length=sizes[0] if sizes else 0, **create_kwargs)
    feed_synthetic(writer, plan, seed, n, sizes)
    writer.close(status)
    return expected_contents(plan, seed, n, sizes)


def create_synthetic(target: str | os.PathLike[str] | Backend, plan: TracePlan, seed: int = 0,
                     **create_kwargs: Any) -> tracekit.TraceWriter:
    """``tracekit.create`` with the metadata every synthetic trace carries (the prompt is the
    first step unless ``prompt_length`` is given)."""
    create_kwargs.setdefault("prompt_length", step_sizes(seed, plan.max_positions)[0])
    return tracekit.create(target, plan, run={"prompt": "synthetic", "seed": seed},
                           tags={"generator": "tests/tracegen.py"}, **create_kwargs)


def feed_synthetic(writer: tracekit.TraceWriter, plan: TracePlan, seed: int,
                   n_positions: int, sizes: Sequence[int] | None = None) -> None:
    """Write the synthetic steps covering ``n_positions`` positions."""
    for ids, texts, arrays, t in iter_steps(plan, seed, n_positions, sizes):
        writer.write_step(ids, texts, arrays, step_time=t)


# -- checking -------------------------------------------------------------------------------
def assert_bit_exact(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    a = np.ascontiguousarray(actual).view(np.uint8)
    e = np.ascontiguousarray(expected).view(np.uint8)
    if not np.array_equal(a, e):
        bad = np.argwhere(np.ascontiguousarray(actual) != np.ascontiguousarray(expected))
        raise AssertionError(f"array {name!r} differs at {len(bad)} places, first {bad[:3]}")


def assert_trace_matches(trace: tracekit.Trace, expected: Expected,
                         summaries: bool = True) -> None:
    """Every committed array of ``trace`` equals ``expected`` bit for bit (summaries: their
    defining property, since float sums may be ordered differently)."""
    assert trace.n_positions == expected.n_positions
    assert trace.n_steps == expected.n_steps
    for name, want in expected.arrays.items():
        assert_bit_exact(name, trace[name][:], want)
    assert [t.raw for t in trace.tokens] == [
        raw[: expected.plan.token_bytes] for raw in expected.texts]
    assert [t.truncated for t in trace.tokens] == [
        len(raw) > expected.plan.token_bytes for raw in expected.texts]
    if summaries:
        assert_summaries(trace, expected)


def assert_summaries(trace: tracekit.Trace, expected: Expected) -> None:
    a = expected.arrays
    for group in ("residual", "attn_out", "mlp_out"):
        if group in a:
            values = a[group].astype(np.float32)
            norms = np.sqrt((values.astype(np.float64) ** 2).sum(-1))
            np.testing.assert_allclose(trace[f"{group}_norm"][:], norms, rtol=1e-5, atol=1e-6)
    for group in ("residual", "attn_out", "mlp_out", "neurons"):
        if group in a:
            values = a[group].astype(np.float32)
            flat = values.reshape(len(values), int(np.prod(values.shape[1:])))
            rng = np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1) if len(flat) else (
                np.zeros((0, 2), np.float32))
            assert_bit_exact(f"{group}_range", trace[f"{group}_range"][:], rng)
    if "attention" in a:
        att = a["attention"].astype(np.float32)
        keys = trace["attention_top_keys"][:]
        weights = trace["attention_top_weights"][:]
        k = keys.shape[-1]
        want = -np.sort(-att, axis=-1)[..., :k]
        want = np.where(want > 0, want, 0).astype(np.float32)
        if want.shape[-1] < k:  # fewer keys than ranks: the rest is empty
            want = np.concatenate(
                [want, np.zeros((*want.shape[:-1], k - want.shape[-1]), np.float32)], -1)
        assert_bit_exact("attention_top_weights", weights, want)
        valid = keys >= 0
        assert np.array_equal(valid, want > 0)
        picked = np.take_along_axis(att, np.where(valid, keys, 0), axis=-1)
        assert np.array_equal(np.where(valid, picked, 0), want)


def chunk_files(trace: Path, name: str) -> list[Path]:
    """The chunk files of array ``name`` of a zarr trace (``c.0.1`` or ``c/0/1`` keys)."""
    folder = trace / name
    return sorted(p for p in (*folder.glob("c.*"), *(folder / "c").rglob("*")) if p.is_file())


# -- a writer process to kill -----------------------------------------------------------------
def kill_plan() -> TracePlan:
    """The plan of the kill test: dense, sparse (attention) and integer arrays in several
    chunks, and few arrays in all, so that a recording takes a fraction of a second."""
    return small_plan(max_positions=16, chunk_bytes=768,
                      captured=["residual", "attention", "predictions"])


def record_in_child(path: str, seed: int, started: Any, step_pause: float = 0.002,
                    die_at_io: int | None = None, progress: Any = None) -> None:
    """Body of the writer process the kill test SIGKILLs: records :func:`kill_plan` to
    ``path``, committing after every step, and sets ``started`` just before creating it.
    ``progress`` (a shared ``multiprocessing.Value``): set to the number of steps handed to
    the writer, so that a test can time a kill by the recording's progress, not the clock.

    ``die_at_io=i``: the process SIGKILLs itself just before its i-th (0-based) call of
    ``os.pwritev``, ``os.replace`` or ``os.rename`` (the zarr backend's writes to disk), so
    that a test can stop a recording at every write it makes."""
    import os
    import signal
    import time

    if die_at_io is not None:
        calls = [0]

        def deadly(fn):
            def call(*args, **kwargs):
                if calls[0] == die_at_io:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls[0] += 1
                return fn(*args, **kwargs)
            return call

        os.pwritev, os.replace, os.rename = (deadly(os.pwritev), deadly(os.replace),
                                             deadly(os.rename))
    plan = kill_plan()
    started.set()
    writer = create_synthetic(path, plan, seed, commit_interval=0.0)
    for ids, texts, arrays, t in iter_steps(plan, seed, plan.max_positions):
        writer.write_step(ids, texts, arrays, step_time=t)
        if progress is not None:
            progress.value += 1
        time.sleep(step_pause)  # the model computing the next step
    writer.close()
