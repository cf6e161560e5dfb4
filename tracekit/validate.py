"""``tracekit validate``: check a trace against the spec, one precise line per problem.

Checks, in order: it opens and is a trace; the metadata follows the JSON Schema and version
rules; copies of the metadata agree (zarr's consolidated metadata, which xarray reads, and
each array's own, which tracekit reads); every promised array exists with the right dimension
names, shape and dtype, and only allowlisted codecs; coordinates match the metadata; the
commit counter, step table and token table agree; no committed chunk is missing; and (unless
``quick``) every committed chunk decodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import TraceError
from .format import TracePlan
from .reader import Trace
from .schema import schema_errors
from .storage import open_backend

Progress = Callable[[int, int], None]


def validate(path: str | os.PathLike[str], *, quick: bool = False,
             progress: Progress | None = None) -> list[str]:
    """Problems found in the trace at ``path`` (empty when it is valid)."""
    try:
        backend = open_backend(Path(path))
    except TraceError as exc:
        return [str(exc)]
    try:
        meta = backend.read_root_meta()
    except TraceError as exc:
        backend.close()
        return [str(exc)]
    problems = schema_errors(meta)
    try:
        problems += backend.metadata_problems()
    except TraceError as exc:
        problems.append(str(exc))
    try:
        trace = Trace(backend, Path(path))
    except TraceError as exc:
        backend.close()
        return problems or [str(exc)]
    with trace:
        for check in (_check_arrays, _check_tables):
            if not problems:
                problems += _guarded(check, trace)
        if not problems:
            problems += _check_chunks(trace, quick, progress)
    return problems


def _guarded(check: Callable[[Trace], list[str]], trace: Trace) -> list[str]:
    """Run a check; a structure too broken to check further is itself the problem."""
    try:
        return check(trace)
    except TraceError as exc:
        return [str(exc)]


def _check_arrays(trace: Trace) -> list[str]:
    problems = []
    plan: TracePlan = trace.plan
    for name in [*plan.used_dims(), *trace.array_names()]:
        try:
            trace[name]
        except TraceError as exc:
            problems.append(str(exc))
    for dim in ("point", "layer"):
        if dim in plan.used_dims() and not problems:
            got = trace.coords(dim)
            want = plan.coordinate_values(dim)
            if not np.array_equal(got, want):
                problems.append(f"coordinate {dim!r} is {got.tolist()}, metadata says "
                                f"{want.tolist()}")
    return problems


def _check_tables(trace: Trace) -> list[str]:
    problems = []
    n, steps = trace.n_positions, trace.n_steps
    if trace.complete and trace.prompt_length > n:
        problems.append(f"prompt_length {trace.prompt_length} exceeds {n} positions")
    starts = trace["step_start"][:]
    counts = trace["step_positions"][:]
    if steps:
        expected_starts = np.concatenate([[0], np.cumsum(counts[:-1], dtype=np.int64)])
        if (counts < 1).any():
            problems.append("step table has a step with no positions")
        elif not np.array_equal(starts, expected_starts):
            problems.append("step_start does not follow from step_positions")
        elif int(starts[-1] + counts[-1]) != n:
            problems.append(f"steps cover {int(starts[-1] + counts[-1])} positions, commit "
                            f"counter says {n}")
        else:
            token_step = trace["token_step"][:]
            expected = np.repeat(np.arange(steps, dtype=np.int32), counts)
            if not np.array_equal(token_step, expected):
                problems.append("token_step disagrees with the step table")
    elif n:
        problems.append(f"{n} positions committed but no step")
    nbytes = trace["token_nbytes"][:]
    if (nbytes < 0).any():
        problems.append("token_nbytes has negative lengths")
    vocab = trace.model["vocab_size"]
    ids = trace["token_id"][:]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"token ids outside the vocabulary 0..{vocab - 1}")
    return problems


def _stored_tile(plan: TracePlan, dims: tuple[str, ...], chunks: tuple[int, ...], rows: int):
    """For a key-indexed array, which tiles must be stored: those on or below the diagonal (a
    tile row's last query has keys up to itself at least); None: every chunk. Tiles above it
    hold zeros in a causal trace and are not written; an encoder's one step writes them all,
    but a trace written in several steps of an encoder's rows may lack them too."""
    if "key" not in dims:
        return None
    tile_rows, tile_keys = chunks[0], chunks[-1]

    def expected(index: tuple[int, ...]) -> bool:
        last_query = min(rows, (index[0] + 1) * tile_rows) - 1
        return index[-1] * tile_keys <= last_query

    return expected


def _check_chunks(trace: Trace, quick: bool, progress: Progress | None) -> list[str]:
    problems = []
    names = [n for n in trace.array_names() if n != "commit"]
    total = sum(trace[n].nbytes for n in names)
    done = 0
    for name in names:
        arr = trace[name]
        rows = trace.n_steps if arr.dims[0] == "step" else trace.n_positions
        expected = _stored_tile(trace.plan, arr.dims, arr.chunks, rows)
        missing = arr._stored.missing_chunks(rows, expected)
        if missing:
            problems.append(f"array {name!r}: {len(missing)} committed chunk(s) missing, "
                            f"first {missing[0]}")
            continue
        if quick:
            continue
        block = max(1, arr.chunks[0])
        try:
            for start in range(0, arr.shape[0], block):
                part = arr[start:start + block]
                done += part.nbytes
                if progress:
                    progress(done, total)
        except TraceError as exc:
            problems.append(str(exc))
    return problems
