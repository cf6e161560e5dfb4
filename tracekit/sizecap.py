"""A trace's size on disk and the cap on it (``tracekit record --max-size``).

The size of a finished trace follows from its plan and length (:meth:`TracePlan.estimated_bytes`
counts every stored chunk and the metadata). A writer given ``max_bytes`` refuses any step that
would take the trace past it and closes the trace with status ``truncated``; :class:`SizeCap`
says how many positions fit.
"""

from __future__ import annotations

import os
from pathlib import Path

from .format import TracePlan

#: Kept back under an HDF5 trace's cap for the next commits' and closing's metadata: an HDF5
#: file grows by about 0.5 KB of metadata per commit beyond the estimate (its flushes leave
#: freed space behind; measured: +260 KB over 505 one-step commits, 3.7%).
HDF5_RESERVE_BYTES = 16 << 10


def disk_bytes(path: os.PathLike[str] | str) -> int:
    """Bytes a trace takes on disk: its file's size, or the sum of its files' sizes (the
    apparent size; ``du`` also counts each file's unused end of its last block)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def positions_within(plan: TracePlan, format: str, max_bytes: int) -> int:
    """The most positions a trace of ``plan`` holds within ``max_bytes`` on disk (as
    :meth:`TracePlan.estimated_bytes` counts them; 0 when not even one fits)."""
    lo, hi = 0, plan.max_positions
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan.estimated_bytes(format, mid, mid) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SizeCap:
    """How many positions a trace being written may hold under ``max_bytes``.

    ``meta_bytes`` (the final metadata's size) is kept back: the estimate counts a typical
    metadata object, and a long prompt makes it longer. Where the backend can report what it
    has allocated (HDF5), the estimate is corrected after each commit by what was measured."""

    def __init__(self, plan: TracePlan, format: str, max_bytes: int, meta_bytes: int) -> None:
        self.plan, self.format, self.max_bytes = plan, format, max_bytes
        self._meta_bytes = meta_bytes
        self._measured: tuple[int, int] | None = None  # (positions, allocated bytes)
        self._limit: tuple[tuple[int, int] | None, int] | None = None

    def measured(self, positions: int, allocated: int | None) -> None:
        """The backend had ``allocated`` bytes once ``positions`` were committed."""
        if allocated is not None:
            self._measured = (positions, allocated)

    @property
    def positions(self) -> int:
        """The most positions that fit (recomputed only after a new measurement)."""
        measured = self._measured
        if self._limit is None or self._limit[0] != measured:
            budget = self.max_bytes - self._meta_bytes
            if measured is not None:
                positions, allocated = measured
                drift = allocated - self.plan.estimated_bytes(self.format, positions, positions)
                budget -= max(0, drift) + HDF5_RESERVE_BYTES
            self._limit = (measured, positions_within(self.plan, self.format, budget))
        return self._limit[1]
