"""zarr v3 directory backend (the default).

Layout: a zarr v3 group whose ``attributes.tracekit`` holds the metadata, one array per logical
array at the root, ``dimension_names`` on each. Every ``zarr.json`` is read and checked against
the codec allowlist by this module before zarr-python is allowed to open it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
import zarr.registry

from ..errors import (
    CorruptTraceError,
    DisallowedCodecError,
    MissingArrayError,
    NotATraceError,
    TraceError,
    TraceExistsError,
)
from ..format import ROOT_KEY
from . import (
    Backend,
    SpaceReserve,
    StoredArray,
    check_dtype,
)
from ._source import LocalDirSource, Source
from ._zarr_array import _ALLOCATE_FROM, ZarrArray  # noqa: F401
from ._zarr_checks import SafeLocalStore, check_array_metadata
from ._zarr_meta import (  # noqa: F401  (re-exported: callers import them from here)
    _BOUNDED_CODECS,
    _CHECKED_CODECS,
    _UNCHECKED_CODECS,
    ALLOWED_CODECS,
    _BoundedBloscCodec,
    _BoundedGzipCodec,
    _BoundedZstdCodec,
    _check_codecs,
    _chunk_nbytes,
    _decode_into_chunk,
    _direct_readable,
    _group_document,
    _parse_json,
    _raw_writable,
    _read_json,
    _remove_chunks_outside,
    _separator,
    _write_json,
    array_metadata,
    chunk_key,
)
from ._zarr_store import SourceStore


class ZarrBackend(Backend):
    format_name = "zarr"
    #: Chunk key separator of the arrays this backend creates (readers follow each array's).
    chunk_separator = "."

    def __init__(self, source: Source, store: Any, final_path: Path | None = None,
                 root: dict[str, Any] | None = None) -> None:
        self.path = source.local_path
        self._source = source
        self._store = store
        self._final_path = final_path  # set while writing under a temporary name
        # Arrays this backend created: handed out again by get_array instead of re-reading
        # and re-checking the zarr.json it has just written (the writer opens every array
        # once laid out), and moved along with the trace to its final name.
        self._created: dict[str, ZarrArray] = {}
        # Remote traces: array documents from the group's consolidated metadata, so that
        # opening costs one request, not one per array (each is checked like its own file).
        self._consolidated: dict[str, Any] = {}
        self._root = root  # the group's document as opened, for the first read_root_meta
        if root is not None and source.remote:
            inline = (root.get("consolidated_metadata") or {}).get("metadata")
            if isinstance(inline, dict):
                self._consolidated = inline

    @property
    def location(self) -> str:
        return self._source.location

    @classmethod
    def create(cls, path: Path) -> ZarrBackend:
        if path.exists():
            raise TraceExistsError(f"{path} already exists")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        # The folder only: the group's zarr.json is write_root_meta's (zarr-python's
        # open_group would write one first, and its event loop costs milliseconds).
        tmp.mkdir(parents=True)
        backend = cls(LocalDirSource(tmp), zarr.storage.LocalStore(str(tmp)), final_path=path)
        backend._reserve = SpaceReserve(path.parent)
        return backend

    @classmethod
    def open(cls, source: Source, writable: bool = False,
             root: bytes | None = None) -> ZarrBackend:
        """Open the trace ``source`` holds; ``root``: its ``zarr.json``, when already read."""
        where = source.location
        root = (_read_json(source, "zarr.json", where) if root is None
                else _parse_json(root, "zarr.json", where))
        if root.get("zarr_format") != 3 or root.get("node_type") != "group":
            raise NotATraceError(f"{where}: not a zarr v3 group")
        attrs = root.get("attributes")
        if not isinstance(attrs, dict) or ROOT_KEY not in attrs:
            raise NotATraceError(f"{where}: zarr group without '{ROOT_KEY}' metadata")
        if not writable:
            # zarr-python reads (compressed chunks) through the same source; it opens each
            # array by path, after tracekit checked that array's document.
            return cls(source, SourceStore(source), root=root)
        if source.local_path is None:
            raise TraceError(f"{where}: only a trace on this machine can be opened for writing")
        store = SafeLocalStore(str(source.local_path), read_only=False)
        try:
            # Not the consolidated copy: every array's own zarr.json is checked against the
            # allowlist before it is opened, and zarr must not parse unchecked array metadata.
            group = zarr.open_group(store=store, mode="r+", use_consolidated=False)
        except Exception as exc:  # zarr raises many types for malformed groups
            raise NotATraceError(f"{where}: cannot open as zarr group ({exc})") from exc
        return cls(source, group.store)  # type: ignore[arg-type]

    # -- metadata ---------------------------------------------------------------------------
    def read_root_meta(self) -> dict[str, Any]:
        root, self._root = self._root, None  # later calls read it again (refresh)
        try:
            if root is None:
                root = _read_json(self._source, "zarr.json", self.location)
        except MissingArrayError as exc:  # created, and no metadata written yet
            raise NotATraceError(f"{self.location}: no zarr.json") from exc
        attrs = root.get("attributes")
        meta = attrs.get(ROOT_KEY) if isinstance(attrs, dict) else None
        if not isinstance(meta, dict):
            raise NotATraceError(f"{self.location}: no '{ROOT_KEY}' metadata object")
        return meta

    def write_root_meta(self, meta: dict[str, Any], capacity: int | None = None) -> None:
        _write_json(self.path / "zarr.json", _group_document(meta))  # type: ignore[operator]

    # -- arrays -----------------------------------------------------------------------------
    def create_array(self, name, shape, dtype, chunks, dims, attrs, compression,
                     write_empty_chunks=True, coordinate=False) -> StoredArray:
        # The array's zarr.json is written directly: zarr-python took ~3 ms per array here,
        # a tenth of a second for a trace, paid by every recording.
        meta = array_metadata(shape, dtype, chunks, dims, attrs, compression,
                              self.chunk_separator)
        folder = self.path / name  # type: ignore[operator]
        folder.mkdir()
        _write_json(folder / "zarr.json", meta)
        arr = ZarrArray(name, folder, meta, self._store, writable=True, source=self._source)
        self._created[name] = arr
        return arr

    def array_names(self) -> list[str]:
        if self._consolidated:
            return sorted(self._consolidated)
        entries = self._source.list("")
        if entries is None:
            raise TraceError(f"{self.location}: this store cannot list the arrays of a trace "
                             f"without consolidated metadata (one still being recorded)")
        keys = [f"{entry}/zarr.json" for entry in entries]
        return [entry for entry, size in zip(entries, self._source.sizes(keys), strict=True)
                if size is not None]

    def get_array(self, name: str, dims: tuple[str, ...] | None = None) -> StoredArray:
        if name in self._created:
            return self._created[name]
        meta = self._consolidated.get(name)
        if meta is None:
            meta = _read_json(self._source, f"{name}/zarr.json", f"array {name!r}")
        elif not isinstance(meta, dict):
            raise CorruptTraceError(f"array {name!r}: consolidated metadata is not an object")
        if meta.get("node_type") != "array":
            raise CorruptTraceError(f"{name!r} is not an array")
        check_array_metadata(name, meta)
        _check_codecs(name, meta.get("codecs"))
        dims = meta.get("dimension_names")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CorruptTraceError(f"array {name!r}: malformed shape {shape!r}")
        if not isinstance(dims, list) or len(dims) != len(shape):
            raise CorruptTraceError(f"array {name!r}: dimension_names missing or wrong length")
        try:
            check_dtype(name, np.dtype(meta.get("data_type")))
        except TypeError as exc:
            raise DisallowedCodecError(
                f"array {name!r} has disallowed data type {meta.get('data_type')!r}") from exc
        if meta.get("zarr_format") != 3 or not isinstance(meta.get("chunk_grid"), dict):
            raise CorruptTraceError(f"array {name!r}: not a zarr v3 array")
        grid = (meta["chunk_grid"].get("configuration") or {}).get("chunk_shape")
        if (meta["chunk_grid"].get("name") != "regular" or not isinstance(grid, list)
                or len(grid) != len(shape)
                or not all(isinstance(c, int) and c >= 1 for c in grid)):
            raise CorruptTraceError(f"array {name!r}: malformed chunk grid {grid!r}")
        if isinstance(self._store, SourceStore):
            # zarr-python opens the array by reading its document: the one just checked.
            self._store._documents[f"{name}/zarr.json"] = json.dumps(meta).encode()
        folder = self.path / name if self.path is not None else None
        return ZarrArray(name, folder, meta, self._store, writable=not self._store.read_only,
                         source=self._source)

    def metadata_problems(self) -> list[str]:
        """tracekit reads each array's own zarr.json; xarray and zarr read the consolidated
        copy in the group's. Where they differ, those tools would see another trace."""
        root = _read_json(self._source, "zarr.json", self.location)
        consolidated = root.get("consolidated_metadata")
        if consolidated is None:
            return []
        inline = consolidated.get("metadata") if isinstance(consolidated, dict) else None
        if not isinstance(inline, dict):
            return ["consolidated metadata is malformed (no 'metadata' object)"]
        problems = []
        names = self.array_names()
        for name in names:
            own = _read_json(self._source, f"{name}/zarr.json", f"array {name!r}")
            if name not in inline:
                problems.append(f"array {name!r} is missing from the consolidated metadata")
            elif not isinstance(inline[name], dict):
                problems.append(f"array {name!r}: consolidated metadata is not an object")
            elif inline[name] != own:
                keys = sorted(k for k in set(own) | set(inline[name])
                              if own.get(k) != inline[name].get(k))
                problems.append(f"array {name!r}: consolidated metadata disagrees with its "
                                f"zarr.json on {', '.join(keys)}")
        extra = sorted(set(inline) - set(names))
        if extra:
            problems.append(f"consolidated metadata lists array(s) not in the trace: "
                            f"{', '.join(extra)}")
        return problems

    # -- lifecycle --------------------------------------------------------------------------
    def begin_streaming(self) -> None:
        """Move the fully laid out trace to its final name, then keep writing there."""
        if self._final_path is None:
            return
        if self._final_path.exists():
            raise TraceExistsError(f"{self._final_path} appeared while the trace was created")
        os.rename(self.path, self._final_path)  # type: ignore[arg-type]
        self.path = self._final_path
        self._final_path = None
        self._store = zarr.storage.LocalStore(str(self.path))
        self._source.close()
        self._source = LocalDirSource(self.path)  # type: ignore[arg-type]
        for name, arr in self._created.items():
            arr.relocate(self.path / name, self._store, self._source)

    def end_streaming(self) -> None:
        """Every chunk's checksum right before the trace is finalized (see repair_checksums)."""
        for arr in self._created.values():
            arr.repair_checksums()

    def seal(self) -> None:
        """Consolidate metadata (every array's zarr.json inlined in the group's, zarr-python's
        ``consolidated_metadata`` layout), so xarray/zarr open the finished trace in one read."""
        arrays = {}
        for name in self.array_names():
            made = self._created.get(name)  # its zarr.json is what this backend last wrote
            arrays[name] = made._meta if made is not None else _read_json(
                self._source, f"{name}/zarr.json", f"array {name!r}")
        _write_json(self.path / "zarr.json",  # type: ignore[operator]
                    _group_document(self.read_root_meta(), arrays))

    def close(self) -> None:
        super().close()
        self._source.close()

    def discard(self) -> None:
        """Remove a trace that never got past creation."""
        self.release_reserve()
        if self._final_path is not None and self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
