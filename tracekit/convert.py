"""``tracekit convert``: copy a trace between zarr and HDF5, bit-exact.

Stored bytes are copied as they are (bfloat16 stays its uint16 bits), block by block along
the position axis, so memory stays bounded. The destination is written under a temporary name
and moved into place only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TraceError
from .reader import Trace, open_or_error
from .storage import create_backend, format_from_suffix
from .writer import create_layout, trim_to

Progress = Callable[[int, int], None]


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            format: str | None = None, overwrite: bool = False,
            progress: Progress | None = None, **options: Any) -> Path:
    """Copy the committed content of trace ``src`` (a path or a URL; ``options`` as
    :func:`tracekit.open` takes them) to ``dst`` in ``format`` (default: from the suffix of
    ``dst``, else the other format than the source's)."""
    dst = Path(dst)
    with open_or_error(src, **options) as trace:
        fmt = format or format_from_suffix(
            dst, default="hdf5" if trace.format == "zarr" else "zarr")
        if dst.exists():
            if not overwrite:
                raise TraceError(f"{dst} already exists (use --force to replace it)")
        elif trace.path is not None and trace.path.resolve() == dst.resolve():
            raise TraceError("source and destination are the same")
        backend = create_backend(dst if not dst.exists() else _temp_sibling(dst), fmt)
        try:
            _copy(trace, backend, progress)
        except BaseException:
            discard = getattr(backend, "discard", None)
            if discard:
                discard()
            raise
    if backend.path != dst:  # overwrite: replace the old trace only now
        _replace(Path(backend.path), dst)  # type: ignore[arg-type]
    return dst


def _copy(trace: Trace, backend, progress: Progress | None) -> None:
    plan = trace.plan
    meta = dict(trace.metadata)
    create_layout(backend, plan)
    backend.write_root_meta({**meta, "status": "recording"})
    positions, steps = trace.n_positions, trace.n_steps
    names = [n for n in trace.array_names() if n != "commit"]
    total = sum(trace[n].nbytes for n in names)
    done = 0
    for name in names:
        src = trace[name]._stored
        dst = backend.get_array(name)
        rows = trace[name].shape[0]  # committed along growing dims, whole along the rest
        block = max(1, src.chunks[0])
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            region: tuple = (slice(start, stop),)
            if name == "attention":
                region += (slice(None), slice(None), slice(0, stop))
            data = src[region]
            dst[region] = data
            done += data.nbytes
            if progress:
                progress(done, total)
    counter = trace._backend.get_array("commit", dims=("commit_field",))
    backend.get_array("commit")[(slice(0, 2),)] = counter[(slice(0, 2),)]
    trim_to([backend.get_array(n) for n in [*names, *plan.used_dims()]], positions, steps)
    backend.flush()
    backend.begin_streaming()
    backend.end_streaming()
    backend.write_root_meta(meta)
    backend.seal()
    backend.close()


def _temp_sibling(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.converting-{os.getpid()}{dst.suffix}")


def _replace(tmp: Path, dst: Path) -> None:
    import shutil

    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
