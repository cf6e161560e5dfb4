"""Frames read in the background, so that the window never waits on a slow store.

A trace on a network answers each read in tens of milliseconds, and a frame needs a few
dozen reads. The window therefore computes a frame on its own thread only from the cache
(:meth:`FrameFetcher.cached`); when something must be read it hands the state to
:class:`FrameFetcher`, whose one thread reads and computes the frame while the window keeps
showing the last one, then picks the result up (:meth:`FrameFetcher.take`) from its timer.

Only the latest request matters: a newer one supersedes the one being read, which stops
before its next read (what it read stays cached), so scrubbing over a hundred steps reads
the step one lands on, not a hundred. When nothing is asked, the thread warms the cache for
the next steps on the timeline, a bounded number of them and within half the cache's byte
budget, so the frame on screen is never evicted by a prefetch and memory stays flat.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import tracekit

from .frame import Frame, compute_frame
from .scene import CityLayout
from .source import NotCached, TraceSource
from .state import ViewState

__all__ = ["Fetched", "FrameFetcher", "describe_error", "frame_for"]

PREFETCH_STEPS = 8  # steps warmed ahead of the one shown
ERROR_CHARS = 160  # a read error shows as one line of at most this many characters


class _Superseded(Exception):
    """A newer request came: abandon this one between two reads."""


@dataclass
class Fetched:
    """What the fetch thread made of one request: the frame, or the read error as one line."""

    state: ViewState
    frame: Frame | None
    error: str | None = None


def frame_for(source: TraceSource, state: ViewState, layout: CityLayout, *,
              panels: bool = True) -> Frame:
    """:func:`compute_frame`, plus what the window reads besides to show it (the traced
    token's text, every metric's colour range), so that showing the frame reads nothing."""
    frame = compute_frame(source, state, layout, panels=panels)
    if state.traced is not None:
        source.token_text(state.traced)
    if panels:
        for metric in source.metrics:
            source.value_range(metric)
    return frame


def describe_error(exc: BaseException) -> str:
    """A read error as one short line (a TraceError says what happened itself)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not isinstance(exc, tracekit.TraceError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


class FrameFetcher:
    """One background thread that reads frames for the window, latest request first.

    The window's thread calls :meth:`cached`, :meth:`request`, :meth:`take` and
    :meth:`prefetch`; nothing here touches VTK.
    """

    def __init__(self, source: TraceSource, layout: CityLayout, *, panels: bool = True,
                 prefetch_steps: int = PREFETCH_STEPS,
                 prefetch_bytes: int | None = None) -> None:
        self.source = source
        self.layout = layout
        self.panels = panels
        self.prefetch_steps = max(0, int(prefetch_steps))
        #: Bytes one prefetch may read at most: half the cache, so it never evicts the frame
        #: on screen (the most recently used half).
        self.prefetch_bytes = (source.cache.max_bytes // 2 if prefetch_bytes is None
                               else int(prefetch_bytes))
        self.prefetched: list[int] = []  # steps the last prefetch completed (for the curious)
        self._cond = threading.Condition()
        self._gen = 0  # bumped by every request, prefetch and cancel: older work stops
        self._job: Callable[[], None] | None = None
        self._want: int | None = None  # generation of the frame the window waits for
        self._done: tuple[int, Fetched] | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tracekit-fetch", daemon=True)
        self._thread.start()

    # -- the window's side ------------------------------------------------------------------
    def cached(self, state: ViewState) -> Frame | None:
        """The frame of ``state`` computed from the cache alone, or None if it needs a read."""
        with self.source.cache_only():
            try:
                return frame_for(self.source, state, self.layout, panels=self.panels)
            except NotCached:
                return None

    def request(self, state: ViewState) -> None:
        """Read the frame of ``state`` in the background; it supersedes any earlier work."""
        state = state.copy()
        with self._cond:
            gen = self._next()
            self._want = gen
            self._job = lambda: self._fetch(gen, state)
            self._cond.notify_all()

    def take(self) -> Fetched | None:
        """The result of the latest :meth:`request` once it is ready (once), else None."""
        with self._cond:
            if self._done is None or self._done[0] != self._want:
                return None
            result = self._done[1]
            self._done = self._want = None
            return result

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the latest request is ready to :meth:`take` (True) or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or self._want is None or (
                    self._done is not None and self._done[0] == self._want), timeout)

    def prefetch(self, state: ViewState, direction: int = 1) -> None:
        """Warm the cache for the steps after ``state.step`` (before it when ``direction``
        is negative). Any frame still wanted is dropped: the window shows ``state``."""
        state = state.copy(playing=False)
        step = 1 if direction >= 0 else -1
        with self._cond:
            gen = self._next()
            self._want = None
            if self.prefetch_steps:
                self._job = lambda: self._prefetch(gen, state, step)
                self._cond.notify_all()

    def cancel(self) -> None:
        """Stop whatever runs or waits (the window is about to read synchronously)."""
        with self._cond:
            self._next()
            self._want = None

    def idle(self, timeout: float | None = None) -> bool:
        """Block until the thread has nothing to do (True) or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (self._job is None and not self._busy), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (a read in flight finishes first, up to ``timeout``)."""
        with self._cond:
            self._closed = True
            self._next()
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the thread's side ------------------------------------------------------------------
    def _next(self) -> int:
        """A new generation (with the lock held): whatever older work runs stops."""
        self._gen += 1
        self._job = None
        self._done = None
        return self._gen

    def _check(self, gen: int) -> None:
        if gen != self._gen:
            raise _Superseded

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._job = self._job, None
                self._busy = True
            job()

    def _fetch(self, gen: int, state: ViewState) -> None:
        try:
            with self.source.interruptible(lambda: self._check(gen)):
                result = Fetched(state, frame_for(self.source, state, self.layout,
                                                  panels=self.panels))
        except _Superseded:
            return
        except Exception as exc:  # noqa: BLE001 - shown in the window, which stays up
            if not isinstance(exc, (tracekit.TraceError, OSError)):  # a bug: say where
                traceback.print_exc(file=sys.stderr)
            result = Fetched(state, None, describe_error(exc))
        with self._cond:
            if gen == self._gen:
                self._done = (gen, result)
                self._cond.notify_all()

    def _prefetch(self, gen: int, state: ViewState, direction: int) -> None:
        start = self.source.cache.stored_bytes
        done: list[int] = []

        def check() -> None:
            self._check(gen)
            if self.source.cache.stored_bytes - start >= self.prefetch_bytes:
                raise _Superseded  # the budget is spent

        try:
            with self.source.interruptible(check):
                for k in range(1, self.prefetch_steps + 1):
                    step = state.step + direction * k
                    if not 0 <= step < self.source.n_steps:
                        break
                    frame_for(self.source, state.copy(step=step), self.layout,
                              panels=self.panels)
                    done.append(step)
        except _Superseded:
            pass
        except Exception:  # noqa: BLE001, S110 - a failed prefetch only loses a warm cache;
            pass  # the step's own read reports the error when it is shown
        self.prefetched = done
