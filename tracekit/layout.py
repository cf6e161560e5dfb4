"""A trace's array layout: every coordinate and data array created and preallocated before the
first step (``create_layout``), and growing dimensions trimmed to the committed lengths at the
end (``trim_to``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .format import (
    COORD_CHUNK,
    GROWING_DIMS,
    PACKED,
    VOCAB_GROUP,
    TracePlan,
    storage_dtype,
)
from .storage import Backend, StoredArray


def create_layout(backend: Backend, plan: TracePlan,
                  packed_vocab: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Create every coordinate and data array of ``plan`` (preallocated, zero filled), and
    write the vocabulary (``(vocab_nbytes, vocab_bytes)``) when given: HDF5 creates no object
    once streaming starts, so it is written with the layout."""
    vocab_dims = {d for s in plan.array_specs() if s.group == VOCAB_GROUP for d in s.dims}
    for dim in plan.used_dims():
        values = plan.coordinate_values(dim)
        chunk = (max(1, min(len(values), COORD_CHUNK)),)
        arr = backend.create_array(dim, values.shape, values.dtype, chunk, (dim,), {},
                                   PACKED if dim in vocab_dims else None, coordinate=True)
        if len(values):
            arr[(slice(0, len(values)),)] = values
    for spec in plan.array_specs():
        logical = plan.logical_dtype(spec)
        attrs = {"description": spec.description}
        if spec.dtype == "activation":
            attrs["logical_dtype"] = logical
        backend.create_array(
            spec.name, plan.shape(spec), storage_dtype(logical), plan.chunks(spec), spec.dims,
            attrs, plan.compression_for(spec), write_empty_chunks=spec.name != "attention",
        )
    if packed_vocab is not None:
        for name, values in zip(("vocab_nbytes", "vocab_bytes"), packed_vocab, strict=True):
            if len(values):
                backend.get_array(name)[(slice(0, len(values)),)] = values
    # The counter is stored before the trace becomes visible, so every later update rewrites
    # 16 bytes in place; a writer killed while creating its chunk would leave it empty.
    backend.get_array("commit")[(slice(0, 2),)] = np.zeros(2, dtype=np.int64)


def trim_to(arrays: Sequence[StoredArray], positions: int, steps: int) -> None:
    """Resize growing dimensions to the committed lengths (once, at the end)."""
    lengths = {"position": positions, "key": positions, "step": steps}
    for arr in arrays:
        new = tuple(lengths.get(d, s) if d in GROWING_DIMS else s
                    for d, s in zip(arr.dims, arr.shape, strict=True))
        if new != arr.shape:
            arr.resize(new)
