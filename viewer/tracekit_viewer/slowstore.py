"""A trace with a network's latency, for the viewer's tests and benchmarks.

:func:`open_slow` opens a real trace behind a read-only storage backend that waits before
every array read, notes it and can fail it: what a trace on HTTP or object storage looks like
to the viewer (each request tens of milliseconds, sometimes a time-out), without a server.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

import tracekit
from tracekit.errors import TraceError
from tracekit.storage import Backend, StoredArray, open_backend

__all__ = ["Latency", "SlowBackend", "open_slow"]


class Latency:
    """What every array read goes through: a wait of ``delay`` seconds, a note in ``reads``
    (array name, index), and ``failure`` raised instead when it is set. Change any of them
    at any time, from any thread."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = float(delay)
        self.failure: Exception | None = None
        self.reads: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()

    def read(self, name: str, key: tuple) -> None:
        with self._lock:
            self.reads.append((name, key))
        if self.failure is not None:
            raise self.failure
        if self.delay > 0:
            time.sleep(self.delay)

    def positions_read(self, name: str) -> set[int]:
        """Positions of the single-position reads of ``name`` (one token's own rows)."""
        with self._lock:
            return {int(k[0]) for n, k in self.reads if n == name and isinstance(k[0], int)}

    def clear(self) -> None:
        with self._lock:
            self.reads.clear()


class _SlowArray(StoredArray):
    def __init__(self, inner: StoredArray, latency: Latency) -> None:
        self._inner, self._latency = inner, latency
        self.name, self.dims = inner.name, inner.dims
        self.checksum = inner.checksum

    @property
    def shape(self) -> tuple[int, ...]:
        return self._inner.shape

    @property
    def dtype(self) -> np.dtype:
        return self._inner.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._inner.chunks

    @property
    def attrs(self) -> dict[str, Any]:
        return self._inner.attrs

    def __getitem__(self, key: tuple) -> np.ndarray:
        self._latency.read(self.name, key)
        return self._inner[key]

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        raise TraceError("a slow trace is read-only")

    def resize(self, shape: tuple[int, ...]) -> None:
        raise TraceError("a slow trace is read-only")

    def verify_below(self, rows: int | None) -> None:
        self._inner.verify_below(rows)


class SlowBackend(Backend):
    """A read-only backend over ``inner`` whose array reads go through ``latency``."""

    format_name = "slow"

    def __init__(self, inner: Backend, latency: Latency) -> None:
        self._inner, self.latency = inner, latency
        self.path = inner.path

    def read_root_meta(self) -> dict[str, Any]:
        return self._inner.read_root_meta()

    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        raise TraceError("a slow trace is read-only")

    def create_array(self, *args: Any, **kwargs: Any) -> StoredArray:
        raise TraceError("a slow trace is read-only")

    def array_names(self) -> list[str]:
        return self._inner.array_names()

    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        return _SlowArray(self._inner.get_array(name, dims=dims), self.latency)

    def close(self) -> None:
        self._inner.close()


def open_slow(path: str | os.PathLike[str], latency: Latency) -> tracekit.Trace:
    """Open the trace at ``path`` with every array read going through ``latency``."""
    return tracekit.open(SlowBackend(open_backend(path), latency))
