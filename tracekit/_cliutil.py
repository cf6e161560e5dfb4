"""Helpers shared by the CLI command modules: one-line errors, sizes, index ranges."""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import TraceError, one_line
from .storage import is_url

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """``2GB`` -> 2e9, ``512MiB`` -> 512 * 2**20, ``1000`` -> 1000 bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 500MB, 2GB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[unit])


class TraceLocation(click.ParamType):
    """A trace to read: a path that exists (a zarr folder, an HDF5 file, a pack), or a URL
    (``https://``, ``s3://``, ``gs://``, ``az://``...), which is left for the reader to reach."""

    name = "TRACE"

    def convert(self, value: Any, param: Any, ctx: Any) -> str | Path:
        if isinstance(value, Path) or not is_url(value):
            path = Path(value)
            if not os.path.lexists(path):
                self.fail(f"{one_line(str(value))}: no such file or directory", param, ctx)
            return path
        return str(value)


TRACE = TraceLocation()


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--storage-option")
    try:
        value = json.loads(raw)  # true, 3, "x", {"a": 1}
    except ValueError:
        value = raw  # a plain string
    return key.strip(), value


def remote_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options of commands that read a trace which may be at a URL; the command gets
    them together as ``remote``, the keyword arguments of :func:`tracekit.open`."""

    @click.option("-S", "--storage-option", "storage_option", multiple=True,
                  metavar="KEY=VALUE",
                  help="Passed to fsspec for a URL (repeatable; VALUE is JSON or text), e.g. "
                       "-S anon=true for a public bucket.")
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Keep what is fetched from a URL in this folder, so that reading it "
                       "again costs no request.")
    @click.option("--cache-size", default="2GB", show_default=True, metavar="SIZE",
                  help="Most bytes --cache-dir keeps (least recently used go first).")
    @functools.wraps(f)
    def wrapper(*args: Any, storage_option: tuple[str, ...], cache_dir: Path | None,
                cache_size: str, **kwargs: Any) -> Any:
        kwargs["remote"] = {
            "storage_options": dict(map(_storage_option, storage_option)) or None,
            "cache_dir": cache_dir,
            "cache_bytes": parse_size(cache_size) if cache_dir is not None else None,
        }
        return f(*args, **kwargs)

    return wrapper


class TraceCommand(click.Command):
    """A command whose TraceErrors and OS errors become one-line CLI errors (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TraceError as exc:
            raise click.ClickException(str(exc)) from None  # one line: see TraceError
        except OSError as exc:
            raise click.ClickException(one_line(
                f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "))) from None


#: Output names a new trace may have when no --format is given, and the format each gets.
TRACE_SUFFIXES = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}


def output_format(out: Path, fmt: str | None) -> str:
    """The format of a new trace at ``out``: ``fmt`` when given, else from the suffix. Any
    other suffix is refused, so ``-o x.txt`` does not silently make a zarr folder named x.txt."""
    if fmt is not None:
        return fmt
    found = TRACE_SUFFIXES.get(out.suffix.lower())
    if found is None:
        raise click.ClickException(
            f"{out}: a trace is named .zarr (a folder) or .h5/.hdf5 (a file); "
            f"or choose with --format zarr|hdf5")
    return found


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_usage(path: Path | str) -> int | None:
    """Bytes a trace takes on disk (a file, or every regular file under a directory; links
    are not followed); None for a URL."""
    if is_url(path):
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def index_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
