"""``tracekit pack`` and ``tracekit unpack``: the command-line side of :mod:`tracekit.pack`."""

from __future__ import annotations

from pathlib import Path

import click

from ._cliutil import TraceCommand, human_bytes


@click.command(cls=TraceCommand)
@click.argument("trace", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def pack(trace: Path, out: Path, force: bool) -> None:
    """Pack a zarr trace into one zip file to share."""
    from .cli import progress_bar
    from .pack import pack as run_pack

    with progress_bar("packing") as update:
        result = run_pack(trace, out, overwrite=force, progress=update)
    if result.status != "complete":
        click.echo(f"warning: {trace} is not complete (status {result.status}): the pack "
                   f"holds what was written so far", err=True)
    click.echo(f"wrote {out} ({human_bytes(result.bytes)}, {result.files} files)")


@click.command(cls=TraceCommand)
@click.argument("pack_file", metavar="PACK", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def unpack(pack_file: Path, out: Path, force: bool) -> None:
    """Unpack a pack into its zarr trace folder."""
    from .cli import progress_bar
    from .pack import unpack as run_unpack

    with progress_bar("unpacking") as update:
        run_unpack(pack_file, out, overwrite=force, progress=update)
    click.echo(f"wrote {out}")
