"""Headless rendering: one frame to a PNG, or a range of steps to a GIF or MP4.

Used by ``tracekit render``. Frames show the scene and the views with a small caption (step,
current token), without the window's controls (play button, sliders, status and help text).
It needs no display: on a Linux machine without one, VTK renders through EGL (Mesa's llvmpipe
on a CPU), see :mod:`tracekit_viewer._vtkenv`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .scene import CityLayout
from .state import VIEWS, ViewState

__all__ = ["parse_head", "parse_size", "parse_steps", "render_frame", "render_movie",
           "viewer_state"]

MOVIE_SUFFIXES = (".gif", ".mp4")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_size(text: str) -> tuple[int, int]:
    """``"960x720"`` -> (960, 720)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 960x720, not {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ValueError(f"size {w}x{h} outside 16..8192 pixels")
    return w, h


def parse_head(text: str | int | None) -> str | int:
    """``mean``, ``max`` or a head index."""
    if text is None:
        return "mean"
    if isinstance(text, int):
        return text
    t = text.strip().lower()
    if t in ("mean", "max"):
        return t
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"head must be 'mean', 'max' or a head index, not {text!r}") from None


#: What a trace closed before its first step (the spec's empty trace) gets instead of a picture.
NO_STEPS = "the trace has no step recorded: nothing to show"


def parse_steps(text: str, n_steps: int) -> range:
    """Python-style ``A:B`` (B excluded; either may be empty or negative) over the steps."""
    if ":" not in text:
        raise ValueError(f"steps must look like A:B, not {text!r}")
    a, b = text.split(":", 1)
    try:
        sl = slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise ValueError(f"steps must look like A:B with integers, not {text!r}") from None
    if n_steps == 0:
        raise ValueError(NO_STEPS)
    steps = range(*sl.indices(n_steps))
    if len(steps) == 0:
        raise ValueError(f"steps {text!r} select no step of the {n_steps} in the trace")
    return steps


def viewer_state(source: Any, *, step: int | None = None, layer: int | None = None,
                 head: str | int | None = None, token: int | None = None, view: str = "iso",
                 metric: str = "residual", top_k: int = 2, threshold: float = 0.15
                 ) -> ViewState:
    """A :class:`ViewState` from command-line terms: ``layer`` is a model layer number,
    ``step`` may count from the end when negative (default: the last step)."""
    n = source.n_steps
    if n == 0:
        raise ValueError(NO_STEPS)
    if step is None:
        step = n - 1
    elif step < 0:
        step += n
    if not 0 <= step < n:
        raise ValueError(f"step out of range: the trace has steps 0..{n - 1}")
    focus = None
    if layer is not None:
        if layer not in source.floors:
            raise ValueError(f"layer {layer} was not captured (captured: {source.floors})")
        focus = source.floors.index(layer)
    heads = parse_head(head)
    if isinstance(heads, int) and not 0 <= heads < source.n_heads:
        raise ValueError(f"head {heads} out of range: the model has heads 0..{source.n_heads - 1}")
    if token is not None and not 0 <= token < source.n_positions:
        raise ValueError(f"token {token} out of range: the trace has positions "
                         f"0..{source.n_positions - 1}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    if metric not in source.metrics and source.metrics:
        raise ValueError(f"metric {metric!r} not in this trace (has {source.metrics})")
    return ViewState(step=step, focus=focus, heads=heads, traced=token, view=view,
                     metric=metric, top_k=top_k, threshold=threshold)


def _viewer(trace: Any, size: tuple[int, int], panels: bool, layout: CityLayout | None,
            **state: Any):
    from .app import CityViewer
    from .source import TraceSource

    probe = TraceSource(trace)
    try:
        st = viewer_state(probe, **state)
    finally:
        probe.close()
    # the scene and the views only: no play button, sliders, status or help (a "paused"
    # line is wrong in a movie), but a caption with the step and the current token
    return CityViewer(trace, state=st, off_screen=True, window_size=size, panels=panels,
                      layout=layout, prefetch=False, controls=False)


def render_frame(trace: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 size: tuple[int, int] = (1280, 800), panels: bool = True,
                 layout: CityLayout | None = None, **state: Any) -> Path:
    """Render one step (``step``, ``layer``, ``head``, ``token``, ``view``, ``metric``) to
    an image file (PNG, JPEG... by suffix)."""
    import imageio.v3 as iio

    out = Path(out)
    with _viewer(trace, size, panels, layout, **state) as v:
        iio.imwrite(out, v.screenshot())
    return out


def render_movie(trace: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 steps: str | range | None = None, fps: float = 4.0,
                 size: tuple[int, int] = (1280, 800), panels: bool = True,
                 layout: CityLayout | None = None,
                 progress: Callable[[int, int], None] | None = None, **state: Any) -> Path:
    """Render a range of steps (``"A:B"``, default all) to a GIF or MP4, one frame a step."""
    import imageio.v2 as imageio

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in MOVIE_SUFFIXES:
        raise ValueError(f"movie output must end in {' or '.join(MOVIE_SUFFIXES)}, not "
                         f"{out.name!r}")
    if suffix == ".mp4":
        # H.264 in yuv420p needs even sides; never let the encoder rescale
        size = (size[0] - size[0] % 2, size[1] - size[1] % 2)
    with _viewer(trace, size, panels, layout, **state) as v:
        chosen = steps if isinstance(steps, range) else parse_steps(steps or ":",
                                                                      v.source.n_steps)
        if suffix == ".gif":
            writer = imageio.get_writer(out, mode="I", duration=1000.0 / fps, loop=0)
        else:
            writer = imageio.get_writer(out, fps=fps, codec="libx264", quality=7,
                                        macro_block_size=1, pixelformat="yuv420p")
        try:
            for i, step in enumerate(chosen):
                v.set_step(step)
                frame = v.screenshot()
                writer.append_data(np.ascontiguousarray(frame[: size[1], : size[0]]))
                if progress is not None:
                    progress(i + 1, len(chosen))
        finally:
            writer.close()
    return out
