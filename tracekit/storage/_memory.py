"""In-memory backend: plain numpy arrays and a dict. For tests and for recording into RAM."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..errors import MissingArrayError, NotATraceError
from . import Backend, StoredArray, check_dtype


class MemoryArray(StoredArray):
    def __init__(self, name: str, data: np.ndarray, chunks: tuple[int, ...],
                 dims: tuple[str, ...], attrs: dict[str, Any]) -> None:
        self.name = name
        self.data = data
        self._chunks = chunks
        self.dims = dims
        self._attrs = dict(attrs)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._chunks

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.array(self.data[key])

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.data[key] = value

    def resize(self, shape: tuple[int, ...]) -> None:
        new = np.zeros(shape, dtype=self.data.dtype)
        common = tuple(slice(0, min(a, b)) for a, b in zip(self.data.shape, shape, strict=True))
        new[common] = self.data[common]
        self.data = new


class MemoryBackend(Backend):
    format_name = "memory"

    def __init__(self) -> None:
        self.path = None
        self.arrays: dict[str, MemoryArray] = {}
        self.meta: dict[str, Any] | None = None

    def read_root_meta(self) -> dict[str, Any]:
        if self.meta is None:
            raise NotATraceError("memory trace has no metadata")
        return copy.deepcopy(self.meta)

    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        self.meta = copy.deepcopy(meta)

    def create_array(self, name, shape, dtype, chunks, dims, attrs, compression,
                     write_empty_chunks=True, coordinate=False) -> StoredArray:
        arr = MemoryArray(name, np.zeros(shape, dtype=dtype), tuple(chunks), tuple(dims), attrs)
        self.arrays[name] = arr
        return arr

    def array_names(self) -> list[str]:
        return sorted(self.arrays)

    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        try:
            arr = self.arrays[name]
        except KeyError as exc:
            raise MissingArrayError(f"array {name!r} is missing") from exc
        check_dtype(name, arr.dtype)  # same allowlist as the on-disk backends
        return arr
