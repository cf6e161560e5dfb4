"""``tracekit view`` and ``tracekit render``: the 3D viewer, from the separate tracekit-viewer
distribution, imported only when one of these commands runs (tracekit itself never imports
VTK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._cliutil import TRACE, TraceCommand, remote_options

INSTALL_HINT = ("the viewer is not installed: pip install -e viewer (in a tracekit checkout) "
                "or pip install tracekit-viewer")


def _viewer_module(name: str) -> Any:
    """Import ``tracekit_viewer.<name>``, or fail with one line that says how to install it."""
    import importlib

    try:
        return importlib.import_module(f"tracekit_viewer.{name}")
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("tracekit_viewer", "pyvista", "vtk", "vtkmodules",
                                              "imageio"):
            raise click.ClickException(INSTALL_HINT) from None
        raise


class _ViewerCommand(TraceCommand):
    """Like TraceCommand; a bad layer or head (ValueError from the viewer) is one line too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None


def _state_options(f: Any) -> Any:
    options = [
        click.option("--step", type=int, default=None,
                     help="Step to show (default: the last; negative counts from the end)."),
        click.option("--layer", type=int, default=None,
                     help="Focus this model layer: zoom to its floor, fade the others."),
        click.option("--head", default="mean", show_default=True,
                     help="Attention heads: mean, max or one head's index."),
        click.option("--token", type=int, default=None,
                     help="Trace this token position through every floor."),
        click.option("--view", "view_name", default="iso", show_default=True,
                     type=click.Choice(["iso", "front", "side", "top"]),
                     help="Camera preset."),
        click.option("--metric", default="residual", show_default=True,
                     type=click.Choice(["residual", "attn_out", "mlp_out"]),
                     help="What column height and colour show."),
        click.option("--top-k", type=click.IntRange(0, 64), default=2, show_default=True,
                     help="Arcs drawn per token: its strongest keys."),
        click.option("--threshold", type=click.FloatRange(0, 1), default=0.15,
                     show_default=True, help="Weakest attention weight drawn as an arc."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(cls=_ViewerCommand)
@click.argument("trace", type=TRACE)
@_state_options
@click.option("--cache-mb", type=click.IntRange(16, 1 << 20), default=64, show_default=True,
              help="Memory for cached blocks of the trace.")
@click.option("--size", default="1600x1000", show_default=True,
              help="Window width x height in pixels.")
@remote_options
def view(trace: Path | str, step: int | None, layer: int | None, head: str,
         token: int | None, view_name: str, metric: str, top_k: int, threshold: float,
         cache_mb: int, size: str, remote: dict[str, Any]) -> None:
    """Open a trace in the 3D viewer; press h there for the keys.

    TRACE is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    if _viewer_module("_vtkenv").headless():
        raise click.ClickException(
            "no display to open a window on (DISPLAY is not set); write pictures with "
            "tracekit render instead")
    app = _viewer_module("app")
    render = _viewer_module("render")
    dims = render.parse_size(size)
    source_mod = _viewer_module("source")
    from .reader import open_or_error

    with open_or_error(trace, **remote) as opened:
        probe = source_mod.TraceSource(opened)
        try:
            state = render.viewer_state(probe, step=step, layer=layer, head=head, token=token,
                                        view=view_name, metric=metric, top_k=top_k,
                                        threshold=threshold)
        finally:
            probe.close()
        viewer = app.CityViewer(opened, state=state, cache_bytes=cache_mb << 20,
                                window_size=dims)
        viewer.show()


@click.command(cls=_ViewerCommand)
@click.argument("trace", type=TRACE)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Image (.png, .jpg) or, with --steps, movie (.gif, .mp4) to write.")
@click.option("--steps", default=None,
              help="Render steps A:B (B excluded, Python style) as a movie.")
@_state_options
@click.option("--size", default="1280x800", show_default=True, help="Width x height in pixels.")
@click.option("--fps", type=click.FloatRange(0.1, 120), default=4.0, show_default=True,
              help="Frames (steps) per second of a movie.")
@click.option("--panels/--no-panels", default=True, show_default=True,
              help="Draw the linked layer, attention and token views beside the city.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@remote_options
def render(trace: Path | str, output: Path, steps: str | None, step: int | None,
           layer: int | None, head: str, token: int | None, view_name: str, metric: str,
           top_k: int, threshold: float, size: str, fps: float, panels: bool, force: bool,
           remote: dict[str, Any]) -> None:
    """Render a trace headless to a PNG, or --steps to a GIF/MP4.

    TRACE is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    if output.exists() and not force:  # the rule of every command that writes a file
        raise click.ClickException(f"{output} already exists (pass --force to overwrite)")
    from .reader import open_or_error

    with open_or_error(trace, **remote) as opened:
        _render(opened, output, steps, step, size, fps, panels,
                dict(layer=layer, head=head, token=token, view=view_name, metric=metric,
                     top_k=top_k, threshold=threshold))


def _render(trace: Any, output: Path, steps: str | None, step: int | None, size: str,
            fps: float, panels: bool, state: dict[str, Any]) -> None:
    render_mod = _viewer_module("render")
    dims = render_mod.parse_size(size)
    is_movie = output.suffix.lower() in render_mod.MOVIE_SUFFIXES
    if steps is not None or is_movie:
        if not is_movie:
            raise click.ClickException(f"--steps writes a movie: use a .gif or .mp4 output, "
                                       f"not {output.name!r}")
        if step is not None:
            raise click.ClickException("use either --step (one image) or --steps (a movie)")
        out = render_mod.render_movie(trace, output, steps=steps, fps=fps, size=dims,
                                      panels=panels, **state)
    else:
        if output.suffix.lower() not in render_mod.IMAGE_SUFFIXES:
            raise click.ClickException(f"{output}: write a picture (.png, .jpg) or, with "
                                       f"--steps, a movie (.gif, .mp4)")
        out = render_mod.render_frame(trace, output, size=dims, panels=panels, step=step,
                                      **state)
    click.echo(f"wrote {out}")
