"""Random valid traces, written and read back identical, on every backend.

Hypothesis draws the model shape, which groups and layers are captured, the stored dtype, the
chunking, compression, how many positions each step computes, and how often the writer
commits; every backend must hand back exactly the data that went in.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import tracegen
from conftest import BACKENDS, trace_target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracekit
from tracekit.format import CAPTURE_GROUPS, ModelInfo, TracePlan

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)


@st.composite
def plans(draw: st.DrawFn) -> TracePlan:
    n_layers = draw(st.integers(1, 4))
    d_mlp = draw(st.one_of(st.none(), st.integers(1, 6)))
    model = ModelInfo(
        name=draw(st.text(max_size=12)), n_layers=n_layers, d_model=draw(st.integers(1, 8)),
        n_heads=draw(st.integers(1, 3)), vocab_size=draw(st.integers(2, 5000)), d_mlp=d_mlp,
        kind=draw(st.sampled_from(["causal", "encoder"])))
    groups = [g for g in CAPTURE_GROUPS if g != "neurons" or d_mlp is not None]
    captured = draw(st.sets(st.sampled_from(groups)))
    layers = draw(st.sets(st.integers(0, n_layers - 1), min_size=1))
    return TracePlan(
        model=model, max_positions=draw(st.integers(1, 24)), captured=frozenset(captured),
        layers=tuple(layers), stored_dtype=draw(st.sampled_from(["float32", "float16",
                                                                  "bfloat16"])),
        top_k=draw(st.integers(1, 4)), attention_top_k=draw(st.integers(1, 4)),
        token_bytes=draw(st.integers(1, 8)),
        compression=draw(st.sampled_from([None, "zstd", "gzip"])),
        chunk_bytes=draw(st.sampled_from([64, 300, 1024, 1 << 20])))


@st.composite
def recordings(draw: st.DrawFn) -> tuple[TracePlan, list[int], int, dict]:
    """A plan, the positions each step computes, a data seed and writer settings."""
    plan = draw(plans())
    n = draw(st.integers(0, plan.max_positions))
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(draw(st.integers(1, n - sum(sizes))))
    writer = {"commit_interval": draw(st.sampled_from([0.0, 1.0])),
              "queue_size": draw(st.sampled_from([1, 32]))}
    return plan, sizes, draw(st.integers(0, 2**32 - 1)), writer


def check_round_trip(target, plan: TracePlan, sizes: list[int], seed: int,
                     writer: dict) -> None:
    n = sum(sizes)
    expected = tracegen.write_synthetic(target, plan, seed, n, sizes=sizes, **writer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trace of this version opens without warnings
        trace = tracekit.open(target)
    with trace:
        assert trace.status == ("complete" if sizes else "aborted")  # spec 3: empty is aborted
        assert trace.plan == TracePlan.from_metadata(trace.metadata)
        assert trace.model["name"] == plan.model.name
        assert trace.layers == list(plan.layers)
        assert set(trace.captured) == set(plan.captured)
        assert trace.metadata["capture"]["stored_dtype"] == plan.stored_dtype
        assert trace.metadata["length"] == {"positions": n, "steps": len(sizes)}
        assert trace.prompt_length == (sizes[0] if sizes else 0)
        for dim in ("point", "layer"):
            if dim in plan.used_dims():
                assert np.array_equal(trace.coords(dim), plan.coordinate_values(dim))
        tracegen.assert_trace_matches(trace, expected)
        for name in trace.array_names():  # every array reads, lengths bounded by the counter
            arr = trace[name]
            assert arr[...].shape == arr.shape
    if not isinstance(target, Path):
        return
    from tracekit.validate import validate

    assert validate(target) == []


@settings(max_examples=12, **SETTINGS)
@given(recordings())
def test_random_traces_round_trip_on_every_backend(recording) -> None:
    plan, sizes, seed, writer = recording
    with tempfile.TemporaryDirectory() as tmp:
        for kind in BACKENDS:
            check_round_trip(trace_target(Path(tmp), kind), plan, sizes, seed, writer)


@settings(max_examples=60, **SETTINGS)
@given(recordings())
def test_random_traces_round_trip_in_memory(recording) -> None:
    """The same property with many more examples, on the fast backend (writer logic)."""
    plan, sizes, seed, writer = recording
    check_round_trip(trace_target(Path("."), "memory"), plan, sizes, seed, writer)


def axis_index(n: int) -> st.SearchStrategy:
    """An index for an axis of length ``n``: an int, a slice, or a list of ints."""
    options = [st.slices(max(n, 1))]
    if n:
        options += [st.integers(-n, n - 1),
                    st.lists(st.integers(-n, n - 1), min_size=1, max_size=4)]
    return st.one_of(*options)


@settings(max_examples=25, **SETTINGS)
@given(plan=plans(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_lazy_indexing_matches_numpy(plan: TracePlan, seed: int, data) -> None:
    """Ints, slices (any step) and one int list on a LazyArray give what numpy gives."""
    target = trace_target(Path("."), "memory")
    expected = tracegen.write_synthetic(target, plan, seed)
    trace = tracekit.open(target)
    for name, want in expected.arrays.items():
        rank = data.draw(st.integers(0, want.ndim), label=f"{name} rank")
        key = [data.draw(axis_index(n), label=f"{name}[{axis}]")
               for axis, n in enumerate(want.shape[:rank])]
        lists = [a for a, k in enumerate(key) if isinstance(k, list)]
        for axis in lists[1:]:  # one integer array at most
            key[axis] = key[axis][0]
        got = trace[name][tuple(key)]
        tracegen.assert_bit_exact(name, np.asarray(got), outer_index(want, key))


def outer_index(array: np.ndarray, key: list) -> np.ndarray:
    """numpy indexing with the int list applied on its own axis (outer indexing, as
    LazyArray documents; numpy moves the axis first when a slice separates it from an int)."""
    lists = [a for a, k in enumerate(key) if isinstance(k, list)]
    if not lists:
        return np.asarray(array[tuple(key)])
    axis = lists[0]
    basic = array[tuple(slice(None) if a == axis else k for a, k in enumerate(key))]
    kept = sum(1 for k in key[:axis] if not isinstance(k, int))
    return np.take(basic, key[axis], axis=kept)
