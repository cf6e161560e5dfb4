"""What the writer does when a write fails (a full disk, an I/O error): keep everything
committed, close the trace so that it opens, and say why in one line.

The writer's invariant makes this possible: the commit counter only ever covers steps whose
data was written and flushed, and the arrays are never trimmed below what the counter on disk
may say. After a failure the writer therefore (1) commits the steps whose data reached the disk
before the failure (their counter write or its flush may be what failed), (2) trims the arrays
to the committed length, which also releases space (zarr removes the chunk files past it,
HDF5 drops the chunks it could not write), and (3) writes the final metadata with status
``aborted`` and the cause as ``stop_reason`` (``length`` null where the last counter write
failed, so that only the counter says which of the two lengths is on disk). Each step is
attempted whatever happened to the one before; where the metadata cannot be written the
trace stays ``recording``, which the format defines as valid: readers trust the counter.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np

from .storage import io_cause

if TYPE_CHECKING:
    from .writer import TraceWriter

#: Longest ``stop_reason`` a writer stores (the HDF5 metadata attribute is sized for it).
MAX_REASON_CHARS = 200


def stop_reason(error: BaseException) -> str:
    """The one-line cause stored in the metadata and shown to the user (ASCII, so that its
    JSON takes one byte a character: the HDF5 metadata attribute is sized for it)."""
    text = io_cause(error).encode("ascii", "replace").decode("ascii")
    return text[:MAX_REASON_CHARS]


def failure_message(writer: TraceWriter, error: BaseException, status: str | None = None) -> str:
    """One line naming the trace's final path (never its temporary name), the cause and,
    once closed, what the trace holds."""
    where = writer._backend.destination or "the trace"
    text = f"{where}: recording stopped: {stop_reason(error)}"
    if status is not None:
        text += (f"; the trace keeps its {writer.committed_positions} committed positions "
                 f"(status {status})")
    return text


def finish_after_failure(writer: TraceWriter, error: BaseException) -> str:
    """Close out a trace whose recording or finalizing failed; returns the status it was
    left with (``aborted``, or ``recording`` where the metadata could not be written)."""
    backend = writer._backend
    backend.release_reserve()  # the space held for this: the steps below need a little
    certain = True  # the counter on disk is known to equal writer._committed
    if writer._durable[0] > writer._committed[0]:
        try:
            writer._arrays["commit"][(slice(0, 2),)] = np.array(writer._durable, dtype=np.int64)
            backend.flush()
            writer._committed = writer._durable
        except Exception:
            # The counter on disk is the old or the new one, and both have their data: keep
            # every array long enough for either, and let the counter alone say which.
            certain = False
            with contextlib.suppress(Exception):  # what it says, as far as it can be read
                stored = tuple(int(v) for v in writer._arrays["commit"][(slice(0, 2),)])
                if stored == writer._durable:
                    writer._committed = writer._durable
    if certain:
        # Arrays left longer than the counter (a trim that failed) are valid: readers stop
        # at the counter.
        with contextlib.suppress(Exception):
            writer._trim()
    try:
        backend.end_streaming()
        writer._set_final_meta("aborted", stop_reason(error))
        if not certain:
            writer._meta["length"] = None
        backend.write_root_meta(writer._meta)
    except Exception:
        return "recording"
    with contextlib.suppress(Exception):
        backend.seal()
    return "aborted"
