"""``tracekit validate``: check a trace against the spec, one precise line per problem.

Checks, in order: it opens and is a trace; the metadata follows the JSON Schema and version
rules; copies of the metadata agree (zarr's consolidated metadata, which xarray reads, and
each array's own, which tracekit reads); every promised array exists with the right dimension
names, shape and dtype, and only allowlisted codecs; from format 1.1, every array's chunks
carry a checksum; coordinates match their definition (unless ``quick``: only those the
metadata selects); the commit counter, step table and token table agree; no committed chunk
is missing; (unless ``quick``) every committed chunk decodes and, having a checksum, verifies;
and (``deep``) every stored chunk of every array, coordinates and the counter included, is
read whole and checked against its checksum, each failing chunk reported by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceError, one_line
from .format import GROWING_DIMS, TracePlan, parse_version
from .reader import Trace
from .schema import schema_errors
from .storage import is_url, open_backend

Progress = Callable[[int, int], None]


#: The first format version whose chunks carry checksums.
CHECKSUMS_SINCE = (1, 1)


def validate(path: str | os.PathLike[str], *, quick: bool = False, deep: bool = False,
             progress: Progress | None = None, **options: Any) -> list[str]:
    """Problems found in the trace at ``path`` (empty when it is valid): one printable line of
    bounded length each (they quote values from the trace), a sentence about the trace that
    does not repeat its path (the CLI prints it once, before each). ``quick``: structure
    only; ``deep``: also read every stored chunk whole and check its checksum."""
    prefix = f"{path}: "
    return [one_line(p.removeprefix(prefix))
            for p in _problems(path, quick, deep, progress, options)]


def _problems(path: str | os.PathLike[str], quick: bool, deep: bool,
              progress: Progress | None, options: dict[str, Any]) -> list[str]:
    try:
        backend = open_backend(path if is_url(path) else Path(path), **options)
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
        trace = (Trace(backend, location=str(path)) if is_url(path)
                 else Trace(backend, Path(path)))
    except TraceError as exc:
        backend.close()
        return problems or [str(exc)]
    with trace:
        for check in (_check_arrays, _check_checksums_present, _check_tables):
            if not problems:
                problems += _guarded(check, trace)
        if not problems and not quick:
            problems += _guarded(_check_coordinates, trace)
        if deep and not problems:
            problems += _check_checksums(trace)
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


def _check_coordinates(trace: Trace) -> list[str]:
    """Every coordinate, as stored (growing ones past the committed length too), against its
    definition: 0, 1, 2, ... except point and layer, which the metadata lists."""
    problems = []
    for dim in trace.plan.used_dims():
        stored = trace[dim]._stored
        try:
            got = stored[(slice(0, stored.shape[0]),)]
        except TraceError as exc:
            problems.append(f"coordinate {dim!r}: {exc}")
            continue
        want = trace.plan.coordinate_values(dim)[: len(got)]
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0]) if len(got) == len(want) else 0
            problems.append(f"coordinate {dim!r} differs from its definition at index {bad} "
                            f"(stored {got[bad] if len(got) else None}, expected "
                            f"{want[bad] if len(want) else None})")
    return problems


def _check_checksums_present(trace: Trace) -> list[str]:
    """From format 1.1 every chunk carries a checksum (zarr crc32c codec, HDF5 Fletcher-32)."""
    if parse_version(trace.metadata.get("version")) < CHECKSUMS_SINCE:
        return []
    return [f"array {name!r} has no chunk checksum (format {trace.metadata['version']} needs "
            f"the zarr crc32c codec or the HDF5 Fletcher-32 filter)"
            for name in [*trace.plan.used_dims(), *trace.array_names()]
            if trace[name]._stored.checksum is None]


def _check_checksums(trace: Trace) -> list[str]:
    """Read every stored chunk of every array whole and check its checksum. In a trace still
    being recorded, chunks extending past the committed rows are skipped (section 6 of the
    spec: they may carry a stale checksum)."""
    problems = []
    finalized = trace.status in ("complete", "aborted")
    committed = {"position": trace.n_positions, "key": trace.n_positions,
                 "step": trace.n_steps}
    for name in [*trace.plan.used_dims(), *trace.array_names()]:
        arr = trace[name]
        lead = arr.dims[0]
        rows = None if finalized or name in trace.plan.used_dims() or (
            lead not in GROWING_DIMS) else committed[lead]
        try:
            problems += arr._stored.verify_chunks(rows)
        except TraceError as exc:
            problems.append(str(exc))
    return problems


def _check_tables(trace: Trace) -> list[str]:
    problems = []
    n, steps = trace.n_positions, trace.n_steps
    if trace.complete and steps == 0 and parse_version(trace.metadata["version"]) >= (1, 1):
        problems.append("status complete but no step recorded (an empty trace is aborted)")
    elif trace.complete and trace.prompt_length > n:
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
    if trace.has_vocab:
        try:
            len(trace.vocab)  # reading it checks its lengths against vocab_bytes
        except TraceError as exc:
            problems.append(str(exc))
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
        # One chunk at a time (key chunks too; the reader checked that chunks hold whole
        # rows along every other axis), so no read is larger than a chunk.
        width = arr.shape[-1] if arr.dims[-1] == "key" else 1
        keys = max(1, arr.chunks[-1]) if arr.dims[-1] == "key" else 1
        try:
            for start in range(0, arr.shape[0], block):
                for k in range(0, width, keys):
                    key = (slice(start, start + block), Ellipsis) if width == 1 else (
                        slice(start, start + block), Ellipsis, slice(k, k + keys))
                    part = arr[key]
                    done += part.nbytes
                    if progress:
                        progress(done, total)
        except TraceError as exc:
            problems.append(str(exc))
    return problems
