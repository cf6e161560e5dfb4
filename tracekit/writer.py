"""The streaming trace writer the recorder feeds one step at a time.

Design (see the spec, "Writing"):

* Every array is created and preallocated to ``plan.max_positions`` before the first step; the
  trace is laid out under a temporary name and moved into place once complete, so a trace path
  that exists always has its full structure.
* Steps are handed to a background thread through a bounded hand-off (``queue_size`` steps),
  so the model only waits on disk when it is full. The thread is woken only when there is work
  worth a wake-up (it would take the GIL from the model's thread at every step otherwise): it
  commits when ``commit_bytes`` are pending at a multiple of ``plan.chunk_positions`` (whole
  chunks, no read-modify-write), and at least every ``commit_interval`` seconds (so a crash
  loses at most about that much; 0 commits every step).
* Commit protocol: write the data of the new positions (and their summaries), flush, then write
  the ``commit`` counter, flush. Readers trust only the counter, so a writer killed at any
  instant leaves a trace whose committed positions are exact.
* At the end, arrays are trimmed to the committed length once and the metadata is rewritten
  once with the final status. A failed write (disk full, I/O error) stops the recording and
  closes the trace ``aborted`` with every step whose data reached the disk (``_failure``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._failure import MAX_REASON_CHARS, failure_message, finish_after_failure
from ._writer_commit import _Committer, _Step
from .errors import TraceError, TraceFullError, WriterError
from .format import (
    FORMAT_VERSION_STR,
    SCHEMA_NAME,
    SPECS_BY_NAME,
    STEP_INPUT_ARRAYS,
    TracePlan,
)
from .layout import create_layout, trim_to
from .sizecap import SizeCap, disk_bytes
from .storage import Backend, create_backend, format_from_suffix, io_cause
from .summaries import _NORMS
from .vocab import plan_with_vocab

_STOP = object()
_FLUSH = object()
_COMMIT = object()  # commit the steps handed over before it


def _utcnow() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class TraceWriter(_Committer):
    """Writes one trace. Use :func:`create` to make one; feed :meth:`write_step`; then
    :meth:`close` (or use it as a context manager: an exception marks the trace ``aborted``).

    ``vocab``: the text of every token id in id order, stored so that predictions read as text
    without the tokenizer (:func:`tracekit.vocab.plan_with_vocab`).
    """

    def __init__(self, backend: Backend, plan: TracePlan, *, run: Mapping[str, Any] | None = None,
                 prompt_length: int = 0, tags: Mapping[str, Any] | None = None,
                 environment: Mapping[str, Any] | None = None, queue_size: int = 32,
                 commit_interval: float = 1.0, commit_bytes: int = 16 << 20,
                 vocab: Iterable[bytes | str] | None = None,
                 max_bytes: int | None = None) -> None:
        try:
            plan, packed = plan_with_vocab(plan, vocab)
        except BaseException:
            discard = getattr(backend, "discard", None)
            if discard is not None:
                discard()
            raise
        self.plan = plan
        self._format = backend.format_name
        # The size cap: a step that would take the finished trace past ``max_bytes`` on disk
        # (as plan.estimated_bytes counts it) is refused and the trace closes "truncated".
        self.max_bytes = max_bytes
        self._cap: SizeCap | None = None
        self._truncated = False
        self._disk_cache: tuple[tuple[int, int], int] | None = None
        self._commit_bytes = commit_bytes
        self._backend = backend
        self._commit_interval = commit_interval
        self._meta: dict[str, Any] = {
            "schema": SCHEMA_NAME,
            "version": FORMAT_VERSION_STR,
            "status": "recording",
            "created": _utcnow(),
            "finished": None,
            "length": None,
            "prompt_length": int(prompt_length),
            "model": plan.model.to_json(),
            "run": dict(run or {}),
            "capture": plan.capture_json(),
            "environment": {
                "tracekit": __version__,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "platform": platform.platform(),
                **dict(environment or {}),
            },
            "summary": None,
            "tags": dict(tags or {}),
        }
        self._specs = plan.array_specs()
        self._inputs = [s for s in STEP_INPUT_ARRAYS if SPECS_BY_NAME[s] in self._specs]
        try:
            create_layout(backend, plan, packed)
            meta_bytes = self._final_meta_bound()
            backend.write_root_meta(self._meta, capacity=meta_bytes)
            if max_bytes is not None:
                self._cap = SizeCap(plan, self._format, max_bytes, meta_bytes)
            backend.begin_streaming()
        except BaseException as exc:
            discard = getattr(backend, "discard", None)
            if discard is not None:
                with contextlib.suppress(Exception):
                    discard()
            if isinstance(exc, OSError | RuntimeError) and not isinstance(exc, TraceError):
                # h5py's errors span lines and name the temporary file
                raise WriterError(f"cannot create {backend.destination}: {io_cause(exc)}"
                                  ) from exc
            raise
        self._arrays = {s.name: backend.get_array(s.name) for s in self._specs}
        self._coords = {d: backend.get_array(d) for d in plan.used_dims()}
        self._row_shapes = self._expected_row_shapes()
        # What write_step accepts: the captured inputs and the summaries a producer may give.
        self._accepted = frozenset(self._inputs) | {
            _NORMS[a] for a in self._inputs if a in _NORMS} | (
            {"attention_top_keys", "attention_top_weights"} if "attention" in self._inputs
            else set())

        # Producer-side state.
        self._next_position = 0
        self._next_step = 0
        self._closed = False
        self.status = "recording"  #: the status in the metadata: final once closed
        self._final_meta_written = False
        # Worker-side state.
        self._committed = (0, 0)
        self._durable = (0, 0)  # steps whose data is written and flushed (the counter may lag)
        self._bytes_written = 0
        self._final_bytes: int | None = None
        self._ranges: dict[str, list[float]] = {}
        self._error: BaseException | None = None
        # Steps handed over and not yet taken by the writer thread. The thread is woken only
        # when a commit is due (a chunk-aligned run of commit_bytes, half the queue, a flush
        # or the end), not at every step: each wake-up costs the model's thread the GIL.
        self._cv = threading.Condition()
        self._handed: list[Any] = []
        self._queue_size = max(2, int(queue_size))
        self._since_cut = 0  # bytes handed over since the last commit point
        self._block = plan.chunk_positions
        self._flushed = threading.Event()
        self._pool: ThreadPoolExecutor | None = None  # summaries of large commits
        self._thread = threading.Thread(target=self._run, name="tracekit-writer", daemon=True)
        self._thread.start()

    def _expected_row_shapes(self) -> dict[str, tuple[int, ...]]:
        sizes = self.plan.dim_sizes()
        return {name: tuple(sizes[d] for d in SPECS_BY_NAME[name].dims[1:])
                for name in self._inputs}

    # -- producer API -----------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self._backend.path

    @property
    def committed_positions(self) -> int:
        return self._committed[0]

    @property
    def positions_written(self) -> int:
        """Positions handed to the writer so far (committed or still queued)."""
        return self._next_position

    @property
    def steps_written(self) -> int:
        """Steps handed to the writer so far (committed or still queued)."""
        return self._next_step

    @property
    def bytes_written(self) -> int:
        """Bytes on disk of the trace: while recording, what its committed positions take
        (:meth:`TracePlan.estimated_bytes`); once closed, the files' measured size."""
        if self._final_bytes is not None:
            return self._final_bytes
        committed = self._committed
        if self._disk_cache is None or self._disk_cache[0] != committed:
            self._disk_cache = (committed, self.plan.estimated_bytes(self._format, *committed))
        return self._disk_cache[1]

    @property
    def position_limit(self) -> int:
        """The most positions the trace may hold: ``max_positions``, or fewer under
        ``max_bytes`` (see :class:`~tracekit.sizecap.SizeCap`)."""
        return self.plan.max_positions if self._cap is None else self._cap.positions

    @property
    def truncated(self) -> bool:
        """True once a step was refused for the size cap (the trace closes ``truncated``)."""
        return self._truncated

    def truncate(self) -> None:
        """Stop here for the size cap: closing the trace then gives it status ``truncated``
        (the recorder calls it before computing a step that would not fit)."""
        self._truncated = True

    def write_step(self, token_ids: Sequence[int] | np.ndarray,
                   token_texts: Sequence[bytes | str], arrays: Mapping[str, np.ndarray],
                   *, step_time: float | None = None) -> None:
        """Queue one step: ``n`` new positions, their token ids and texts, and one array per
        captured input (leading axis ``n``; attention's last axis is the number of keys).

        Arrays must not be modified after the call; the writer thread reads them later.
        Summary arrays (``residual_norm``, ...) may be passed precomputed; the rest are derived.
        """
        n = int(np.size(token_ids))  # as write_steps counts them (flattened)
        self.write_steps(token_ids, token_texts, arrays, step_positions=(n,),
                         step_times=None if step_time is None else (step_time,))

    def write_steps(self, token_ids: Sequence[int] | np.ndarray,
                    token_texts: Sequence[bytes | str], arrays: Mapping[str, np.ndarray],
                    *, step_positions: Sequence[int],
                    step_times: Sequence[float] | None = None) -> None:
        """Queue several consecutive steps at once, ``step_positions[i]`` positions each: the
        same as one :meth:`write_step` per step, with every array's rows of all of them in
        one (attention over the last step's keys, a row's later keys 0). One call and one
        validation for the lot, which counts when steps are one token each."""
        self._raise_if_failed()
        if self._closed:
            raise WriterError("write_step on a closed writer")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        sizes = tuple(int(k) for k in step_positions)
        if n == 0 or not sizes or min(sizes) < 1:
            raise WriterError("a step must compute at least one position")
        if sum(sizes) != n:
            raise WriterError(f"steps of {sum(sizes)} positions in all for {n} token ids")
        if step_times is None:
            times = (time.time(),) * len(sizes)
        else:
            times = tuple(float(t) for t in step_times)
            if len(times) != len(sizes):
                raise WriterError(f"{len(times)} step times for {len(sizes)} steps")
        if self._next_position + n > self.position_limit and (
                self._next_position + n <= self.plan.max_positions):
            self._refuse_past_cap(token_ids, token_texts, arrays, sizes, step_times)
            return
        if self._next_position + n > self.plan.max_positions:
            raise WriterError(
                f"step would end at position {self._next_position + n}, beyond the planned "
                f"max_positions {self.plan.max_positions}")
        if len(token_texts) != n:
            raise WriterError(f"{len(token_texts)} token texts for {n} positions")
        texts = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in token_texts]
        if not self._accepted.issuperset(arrays):
            extra = sorted(set(arrays) - self._accepted)
            raise WriterError(f"step has array(s) not in the plan: {extra}")
        for name, want in self._row_shapes.items():
            a = arrays.get(name)
            if a is None:
                missing = sorted(x for x in self._inputs if x not in arrays)
                raise WriterError(f"step lacks captured array(s) {missing}")
            shape = a.shape if isinstance(a, np.ndarray) else np.shape(a)
            if name == "attention":
                ok = (len(shape) == 4 and shape[0] == n and shape[1:3] == want[:2]
                      and 1 <= shape[3] <= self.plan.max_positions)
                want_txt = f"({n}, {want[0]}, {want[1]}, keys<={self.plan.max_positions})"
            else:
                ok = shape[0] == n and shape[1:] == want if len(shape) else False
                want_txt = str((n, *want))
            if not ok:
                raise WriterError(f"array {name!r} has shape {tuple(shape)}, expected {want_txt}")
        step = _Step(self._next_position, n, self._next_step, ids, texts, dict(arrays), sizes,
                     times)
        self._next_position += n
        self._next_step += len(sizes)
        self._since_cut += sum(a.nbytes for a in arrays.values())
        # Big, chunk-aligned commits write whole chunks (commit_interval 0: every step).
        cut = self._commit_interval <= 0 or (
            (step.start + n) % self._block == 0 and self._since_cut >= self._commit_bytes)
        if cut:
            self._since_cut = 0
        self._put(step, cut)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every queued step is committed."""
        self._flushed.clear()
        self._put(_FLUSH, True)
        self._flushed.wait(timeout)
        self._raise_if_failed()

    def close(self, status: str = "complete") -> None:
        """Commit what is queued, trim the arrays, write the final metadata and close.

        ``status`` is ``complete`` or ``aborted`` (e.g. after Ctrl-C); ``complete`` becomes
        ``truncated`` once a step was refused for the size cap. A trace without a step, or
        without all of its ``prompt_length`` positions, is closed ``aborted`` whatever
        ``status`` says (spec section 3). If a write failed (disk full, I/O error), while
        recording or now, the trace is closed as ``aborted`` with every step whose data
        reached the disk and the cause as ``stop_reason``, and a WriterError naming the trace
        and the cause is raised. The status written is :attr:`status` afterwards.
        """
        if self._closed:
            return
        self._closed = True
        if status == "complete" and self._truncated:
            status = "truncated"
        self._put(_STOP, True, force=True)
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        error = self._error
        final = None
        try:
            if error is None:
                try:
                    self._finalize(status)
                except Exception as exc:
                    if not self._final_meta_written:
                        error = exc
                    else:  # finalized; only the optional consolidated metadata is missing
                        warnings.warn(f"{self._backend.destination}: {status}, but its "
                                      f"metadata was not consolidated: {io_cause(exc)}",
                                      stacklevel=2)
            if error is not None:
                final = finish_after_failure(self, error)
        finally:
            self._backend.close()
        if self._backend.path is not None and self._format != "memory":
            # Measured once closed (HDF5's close cuts the space kept ahead of its flushes).
            self._final_bytes = disk_bytes(self._backend.path)
        if error is not None:
            raise WriterError(failure_message(self, error, final)) from error

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or isinstance(exc, TraceFullError):  # the cap: closes "truncated"
            self.close("complete")
        else:
            with contextlib.suppress(TraceError):
                self.close("aborted")

    # -- internals --------------------------------------------------------------------------
    def _refuse_past_cap(self, token_ids, token_texts, arrays, sizes, step_times) -> None:
        """Queue the whole steps of a call that fit under the size cap, mark the trace
        truncated and raise TraceFullError for the rest."""
        ids = np.asarray(token_ids).reshape(-1)
        room = self.position_limit - self._next_position
        fit = 0
        while fit < len(sizes) and sum(sizes[:fit + 1]) <= room:
            fit += 1
        kept = sum(sizes[:fit])
        if fit:
            self.write_steps(ids[:kept], list(token_texts[:kept]),
                             {k: v[:kept] for k, v in arrays.items()},
                             step_positions=sizes[:fit],
                             step_times=None if step_times is None else step_times[:fit])
        self._truncated = True
        cap = self.max_bytes
        raise TraceFullError(
            f"stopped at {self._next_position} positions: the next step would take the trace "
            f"past its size cap of {cap} bytes")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterError(failure_message(self, self._error)) from self._error

    def _put(self, item: Any, commit: bool = False, force: bool = False) -> None:
        """Hand ``item`` to the writer thread (``commit``: and wake it to commit what it has);
        wait while ``queue_size`` items are already waiting."""
        with self._cv:
            while len(self._handed) >= self._queue_size and not force:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise WriterError("writer thread is gone") from self._error
                self._cv.notify_all()
                self._cv.wait(0.1)
            if self._error is not None and not force:
                self._raise_if_failed()
            self._handed.append(item)
            if commit:
                self._handed.append(_COMMIT)
            if commit or len(self._handed) >= self._queue_size // 2:
                self._cv.notify_all()

    def _take(self, timeout: float) -> list[Any]:
        """Everything handed over so far, once there is a reason to act or ``timeout`` has
        passed; frees the producer if it waits."""
        with self._cv:
            if not any(x is _COMMIT for x in self._handed) and len(self._handed) < (
                    self._queue_size // 2):
                self._cv.wait(timeout)
            items, self._handed = self._handed, []
            self._cv.notify_all()
        return items

    def _run(self) -> None:
        pending: list[_Step] = []
        last_commit = time.monotonic()
        while True:
            timeout = max(0.01, self._commit_interval - (time.monotonic() - last_commit))
            items = self._take(timeout)
            for item in items:
                if self._error is not None:  # keep draining so the producer never blocks
                    if item is _FLUSH:
                        self._flushed.set()
                    if item is _STOP:
                        return
                    continue
                try:
                    if isinstance(item, _Step):
                        pending.append(item)
                        continue
                    if pending:
                        self._commit(pending)
                        pending = []
                    last_commit = time.monotonic()
                    if item is _FLUSH:
                        self._flushed.set()
                    if item is _STOP:
                        return
                except BaseException as exc:  # surfaced to the producer
                    self._error = exc
                    pending = []
                    if item is _FLUSH:
                        self._flushed.set()
                    if item is _STOP:
                        return
            # The timer bounds how much a crash can lose when steps are slow.
            if pending and self._error is None and (
                    time.monotonic() - last_commit >= self._commit_interval):
                try:
                    self._commit(pending)
                except BaseException as exc:
                    self._error = exc
                pending = []
                last_commit = time.monotonic()


    def _final_meta_bound(self) -> int:
        """Bytes the metadata can take once finalized: what :meth:`_finalize` adds, each
        value as long as its JSON can be (float ranges of every tracked array, the longest
        status, the planned length)."""
        widest = -1.7976931348623157e308  # the longest float JSON writes: 24 characters
        tracked = [n for name in self._inputs for n in (name, _NORMS.get(name)) if n]
        final = {**self._meta, "status": "recording", "finished": _utcnow(),
                 "length": {"positions": self.plan.max_positions,
                            "steps": self.plan.max_positions},
                 "summary": {"value_ranges": {n: [widest, widest] for n in tracked}},
                 "stop_reason": "x" * MAX_REASON_CHARS}
        return len(json.dumps(final, sort_keys=True).encode("utf-8"))


    def _finalize(self, status: str) -> None:
        positions, steps = self._committed
        if steps == 0 or positions < self._meta["prompt_length"]:
            status = "aborted"  # nothing, or not even the prompt, was recorded
        self._trim()
        self._backend.end_streaming()
        self._set_final_meta(status)
        self._backend.write_root_meta(self._meta)
        self._final_meta_written = True
        self._backend.seal()

    def _trim(self) -> None:
        positions, steps = self._committed
        trim_to([*self._arrays.values(), *self._coords.values()], positions, steps)
        self._backend.flush()

    def _set_final_meta(self, status: str, reason: str | None = None) -> None:
        positions, steps = self._committed
        self.status = status
        self._meta.update(
            status=status,
            finished=_utcnow(),
            length={"positions": positions, "steps": steps},
            summary={"value_ranges": {k: v for k, v in sorted(self._ranges.items())}},
        )
        if reason is not None:
            self._meta["stop_reason"] = reason


def create(path: str | os.PathLike[str] | Backend, plan: TracePlan, *, format: str | None = None,
           overwrite: bool = False, **metadata: Any) -> TraceWriter:
    """Create a trace at ``path`` (zarr directory or HDF5 file, from ``format`` or the suffix)
    and return its writer. Keyword arguments (``run``, ``prompt_length``, ``tags``,
    ``environment``, ``queue_size``, ``commit_interval``, ``commit_bytes``, ``vocab``,
    ``max_bytes``: a cap on the size on disk, see :attr:`TraceWriter.position_limit`) go to
    :class:`TraceWriter`."""
    if isinstance(path, Backend):
        return TraceWriter(path, plan, **metadata)
    fmt = format or format_from_suffix(path)
    p = Path(path)
    if p.exists():
        if not overwrite:
            from .errors import TraceExistsError

            raise TraceExistsError(f"{p} already exists (pass overwrite=True / --force)")
        _remove(p)
    return TraceWriter(create_backend(p, fmt), plan, **metadata)


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink()
