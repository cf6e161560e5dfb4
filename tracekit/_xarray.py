"""Lazy xarray view of a trace: every array backed by its LazyArray, read on indexing."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from .reader import LazyArray, Trace


class _LazyBackendArray(BackendArray):
    def __init__(self, arr: LazyArray) -> None:
        self._arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER_1VECTOR, self._arr.__getitem__
        )


def _variable(arr: LazyArray, attrs: dict[str, Any]) -> xr.Variable:
    data = indexing.LazilyIndexedArray(_LazyBackendArray(arr))
    return xr.Variable(arr.dims, data, attrs=attrs)


def trace_to_dataset(trace: Trace) -> xr.Dataset:
    """All captured arrays (and the vocabulary, when the trace stores one: ``vocab_nbytes``
    and ``vocab_bytes``, as a plain xarray reader sees them) as lazy variables, with
    coordinates for every dimension."""
    coords = {dim: trace.coords(dim) for dim in trace.plan.used_dims() if dim != "commit_field"}
    variables = {}
    for spec in trace.plan.array_specs():
        if spec.name == "commit":
            continue
        attrs = {"description": spec.description,
                 "logical_dtype": trace.plan.logical_dtype(spec)}
        variables[spec.name] = _variable(trace[spec.name], attrs)
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs = {"tracekit_version": trace.metadata["version"], "status": trace.status,
                "model": str(trace.model.get("name"))}
    return ds
