"""The ``tracekit`` command line. Every command's first docstring line is its help.

Errors a user can cause print one line (``Error: ...``) and exit non-zero, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from ._cliutil import (
    TRACE,
    TraceCommand,
    disk_usage,
    human_bytes,
    index_ranges,
    output_format,
    remote_options,
)
from .errors import one_line
from .format import decode_token_text


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (only on a terminal); yields update(done, total)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tracekit")
def main() -> None:
    """Record what a transformer does, token by token, and replay it anywhere."""


#: Characters of the sequence's text ``info`` shows: a trace may declare millions of positions
#: of 4 kB tokens, and ``info`` allocates nothing in proportion to what a trace declares.
INFO_TEXT_CHARS = 100_000
_TEXT_BLOCK = 4096  # positions read at a time


def _trace_text(trace, limit: int = INFO_TEXT_CHARS) -> tuple[str, bool]:
    """The sequence's text up to ``limit`` characters, and whether that is all of it."""
    parts: list[str] = []
    size = 0
    end = min(trace.n_positions, limit)  # tokens rarely add nothing: a bound on the reads
    for lo in range(0, end, _TEXT_BLOCK):
        hi = min(end, lo + _TEXT_BLOCK)
        raw = trace["token_bytes"][lo:hi]
        lengths = np.clip(trace["token_nbytes"][lo:hi], 0, raw.shape[1])
        for i in np.flatnonzero(lengths):  # empty tokens add nothing
            parts.append(decode_token_text(raw[i, : lengths[i]].tobytes()))
            size += len(parts[-1])
            if size > limit:
                return "".join(parts)[:limit], False
    return "".join(parts), end == trace.n_positions


def _info_json(trace, path: Path | str) -> dict[str, Any]:
    text, complete = _trace_text(trace)
    arrays = {}
    for name in trace.array_names():
        arr = trace[name]
        arrays[name] = {"dims": list(arr.dims), "shape": list(arr.shape),
                        "dtype": arr.logical_dtype}
    return {
        "path": str(path),
        "format": trace.format,
        "positions": trace.n_positions,
        "steps": trace.n_steps,
        "disk_bytes": disk_usage(path),
        "text": text,
        "text_complete": complete,
        "arrays": arrays,
        "metadata": trace.metadata,
    }


@main.command(cls=TraceCommand)
@click.argument("trace", type=TRACE)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON, for scripts.")
@remote_options
def info(trace: Path | str, as_json: bool, remote: dict[str, Any]) -> None:
    """Summarise a trace: model, run, captured arrays and sizes.

    TRACE is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    from .reader import open_or_error

    with open_or_error(trace, **remote) as t:
        data = _info_json(t, trace)
        if as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
            return
        m, run, cap = t.model, t.metadata.get("run", {}), t.metadata["capture"]
        status = t.status if t.status != "recording" else "recording (not finalized)"
        if t.metadata.get("stop_reason"):
            status += f" ({t.metadata['stop_reason']})"
        lines = [
            f"Trace     {t.location} ({t.format}, format {t.metadata['version']}"
            + (f", {human_bytes(data['disk_bytes'])})" if data["disk_bytes"] is not None
               else ")"),
            f"Status    {status}: {t.n_positions} positions in {t.n_steps} steps "
            f"(prompt {t.prompt_length})",
            f"Model     {m['name']} ({m.get('architecture') or '?'}, {m['kind']}): "
            f"{m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, "
            f"vocab {m['vocab_size']}",
            f"Captured  {', '.join(cap['captured']) or 'tokens only'}",
            f"Layers    {index_ranges(cap['layers'])} "
            f"(residual points {index_ranges(cap['points'])})",
            f"Stored    {cap['stored_dtype']}, top-k {cap['top_k']}, "
            f"attention top-k {cap['attention_top_k']}",
            "Vocab     " + (f"{m['vocab_size']} token texts ({human_bytes(t.plan.vocab_bytes)}): "
                            f"predictions read as text" if t.has_vocab else
                            "not stored: predictions are token ids (decode with the tokenizer)"),
        ]
        run_bits = [f"{k} {run[k]}" for k in ("device", "model_dtype", "attn_implementation")
                    if run.get(k)]
        if run_bits:
            lines.append(f"Run       {', '.join(run_bits)}")
        lines.append(f"Created   {t.metadata['created']}")
        more = "" if data["text_complete"] else f" ... (first {INFO_TEXT_CHARS} characters)"
        lines.append(f"Text      {data['text']!r}{more}")
        lines.append("Arrays")
        width = max(len(n) for n in data["arrays"])
        for name, a in data["arrays"].items():
            shape = " x ".join(f"{d} {s}" for d, s in zip(a["dims"], a["shape"], strict=True))
            lines.append(f"  {name:<{width}}  {a['dtype']:<8}  {shape}")
        # Names and values come from the trace: no control character reaches the terminal.
        click.echo("\n".join(one_line(line, None) for line in lines))


@main.command(cls=TraceCommand)
@click.argument("trace", type=TRACE)
@click.option("--quick", is_flag=True, help="Check structure only; do not decode every chunk.")
@click.option("--deep", is_flag=True,
              help="Also read every stored chunk of every array, coordinates included, and "
                   "check its checksum (naming each corrupt chunk).")
@remote_options
def validate(trace: Path | str, quick: bool, deep: bool, remote: dict[str, Any]) -> None:
    """Check a trace against the spec; one line per problem.

    TRACE is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    from .validate import validate as run_validate

    if quick and deep:
        raise click.UsageError("--quick and --deep exclude each other")
    with progress_bar("validating") as update:
        problems = run_validate(trace, quick=quick, deep=deep, progress=update, **remote)
    if problems:
        for p in problems:
            click.echo(f"{trace}: {p}", err=True)
        raise SystemExit(1)
    click.echo(f"{trace}: valid")


@main.command(cls=TraceCommand)
@click.argument("src", type=TRACE)
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]),
              help="Destination format [default: from DST's suffix, .zarr or .h5/.hdf5].")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@remote_options
def convert(src: Path | str, dst: Path, fmt: str | None, force: bool,
            remote: dict[str, Any]) -> None:
    """Convert a trace between zarr and HDF5, bit-exact.

    SRC is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    from .convert import convert as run_convert

    fmt = output_format(dst, fmt)
    with progress_bar("converting") as update:
        out = run_convert(src, dst, format=fmt, overwrite=force, progress=update, **remote)
    click.echo(f"wrote {out} ({human_bytes(disk_usage(out))})")


@main.command(cls=TraceCommand)
@click.argument("trace", type=click.Path(exists=True, path_type=Path))
@click.argument("url")
@click.option("--force", is_flag=True, help="Replace a trace already at URL.")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Objects uploaded at once.")
@click.option("--no-verify", is_flag=True,
              help="Do not read each object back to compare its crc32c with the local file's.")
@click.option("--allow-incomplete", is_flag=True,
              help="Push a trace that is still being recorded (status 'recording').")
def push(trace: Path, url: str, force: bool, jobs: int, no_verify: bool,
         allow_incomplete: bool) -> None:
    """Upload a trace to object storage (s3://, gs://, ...), verified."""
    from .push import push as run_push

    try:
        with progress_bar("pushing") as update:
            done = run_push(trace, url, progress=update, jobs=jobs, verify=not no_verify,
                            force=force, allow_incomplete=allow_incomplete)
    except KeyboardInterrupt:
        from .push import redact

        raise click.ClickException(
            f"interrupted: {redact(url)} is not a complete trace; run the same command again "
            f"to resume") from None
    kept = f", {len(done['skipped'])} already there" if done["skipped"] else ""
    check = "verified" if done["verified"] else "not verified"
    click.echo(f"pushed {trace} to {done['url']} ({done['objects']} objects, "
               f"{human_bytes(done['bytes'])}{kept}; {check})")


from .record_cli import record, replay  # noqa: E402 - torch-free; imports the recorder lazily

main.add_command(record)
main.add_command(replay)

from .view_cli import render, view  # noqa: E402 - imports tracekit_viewer (VTK) lazily

main.add_command(view)
main.add_command(render)

from .pack_cli import pack, unpack  # noqa: E402

main.add_command(pack)
main.add_command(unpack)
