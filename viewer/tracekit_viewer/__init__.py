"""tracekit-viewer: the PyVista 3D viewer of tracekit traces (the "neural city").

Layers are floors, token positions are columns, attention arcs between columns; a timeline
scrubs through the steps of the recording. ``tracekit view TRACE`` opens it;
``tracekit render TRACE --step N -o frame.png`` renders headless.

The package is layered: :mod:`.scene` (pure numpy geometry), :mod:`.source` (bounded, cached
reads of a trace), :mod:`.frame` (what one frame shows), :mod:`.fetch` (frames read on a
background thread, so a slow trace never freezes the window), :mod:`.hud` (the status words),
and the thin VTK layer in :mod:`.app`, :mod:`.panels`, :mod:`.meshes` and :mod:`.render`.
Importing this package does not import VTK.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CityViewer", "ViewState", "__version__", "render_frame", "render_movie"]


def __getattr__(name: str):  # lazy: only the VTK layer needs pyvista
    if name == "CityViewer":
        from .app import CityViewer

        return CityViewer
    if name in ("render_frame", "render_movie"):
        from . import render

        return getattr(render, name)
    if name == "ViewState":
        from .state import ViewState

        return ViewState
    raise AttributeError(f"module 'tracekit_viewer' has no attribute {name!r}")
