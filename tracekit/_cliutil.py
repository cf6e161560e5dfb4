"""Helpers shared by the CLI command modules: one-line errors, sizes, index ranges."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import click

from .errors import TraceError, one_line


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


def disk_usage(path: Path) -> int:
    """Bytes a trace takes on disk (a file, or every regular file under a directory; links
    are not followed)."""
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
