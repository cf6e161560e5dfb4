"""The interactive viewer: a thin PyVista/VTK layer over :mod:`frame` and :mod:`scene`.

All actors are created once. A frame update recomputes the frame data, turns it into arrays
with the pure scene functions and copies those into the existing VTK arrays (points, colours,
cells); only a change of the level-of-detail layout (a new focused floor) changes how many
boxes there are. The four views live in one window, as in the seed's 2x2 sketch:

    +---------------------+--------------+
    | 3D city             | layer view   |
    +---------------------+--------------+
    | attention pattern   | token states |
    +---------------------+--------------+

The linked views are built and updated in :mod:`.panels`, the in-place VTK updates are in
:mod:`.meshes`, the status words in :mod:`.hud`; in a window, frames are read in the
background by :mod:`.fetch`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import _vtkenv
from .fetch import PREFETCH_STEPS, FrameFetcher
from .frame import (
    CityFrame,
    Frame,
    capacity_of,
    compute_frame,
)
from .hud import caption_text, error_text, loading_text, short_text, status_text
from .meshes import (
    TEXT_RGB,
    Labels,
    Polylines,
    box_edges,
    justify_text,
    lut,
    pyramid_faces,
    replace_mesh,
    write_mesh,
)
from .panels import PanelViews
from .scene import (
    CURRENT_RGB,
    TRACED_RGB,
    WIDTH_BINS,
    CityLayout,
    arc_points,
    arc_style,
    box_corners,
    box_faces,
    camera_preset,
    colour_values,
    fit_layout,
    floor_boxes,
    floor_z,
    label_slots,
    link_alpha,
    link_segments,
)
from .source import DEFAULT_CACHE_BYTES, METRIC_TITLES, NotCached, TraceSource
from .state import (
    KEYMAP,
    METRIC_ORDER,
    VIEWS,
    ViewState,
    cycle,
    cycle_heads,
    head_label,
    help_text,
    next_speed,
)

__all__ = ["CityViewer", "PickInfo", "open_viewer"]

BACKGROUND = (0.06, 0.07, 0.09)
ARC_WIDTHS = (1.0, 2.0, 3.5, 5.5)
LOADING_RGB = (1.0, 0.78, 0.25)  # the "loading step N" mark
ERROR_RGB = (1.0, 0.45, 0.40)  # a read that failed
HOVER_INTERVAL = 0.08  # seconds between hover picks
#: Ends of the step slider in the city's viewport (0..1), and the play button's size (pixels).
STEP_SLIDER = ((0.10, 0.06), (0.70, 0.06))
PLAY_BUTTON_SIZE = 28
#: When set, the viewer writes its state as JSON to this file after every change (for scripts
#: and the test that drives a real window).
STATE_FILE_VARIABLE = "TRACEKIT_VIEW_STATE"
CITY_CMAP, ARC_CMAP = "viridis", "plasma"


@dataclass
class PickInfo:
    """What is under a display position: a column (position, floor), an arc (query, key)
    or a cell of a panel, with the exact value there."""

    kind: str  # "column", "arc", "layer", "attention", "token" or "none"
    position: int | None = None
    floor: int | None = None
    key: int | None = None
    value: float | None = None
    text: str = ""


class CityViewer(PanelViews):
    """The neural-city viewer of one trace. ``off_screen=True`` renders without a window.

    ``controls=False`` (rendered frames and movies) draws the scene and the views only: no
    play button or sliders, no status, hover or help text, but a small caption with the
    step and the current token. ``widgets=False`` leaves out just the play button and
    sliders.

    ``background`` (default: on in a window, off off-screen) reads off the window's thread:
    a change whose data is not cached keeps the last frame on screen with a "loading step
    N..." mark, the frame is read by a :class:`~tracekit_viewer.fetch.FrameFetcher` and
    shown by :meth:`poll` (the window's timer) when it is ready. Off, every :meth:`update`
    reads what it needs before it returns (rendered frames and tests stay deterministic).
    ``prefetch`` warms the cache for the next steps after each frame shown.
    """

    def __init__(self, trace: Any, *, state: ViewState | None = None,
                 layout: CityLayout | None = None, panels: bool = True,
                 off_screen: bool = False, window_size: tuple[int, int] = (1600, 1000),
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch: bool = True,
                 widgets: bool = True, controls: bool = True,
                 background: bool | None = None) -> None:
        _vtkenv.prepare(off_screen)
        import pyvista as pv
        import vtk

        self._pv = pv
        # Token text is literal: never let VTK parse '$' or '|' in it as MathText (slow, and
        # it would mangle the text).
        vtk.vtkTextRenderer.GetInstance().SetDefaultBackend(vtk.vtkTextRenderer.FreeType)
        self.source = TraceSource(trace, cache_bytes=cache_bytes)
        if self.source.n_steps == 0:
            self.source.close()
            raise ValueError("the trace has no committed steps to show")
        self.layout = layout or fit_layout(min(CityLayout().window, self.source.n_positions),
                                           self.source.n_floors)
        self.panels = panels
        self.off_screen = off_screen
        self.controls = controls
        self.state = self._normalized(state or ViewState(step=self.source.n_steps - 1))
        self.background = (not off_screen) if background is None else bool(background)
        self.fetcher: FrameFetcher | None = None
        if self.background or prefetch:
            self.fetcher = FrameFetcher(self.source, self.layout, panels=panels,
                                        prefetch_steps=PREFETCH_STEPS if prefetch else 0)
        self.loading: int | None = None  # the step being read in the background
        self.read_error: str | None = None  # the last background read that failed, one line
        self._direction = 1  # which way the steps last moved: where to prefetch
        self.frame: Frame | None = None
        self.last_pick = PickInfo("none")
        self._city_lut = lut(CITY_CMAP)
        self._arc_lut = lut(ARC_CMAP)
        self._groups: np.ndarray | None = None
        self._boxes: tuple[np.ndarray, ...] = ()
        self._arc_index: list[np.ndarray] = [np.zeros(0, np.int64)] * WIDTH_BINS
        self._camera_key: tuple | None = None
        self._hover_at = 0.0
        self._last_tick = time.monotonic()
        self._timer_id: int | None = None
        self._slider_guard = False
        self._mouse: tuple[int, int] = (0, 0)
        self._panel_keys: dict[str, tuple] = {}

        # text scales with the window, so small renders stay legible and big ones not tiny
        self._font_scale = float(np.clip(window_size[1] / 1000.0, 0.55, 1.6))
        shape = (2, 2) if panels else (1, 1)
        kw: dict[str, Any] = {"row_weights": [3, 2], "col_weights": [3, 2]} if panels else {}
        theme = pv.themes.DarkTheme()
        theme.multi_samples = 0  # MSAA multiplies the cost of every frame on software GL
        theme.allow_empty_mesh = True
        self.plotter = pv.Plotter(shape=shape, off_screen=off_screen, window_size=window_size,
                                  border=False, theme=theme, **kw)
        self.plotter.subplot(0, 0)
        self.city_renderer = self.plotter.renderer
        self.city_renderer.set_background(BACKGROUND)
        self._build_city()
        if panels:
            self._build_panels()
        self._build_hud()
        self.widgets = widgets and controls
        if self.widgets:
            self._build_widgets()
        self._bind_events()
        self.update(wait=True)  # the window opens on a frame

    # -- state ------------------------------------------------------------------------------
    def _normalized(self, st: ViewState) -> ViewState:
        src = self.source
        st = st.copy(step=min(max(0, int(st.step)), src.n_steps - 1))
        if st.metric not in src.metrics and src.metrics:
            st.metric = src.metrics[0]
        if isinstance(st.heads, int) and not 0 <= st.heads < src.n_heads:
            raise ValueError(f"head {st.heads} out of range (0..{src.n_heads - 1})")
        if st.focus is not None and not 0 <= st.focus < src.n_floors:
            raise ValueError(f"floor {st.focus} out of range (0..{src.n_floors - 1})")
        if st.traced is not None and not 0 <= st.traced < src.n_positions:
            raise ValueError(f"token {st.traced} out of range (0..{src.n_positions - 1})")
        if st.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, not {st.view!r}")
        st.top_k = max(0, min(int(st.top_k), 64))
        st.threshold = float(min(max(st.threshold, 0.0), 1.0))
        return st

    def set_state(self, **changes: Any) -> ViewState:
        """Change the state (any :class:`ViewState` field) and redraw every view (in the
        background when its data must be read, see :meth:`update`)."""
        old = self.state.step
        self.state = self._normalized(self.state.copy(**changes))
        if self.state.step != old:
            self._direction = 1 if self.state.step > old else -1
        self.update()
        return self.state

    def set_step(self, step: int) -> None:
        self.set_state(step=int(step))

    # -- building ---------------------------------------------------------------------------
    def _fs(self, size: int) -> int:
        return max(6, round(size * self._font_scale))

    def _add_rgba_mesh(self, renderer_mesh: Any, **kw: Any) -> Any:
        actor = self.plotter.add_mesh(renderer_mesh, scalars="rgba", rgba=True,
                                      show_scalar_bar=False, reset_camera=False, **kw)
        return actor

    def _build_city(self) -> None:
        pv = self._pv
        # Colours per point (all 8 corners of a box alike), not per face: the mapper then
        # needs no cell-to-colour map, rebuilt on every frame. Closed boxes: back faces are
        # never seen, so they are culled (a third less to rasterize on a software renderer).
        self.columns = pv.PolyData(np.zeros((8, 3)), faces=box_faces(1))
        self.columns.point_data["rgba"] = np.zeros((8, 4), np.uint8)
        self.columns_actor = self._add_rgba_mesh(self.columns, name="columns", lighting=True,
                                                 culling="back")
        self.columns_actor.prop.ambient = 0.35
        self.arcs = []
        self.arc_actors = []
        self._arc_lines = []
        for b in range(WIDTH_BINS):
            mesh = self._empty_lines(point=True)
            actor = self._add_rgba_mesh(mesh, name=f"arcs{b}", line_width=ARC_WIDTHS[b],
                                        lighting=False)
            self.arcs.append(mesh)
            self.arc_actors.append(actor)
            self._arc_lines.append(Polylines(mesh, self.layout.arc_segments))
        self.links = self._empty_lines(point=True)
        self._link_lines = Polylines(self.links, 2)
        self.links_actor = self._add_rgba_mesh(self.links, name="links", line_width=1.0,
                                               lighting=False)
        self.links_actor.SetPickable(False)
        self.plates = pv.PolyData(np.zeros((4, 3)), faces=np.array([4, 0, 1, 2, 3]))
        self.plates.cell_data["rgba"] = np.zeros((1, 4), np.uint8)
        self.plates_actor = self._add_rgba_mesh(self.plates, name="plates", lighting=False)
        self.plates_actor.SetPickable(False)
        self.tracer = pv.PolyData(np.zeros((8, 3)), lines=box_edges())
        self.tracer_actor = self.plotter.add_mesh(self.tracer, color=TRACED_RGB, line_width=2.5,
                                                  name="tracer", lighting=False,
                                                  reset_camera=False)
        self.tracer_actor.SetPickable(False)
        self.marker = pv.PolyData(np.zeros((5, 3)), faces=pyramid_faces(1))
        self.marker_actor = self.plotter.add_mesh(self.marker, color=CURRENT_RGB, name="marker",
                                                  lighting=False, reset_camera=False)
        self.marker_actor.SetPickable(False)
        self.token_labels = Labels(self.city_renderer, size=self._fs(11), justify="right",
                                    orientation=60.0)
        self.floor_labels = Labels(self.city_renderer, size=self._fs(13), justify="right",
                                    bold=True)
        self.scalar_bar = self._make_scalar_bar(self.city_renderer, self._city_lut)

    def _empty_lines(self, point: bool = False) -> Any:
        mesh = self._pv.PolyData(np.zeros((2, 3)), lines=np.array([2, 0, 1]))
        if point:
            mesh.point_data["rgba"] = np.zeros((2, 4), np.uint8)
        else:
            mesh.cell_data["rgba"] = np.zeros((1, 4), np.uint8)
        return mesh

    def _make_scalar_bar(self, renderer: Any, lut_rgb: np.ndarray, title: str = "",
                         position: tuple[float, float] = (0.90, 0.22)) -> Any:
        import vtk

        lut = vtk.vtkLookupTable()
        lut.SetNumberOfTableValues(len(lut_rgb))
        for i, (r, g, b) in enumerate(lut_rgb):
            lut.SetTableValue(i, r, g, b, 1.0)
        lut.Build()
        bar = vtk.vtkScalarBarActor()
        bar.SetLookupTable(lut)
        bar.SetTitle(title)
        bar.SetNumberOfLabels(5)
        bar.SetLabelFormat("%.3g")
        bar.SetPosition(*position)
        bar.SetWidth(0.08)
        bar.SetHeight(0.55)
        bar.SetUnconstrainedFontSize(True)
        for prop in (bar.GetTitleTextProperty(), bar.GetLabelTextProperty()):
            prop.SetColor(*TEXT_RGB)
            prop.SetFontSize(self._fs(12))
            prop.SetShadow(False)
            prop.SetItalic(False)
        bar.SetPickable(False)
        renderer.AddViewProp(bar)
        return bar

    def _text(self, renderer: Any, xy: tuple[float, float], size: int = 13,
              align: str = "left", valign: str = "top", mono: bool = False) -> Any:
        import vtk

        actor = vtk.vtkTextActor()
        actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        actor.SetPosition(*xy)
        prop = actor.GetTextProperty()
        prop.SetFontSize(size)
        prop.SetColor(*TEXT_RGB)
        if mono:
            prop.SetFontFamilyToCourier()
        justify_text(prop, align, valign)
        actor.SetPickable(False)
        renderer.AddViewProp(actor)
        return actor

    def _build_hud(self) -> None:
        ren = self.city_renderer
        self.status = self._text(ren, (0.01, 0.99), size=self._fs(13))
        self.hover_text = self._text(ren, (0.01, 0.11), size=self._fs(12), valign="bottom")
        self.help_overlay = self._text(ren, (0.5, 0.55), size=self._fs(13), align="center",
                                       valign="center", mono=True)
        prop = self.help_overlay.GetTextProperty()
        prop.SetBackgroundColor(0.0, 0.0, 0.0)
        prop.SetBackgroundOpacity(0.95)
        prop.SetFrame(True)
        # centred as a block, left-aligned inside: pad every line to the same width
        lines = help_text().splitlines()
        width = max(len(line) for line in lines)
        self.help_overlay.SetInput("\n".join(f" {line.ljust(width)} " for line in lines))
        self.help_overlay.SetVisibility(False)
        prop = self.hover_text.GetTextProperty()
        prop.SetBackgroundColor(*BACKGROUND)
        prop.SetBackgroundOpacity(0.8)
        # rendered frames: a caption in place of the status, hover and help text
        self.caption = self._text(ren, (0.01, 0.99), size=self._fs(12))
        self.caption.SetVisibility(not self.controls)
        # a step still being read, or a read that failed: one line over the city's top edge,
        # under the status (boxed, so it stands out over whatever is drawn behind it)
        self.loading_mark = self._text(ren, (0.5, 0.80), size=self._fs(18), align="center",
                                       valign="top")
        prop = self.loading_mark.GetTextProperty()
        prop.SetBold(True)
        prop.SetBackgroundColor(*BACKGROUND)
        prop.SetBackgroundOpacity(0.85)
        prop.SetFrame(True)
        self.loading_mark.SetVisibility(False)
        for actor in (self.status, self.hover_text):
            actor.SetVisibility(self.controls)

    def _build_widgets(self) -> None:
        self.plotter.subplot(0, 0)
        n = self.source.n_steps
        # slider end points are relative to the city's viewport
        self.step_slider = self.plotter.add_slider_widget(
            self._on_step_slider, [0, max(1, n - 1)], value=self.state.step, title="step",
            pointa=STEP_SLIDER[0], pointb=STEP_SLIDER[1], style="modern", fmt="%.0f",
            interaction_event="always", title_height=0.025, slider_width=0.025,
            tube_width=0.006)
        self.threshold_slider = self.plotter.add_slider_widget(
            self._on_threshold_slider, [0.0, 1.0], value=self.state.threshold,
            title="arc threshold", pointa=(0.76, 0.06), pointb=(0.96, 0.06), style="modern",
            fmt="%.2f", interaction_event="always", title_height=0.025, slider_width=0.025,
            tube_width=0.006)
        self.play_button = self.plotter.add_checkbox_button_widget(
            self._on_play_button, value=self.state.playing, position=(0.0, 0.0),
            size=PLAY_BUTTON_SIZE, color_on="orange", color_off="grey")
        self._place_play_button()

    def _place_play_button(self) -> None:
        """Put the play button just left of the step slider (its bounds are pixels from the
        city viewport's corner, so they are set again when the window changes size)."""
        vx0, vy0, vx1, vy1 = self.city_renderer.GetViewport()
        w, h = self.plotter.window_size
        size = PLAY_BUTTON_SIZE
        x = max(2.0, STEP_SLIDER[0][0] * (vx1 - vx0) * w - size - 14)
        y = max(2.0, STEP_SLIDER[0][1] * (vy1 - vy0) * h - size / 2)
        self.play_button_bounds = (x, x + size, y, y + size)
        self.play_button.GetRepresentation().PlaceWidget([*self.play_button_bounds, 0, 0])

    def _bind_events(self) -> None:
        iren = self.plotter.iren
        iren.clear_key_event_callbacks()
        # VTK's own one-letter shortcuts (w: wireframe, 3: stereo, ...) would fight ours.
        iren.interactor.RemoveObservers("CharEvent")
        for sym, _, action in KEYMAP:
            iren.add_key_event(sym, getattr(self, f"action_{action}"))
        iren.add_observer("MouseMoveEvent", self._on_mouse_move)
        iren.add_observer("LeftButtonPressEvent", self._on_left_press)
        iren.add_observer("TimerEvent", self._on_timer)
        iren.add_observer("ConfigureEvent", self._on_configure)
        self._size = tuple(self.plotter.window_size)

    def _on_configure(self, *_: Any) -> None:
        """The window changed size: refit the panels and move the play button."""
        size = tuple(self.plotter.window_size)
        if size == self._size:
            return
        self._size = size
        self._panel_keys.clear()
        if self.widgets:
            self._place_play_button()
        self.update()

    # -- updating ---------------------------------------------------------------------------
    def update(self, render: bool | None = None, *, wait: bool | None = None) -> Frame | None:
        """Show the frame of the current state in every view and redraw the window
        (off-screen, the next :meth:`screenshot` draws). Returns the frame shown.

        In background mode (``wait`` False; the default in a window) a frame whose data is
        not all cached is read on the fetch thread instead: this returns None at once, the
        last frame stays with a "loading step N..." mark, and :meth:`poll` shows the new
        frame when it is ready. ``wait=True`` (the default off-screen) reads here."""
        wait = not self.background if wait is None else wait
        state = self.state.copy()
        if wait or self.fetcher is None:
            if self.fetcher is not None:
                self.fetcher.cancel()  # a result for an older state must not come after
            fr = compute_frame(self.source, state, self.layout, panels=self.panels)
        else:
            fr = self.fetcher.cached(state)
            if fr is None:
                self.fetcher.request(state)
                self.loading, self.read_error = state.step, None
                self._show_mark(render)
                return None
        self._show(fr, render)
        return fr

    def poll(self) -> bool:
        """Show the frame (or the read error) the fetch thread finished, if any: the
        window's timer calls it. True when the window changed."""
        if self.fetcher is None or self.loading is None:
            return False
        got = self.fetcher.take()
        if got is None:
            return False
        if got.state != self.state:  # changed without an update(): ask again
            self.update()
            return True
        if got.frame is None:
            self.loading, self.read_error = None, error_text(got.state.step, got.error or "")
            self._show_mark(None)
            return True
        self._show(got.frame, None)
        return True

    def finish_loading(self, timeout: float | None = 60.0) -> Frame | None:
        """Wait until the frame being read in the background is shown (or its read failed);
        returns the frame on screen. For scripts and tests: the window polls by itself."""
        if self.fetcher is not None and self.loading is not None:
            self.fetcher.wait(timeout)
            self.poll()
        return self.frame

    def _show(self, fr: Frame, render: bool | None) -> None:
        """Copy a computed frame into the actors, then warm the cache for the next steps."""
        self.frame = fr
        self.loading = self.read_error = None
        self._update_city(fr.city)
        if self.panels:
            self._update_layer(fr.layer)
            self._update_attention(fr.attention)
            self._update_token(fr.token)
        self._update_hud(fr)
        self.loading_mark.SetVisibility(False)
        self._apply_camera()
        if self.widgets:
            self._sync_widgets()
        if self.fetcher is not None:
            self.fetcher.prefetch(fr.state, self._direction)
        if render if render is not None else not self.off_screen:
            self.plotter.render()
        self._dump_state()

    def _show_mark(self, render: bool | None) -> None:
        """Show the "loading step N..." mark or the read error over the last frame."""
        if self.loading is not None:
            text, rgb = loading_text(self.loading, self.source.n_steps), LOADING_RGB
        else:
            text, rgb = self.read_error or "", ERROR_RGB
        # as much of the line as fits across the city's view (a URL can be long)
        vx0, _, vx1, _ = self.city_renderer.GetViewport()
        fit = max(20, int((vx1 - vx0) * self.plotter.window_size[0] / (0.5 * self._fs(18))) - 4)
        if len(text) > fit:
            text = text[: fit - 3] + "..."
        self.loading_mark.SetInput(f"  {text}  " if text else "")  # (room inside the box)
        self.loading_mark.GetTextProperty().SetColor(*rgb)
        self.loading_mark.GetTextProperty().SetFrameColor(*rgb)
        self.loading_mark.SetVisibility(bool(text))
        if self.widgets:
            self._sync_widgets()  # the slider follows the step asked for
        if render if render is not None else not self.off_screen:
            self.plotter.render()
        self._dump_state()

    def _dump_state(self, **extra: Any) -> None:
        """Write the state, the window size and the hover line as JSON, atomically, to the
        file named by ``TRACEKIT_VIEW_STATE`` (when set)."""
        import json

        path = os.environ.get(STATE_FILE_VARIABLE)
        if not path:
            return
        data = {**asdict(self.state), "window_size": list(self.plotter.window_size),
                "hover": self.last_pick.text, "loading": self.loading,
                "shown_step": None if self.frame is None else self.frame.city.step,
                "read_error": self.read_error, **extra}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _update_city(self, fr: CityFrame) -> None:
        st, lay = self.state, self.layout
        lo, hi = fr.value_range
        n_floors = fr.values.shape[0]
        floors, first, span, vals = floor_boxes(fr.values, fr.groups, fr.capacity)
        pts = box_corners(floors, first, span, vals, n_floors, fr.n_cols, lo, hi, lay)
        alpha = np.ones(len(vals)) if fr.focus is None else np.where(
            floors == fr.focus, 1.0, lay.fade_alpha)
        rgba = colour_values(vals, lo, hi, self._city_lut, alpha)
        n_boxes = len(vals)
        if self._groups is None or not np.array_equal(self._groups, fr.groups):
            replace_mesh(self.columns, pts, faces=box_faces(n_boxes),
                     rgba=np.repeat(rgba, 8, axis=0), point=True)
            self._groups = fr.groups.copy()
        else:
            write_mesh(self.columns, pts, np.repeat(rgba, 8, axis=0), point=True)
        self._boxes = (floors, first, span)
        self.columns_actor.SetVisibility(st.show_columns)

        # column heights per slot, for the residual links
        heights = (pts.reshape(-1, 8, 3)[:, 4, 2] - pts.reshape(-1, 8, 3)[:, 0, 2])
        col_h = np.zeros((n_floors, fr.capacity))
        for f in range(n_floors):
            m = floors == f
            col_h[f] = np.repeat(heights[m], fr.groups[f])[: fr.capacity]
        self._update_arcs(fr, n_floors)
        self._update_links(fr, col_h)
        self._update_plates(fr, n_floors)
        self._update_markers(fr, n_floors, col_h)
        self._update_city_labels(fr, n_floors)
        self.scalar_bar.GetLookupTable().SetRange(lo, hi if hi > lo else lo + 1)
        self.scalar_bar.SetTitle(METRIC_TITLES.get(fr.metric, fr.metric))

    def _update_arcs(self, fr: CityFrame, n_floors: int) -> None:
        lay = self.layout
        arcs = fr.arcs
        z = floor_z(n_floors, lay)
        xq = (arcs.query - fr.start) * lay.spacing
        xk = (arcs.key - fr.start) * lay.spacing
        pts = arc_points(xk, xq, z[arcs.floor], lay)
        bins, rgba = arc_style(arcs.weight, arcs.kind, self.state.threshold, self._arc_lut)
        if fr.focus is not None:
            fade = (arcs.floor != fr.focus) & (arcs.kind == 0)
            rgba[fade, 3] = (rgba[fade, 3] * lay.fade_alpha).astype(np.uint8)
        for b in range(WIDTH_BINS):
            idx = np.flatnonzero(bins == b)
            self._arc_index[b] = idx
            self._arc_lines[b].set(pts[idx], rgba[idx])
            self.arc_actors[b].SetVisibility(self.state.show_arcs)
            self.arc_actors[b].SetPickable(len(idx) > 0)  # (empty: collapsed at the origin)

    def _update_links(self, fr: CityFrame, col_h: np.ndarray) -> None:
        lay = self.layout
        n_floors, cap = col_h.shape
        pts = link_segments(col_h, fr.n_cols, lay)
        if len(pts) == 0:
            self._link_lines.set(np.zeros((0, 2, 3)), np.zeros((0, 4), np.uint8))
            return
        n_seg = len(pts) // 2
        contrib = np.full((n_floors, cap), np.nan)
        if fr.contribution is not None:
            contrib[:, : fr.n_cols] = fr.contribution
        # the link above floor f carries the stream into floor f + 1: that block's change
        alpha = link_alpha(contrib[1:]).reshape(-1)
        rgba = np.zeros((n_seg, 4), np.uint8)
        rgba[:, :3] = 170
        rgba[:, 3] = (alpha * 255).astype(np.uint8)
        slot = np.tile(np.arange(cap), n_floors - 1)
        for pos, rgb in ((fr.traced, TRACED_RGB),):
            if pos is not None and fr.start <= pos < fr.end:
                m = slot == pos - fr.start
                rgba[m, :3] = rgb
                rgba[m, 3] = 255
        cur = slot == fr.current.stop - 1 - fr.start  # the current token
        rgba[cur, :3] = CURRENT_RGB
        rgba[cur, 3] = np.maximum(rgba[cur, 3], 200)
        if fr.focus is not None:
            rgba[:, 3] = (rgba[:, 3] * 0.5).astype(np.uint8)
        # A curtain of thousands of links hides the city: link every k-th column (and the
        # current and traced token's), at most ``max_links`` columns.
        every = max(1, -(-cap // self.layout.max_links))
        keep = (slot % every == 0) | cur
        if fr.traced is not None and fr.start <= fr.traced < fr.end:
            keep |= slot == fr.traced - fr.start
        self._link_lines.set(pts.reshape(-1, 2, 3)[keep], rgba[keep])
        self.links_actor.SetVisibility(self.state.show_links)

    def _update_plates(self, fr: CityFrame, n_floors: int) -> None:
        lay = self.layout
        z = floor_z(n_floors, lay) - 0.02
        x0, x1 = -0.6 * lay.spacing, (fr.capacity - 1 + 0.6) * lay.spacing
        y0, y1 = -lay.box_depth, lay.box_depth
        pts = np.zeros((n_floors, 4, 3))
        pts[:, :, 0] = [x0, x1, x1, x0]
        pts[:, :, 1] = [y0, y0, y1, y1]
        pts[:, :, 2] = z[:, None]
        faces = np.column_stack([np.full(n_floors, 4), 4 * np.arange(n_floors)[:, None]
                                 + np.arange(4)[None, :]]).reshape(-1)
        rgba = np.tile(np.array([[60, 66, 80, 70 if fr.focus is None else 25]], np.uint8),
                       (n_floors, 1))
        if fr.focus is not None:
            rgba[fr.focus] = (70, 110, 190, 120)
        if self.plates.n_points == len(pts) * 4:
            write_mesh(self.plates, pts.reshape(-1, 3), rgba)
        else:
            replace_mesh(self.plates, pts.reshape(-1, 3), faces=faces, rgba=rgba)

    def _update_markers(self, fr: CityFrame, n_floors: int, col_h: np.ndarray) -> None:
        lay = self.layout
        top = floor_z(n_floors, lay)[-1] + lay.max_height + 0.5
        cur = [fr.current.stop - 1 - fr.start]  # the current token (last of the step)
        apex = np.array([[s * lay.spacing, 0.0, top] for s in cur]).reshape(-1, 3)
        w = lay.box_width / 2
        pts = []
        for ax, _ay, az in apex:
            pts += [[ax - w, -w, az + 0.6], [ax + w, -w, az + 0.6], [ax + w, w, az + 0.6],
                    [ax - w, w, az + 0.6], [ax, 0.0, az]]
        if pts:
            replace_mesh(self.marker, np.array(pts, np.float64), faces=pyramid_faces(len(cur)))
        self.marker_actor.SetVisibility(bool(pts))
        visible = fr.traced is not None and fr.start <= fr.traced < fr.end
        if visible:
            s = fr.traced - fr.start
            x = s * lay.spacing
            hw = lay.box_width / 2 + 0.12
            z1 = floor_z(n_floors, lay)[-1] + float(col_h[-1, s]) + 0.15
            corners = np.array([[x + sx * hw, sy * (lay.box_depth / 2 + 0.12), z]
                                for z in (-0.15, z1)
                                for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
            replace_mesh(self.tracer, corners, lines=box_edges())
        self.tracer_actor.SetVisibility(visible)  # (it may have scrolled out of the window)

    def _update_city_labels(self, fr: CityFrame, n_floors: int) -> None:
        lay = self.layout
        always = [p - fr.start for p in (fr.current.stop - 1, fr.traced) if p is not None]
        slots = label_slots(fr.n_cols, lay.max_labels, always)
        xyz = np.column_stack([slots * lay.spacing, np.full(len(slots), -lay.box_depth),
                               np.full(len(slots), -0.5)])
        self.token_labels.set(xyz, [short_text(fr.texts[s]) for s in slots])
        z = floor_z(n_floors, lay)
        marks = ["> " if f == fr.focus else "" for f in range(n_floors)]
        self.floor_labels.set(
            np.column_stack([np.full(n_floors, -1.2 * lay.spacing), np.zeros(n_floors),
                             z + 0.3]),
            [f"{marks[f]}L{layer}" for f, layer in enumerate(self.source.floors)])
        self.token_labels.visible(self.state.show_labels)
        self.floor_labels.visible(self.state.show_labels)

    def _update_hud(self, fr: Frame) -> None:
        st = self.state
        if not self.controls:
            self.caption.SetInput(caption_text(self.source, fr))
            self.help_overlay.SetVisibility(False)
            return
        self.status.SetInput(status_text(self.source, st, fr))
        self.help_overlay.SetVisibility(st.help)
        if st.help:  # overlays are drawn in order: keep the help above labels added later
            props = self.city_renderer.GetViewProps()
            if props.GetItemAsObject(props.GetNumberOfItems() - 1) is not self.help_overlay:
                self.city_renderer.RemoveViewProp(self.help_overlay)
                self.city_renderer.AddViewProp(self.help_overlay)
        self.hover_text.SetInput(self.last_pick.text)

    # -- camera -----------------------------------------------------------------------------
    def city_bounds(self) -> tuple[float, float, float, float, float, float]:
        lay = self.layout
        cap = capacity_of(self.source, lay)
        top = floor_z(self.source.n_floors, lay)[-1] + lay.max_height + 1.0
        return (-1.5 * lay.spacing, (cap - 0.5) * lay.spacing, -lay.arc_max_peak - 1.0,
                lay.box_depth, -1.0, top)

    def _apply_camera(self, force: bool = False) -> None:
        """Move the camera when the view preset or the focused floor changes (never per
        frame, so the user's own rotation stays)."""
        key = (self.state.view, self.state.focus)
        if key == self._camera_key and not force:
            return
        self._camera_key = key
        bounds = self.city_bounds()
        pos, focal, up = camera_preset(self.state.view, bounds)
        if self.state.focus is not None:
            z = floor_z(self.source.n_floors, self.layout)[self.state.focus]
            zc = z + self.layout.max_height / 2
            d = np.subtract(pos, focal)
            width = bounds[1] - bounds[0]
            vx0, vy0, vx1, vy1 = self.city_renderer.GetViewport()
            w, h = self.plotter.window_size
            aspect = max(1e-6, (vx1 - vx0) * w) / max(1e-6, (vy1 - vy0) * h)
            # far enough for the floor's width to fill the view (30 degree view angle)
            dist = 0.55 * width / np.tan(np.radians(15.0)) / max(1.0, aspect)
            d = d / np.linalg.norm(d) * max(6.0, dist)
            focal = (focal[0], focal[1], zc)
            pos = tuple(np.add(focal, d).tolist())
        cam = self.city_renderer.GetActiveCamera()
        cam.SetFocalPoint(*focal)
        cam.SetPosition(*pos)
        cam.SetViewUp(*up)
        cam.SetViewAngle(30.0)
        if self.state.focus is None:
            self.city_renderer.ResetCamera(*bounds)
            cam.Zoom(1.25)  # the bounds' sphere is loose around a long, flat city
        self.city_renderer.ResetCameraClippingRange()
        self.city_renderer.camera.is_set = True

    # -- widgets and events -----------------------------------------------------------------
    def _sync_widgets(self) -> None:
        self._slider_guard = True
        try:
            self.step_slider.GetRepresentation().SetValue(self.state.step)
            self.threshold_slider.GetRepresentation().SetValue(self.state.threshold)
            rep = self.play_button.GetRepresentation()
            rep.SetState(1 if self.state.playing else 0)
        finally:
            self._slider_guard = False

    def _on_step_slider(self, value: float) -> None:
        if self._slider_guard or not hasattr(self, "step_slider"):
            return
        step = int(round(value))
        if step != self.state.step:
            self.set_step(step)

    def _on_threshold_slider(self, value: float) -> None:
        if self._slider_guard or not hasattr(self, "threshold_slider"):
            return
        if abs(value - self.state.threshold) > 1e-6:
            self.set_state(threshold=float(value))

    def _on_play_button(self, on: bool) -> None:
        if self._slider_guard:
            return
        self.set_playing(bool(on))

    def set_playing(self, on: bool) -> None:
        if on and self.state.step >= self.source.n_steps - 1:
            self.state.step = 0  # play from the start again
        self._last_tick = time.monotonic()
        self.set_state(playing=on)
        if on and not self.off_screen and self._timer_id is None:
            iren = self.plotter.iren.interactor
            if iren.GetInitialized():
                self._timer_id = iren.CreateRepeatingTimer(30)

    def tick(self, now: float | None = None) -> bool:
        """Advance playback if a step is due at ``now``; True when the step changed."""
        if not self.state.playing:
            return False
        now = time.monotonic() if now is None else now
        if self.loading is not None or self.read_error is not None:
            self._last_tick = now  # hold on the step being read: never skip past it
            return False
        due = int((now - self._last_tick) * self.state.speed)
        if due <= 0:
            return False
        self._last_tick += due / self.state.speed
        target = self.state.step + due
        if target >= self.source.n_steps - 1:
            self.set_state(step=self.source.n_steps - 1, playing=False)
        else:
            self.set_step(target)
        return True

    def _on_timer(self, *_: Any) -> None:
        self.poll()
        self.tick()

    def _on_mouse_move(self, *_: Any) -> None:
        iren = self.plotter.iren.interactor
        x, y = iren.GetEventPosition()
        self._mouse = (x, y)
        style = iren.GetInteractorStyle()
        if style is not None and style.GetState() != 0:
            return  # rotating, panning, zooming or dragging a slider: no picking
        now = time.monotonic()
        if now - self._hover_at < HOVER_INTERVAL:
            return
        self._hover_at = now
        self.hover(x, y)

    def _on_left_press(self, *_: Any) -> None:
        iren = self.plotter.iren.interactor
        if iren.GetRepeatCount() >= 1:  # double click: trace the token under the mouse
            x, y = iren.GetEventPosition()
            self._mouse = (x, y)
            self.action_trace_under_mouse()

    def hover(self, x: int, y: int) -> PickInfo:
        """Show the exact values under display position (x, y) in the hover line."""
        info = self.pick(x, y)
        self.last_pick = info
        if self.hover_text.GetInput() != info.text:
            self.hover_text.SetInput(info.text)
            if not self.off_screen:
                self.plotter.render()
            self._dump_state()
        return info

    def pick(self, x: int, y: int) -> PickInfo:
        """What is drawn at display position (x, y) (pixels from the bottom left).

        In background mode it reads nothing: a value not cached yet says so instead."""
        if not self.background:
            return self._pick(x, y)
        with self.source.cache_only():
            try:
                return self._pick(x, y)
            except NotCached:
                return PickInfo("none", text="(not read yet)")

    def _pick(self, x: int, y: int) -> PickInfo:
        import vtk

        iren = self.plotter.iren.interactor
        ren = iren.FindPokedRenderer(x, y)
        picker = vtk.vtkCellPicker()
        picker.SetTolerance(0.004)
        picker.PickFromListOn()
        candidates: list[tuple[Any, str]] = []
        if ren is self.city_renderer:
            candidates = [(self.columns_actor, "column")] + [(a, "arc") for a in
                                                             self.arc_actors]
        elif self.panels:
            for name, r in self.panel_renderers.items():
                if ren is r and self.image_actors[name].GetVisibility():
                    cell = self._image_cell(name, x, y)
                    return PickInfo("none") if cell is None else self._describe(
                        name, self.image_actors[name], cell, (0.0, 0.0, 0.0))
        for actor, _ in candidates:
            if actor.GetVisibility() and actor.GetPickable():
                picker.AddPickList(actor)
        if not candidates or not picker.Pick(x, y, 0, ren):
            return PickInfo("none")
        actor, cell = picker.GetActor(), picker.GetCellId()
        world = picker.GetPickPosition()
        for a, kind in candidates:
            if a is actor and cell >= 0:
                return self._describe(kind, actor, cell, world)
        return PickInfo("none")

    def _image_cell(self, name: str, x: int, y: int) -> int | None:
        """The pixel of a panel's heatmap under display position (x, y), numbered from the
        bottom row as VTK numbers an image's points; None outside it."""
        ren = self.panel_renderers[name]
        ren.SetDisplayPoint(float(x), float(y), 0.0)
        ren.DisplayToWorld()
        wx, wy, _, w = ren.GetWorldPoint()
        image = self.images[name]
        nx, ny, _ = image.GetDimensions()
        sx = image.GetSpacing()[0]
        ox, oy, _ = image.GetOrigin()
        i = int(np.floor((wx / w - ox) / sx + 0.5))
        j = int(np.floor(wy / w - oy + 0.5))
        return j * nx + i if 0 <= i < nx and 0 <= j < ny else None

    def _describe(self, kind: str, actor: Any, cell: int, world: Sequence[float]) -> PickInfo:
        fr = self.frame
        assert fr is not None
        c = fr.city
        src = self.source
        if kind == "column":
            floors, first, span = self._boxes
            box = cell // 6
            f = int(floors[box])
            covered = max(1, min(int(span[box]), c.n_cols - int(first[box])))
            slot = int(np.clip(round(world[0] / self.layout.spacing), first[box],
                               first[box] + covered - 1))
            pos = c.start + slot
            parts = [f"token {pos} {src.token_text(pos)!r}", f"L{src.floors[f]}"]
            for m in src.metrics:
                v = float(src.metric(m, pos, pos + 1)[0, f])
                parts.append(f"{METRIC_TITLES[m]} {v:.4g}")
            value = float(c.values[f, slot])
            return PickInfo("column", position=pos, floor=f, value=value,
                            text="   ".join(parts))
        if kind == "arc":
            b = self.arc_actors.index(actor)
            if not len(self._arc_index[b]):
                return PickInfo("none")
            # lines past the ones shown are collapsed onto the first line's first point
            i = int(self._arc_index[b][cell if cell < len(self._arc_index[b]) else 0])
            a = c.arcs
            q, k, f, w = int(a.query[i]), int(a.key[i]), int(a.floor[i]), float(a.weight[i])
            return PickInfo("arc", position=q, floor=f, key=k, value=w, text=(
                f"L{src.floors[f]} {head_label(c.heads)}: query {q} {src.token_text(q)!r} "
                f"attends to key {k} {src.token_text(k)!r} with weight {w:.4f}"))
        from vtkmodules.util.numpy_support import vtk_to_numpy

        image = self.images[kind]
        nx, ny, _ = image.GetDimensions()
        col, row_from_bottom = cell % nx, cell // nx
        row = ny - 1 - row_from_bottom
        value = float(vtk_to_numpy(image.GetPointData().GetScalars())[cell])
        if kind == "layer" and fr.layer is not None:
            p = fr.layer
            pos = p.positions.start + row
            return PickInfo("layer", position=pos, floor=p.floor, key=int(p.dims[col]),
                            value=value, text=(
                                f"L{src.floors[p.floor]} {p.array} of token {pos} "
                                f"{src.token_text(pos)!r}, dim {int(p.dims[col])}: "
                                f"{value:.4g}"))
        if kind == "attention" and fr.attention is not None:
            p = fr.attention
            q = p.queries.start + row
            off = 1 if p.earlier is not None else 0
            if col < off:
                return PickInfo("attention", position=q, floor=p.floor, value=value, text=(
                    f"query {q} {src.token_text(q)!r}: weight {value:.4f} on keys before "
                    f"{p.keys.start}"))
            k = p.keys.start + col - off
            return PickInfo("attention", position=q, floor=p.floor, key=k, value=value, text=(
                f"L{src.floors[p.floor]} {head_label(p.heads)}: query {q} "
                f"{src.token_text(q)!r} -> key {k} {src.token_text(k)!r}: {value:.4f}"))
        if kind == "token" and fr.token is not None and fr.token.dims is not None:
            p = fr.token
            point_row = len(p.point_labels) - 1 - row  # rows are drawn bottom-up
            return PickInfo("token", position=p.position, value=value, key=int(p.dims[col]),
                            text=(f"token {p.position} {p.text!r} "
                                  f"{p.point_labels[point_row]} "
                                  f"dim {int(p.dims[col])}: {value:.4g}"))
        return PickInfo("none")

    # -- actions (one per key; see state.KEYMAP) --------------------------------------------
    def action_toggle_play(self) -> None:
        self.set_playing(not self.state.playing)

    def action_step_forward(self) -> None:
        self.set_step(min(self.source.n_steps - 1, self.state.step + 1))

    def action_step_back(self) -> None:
        self.set_step(max(0, self.state.step - 1))

    def action_first_step(self) -> None:
        self.set_step(0)

    def action_last_step(self) -> None:
        self.set_step(self.source.n_steps - 1)

    def action_faster(self) -> None:
        self.set_state(speed=next_speed(self.state.speed, +1))

    def action_slower(self) -> None:
        self.set_state(speed=next_speed(self.state.speed, -1))

    def action_focus_up(self) -> None:
        f = self.state.focus
        self.set_state(focus=0 if f is None else min(self.source.n_floors - 1, f + 1))

    def action_focus_down(self) -> None:
        f = self.state.focus
        self.set_state(focus=self.source.n_floors - 1 if f is None else max(0, f - 1))

    def action_focus_under_mouse(self) -> None:
        info = self.pick(*self._mouse)
        if info.floor is None:
            return
        self.set_state(focus=None if info.floor == self.state.focus else info.floor)

    def action_trace_under_mouse(self) -> None:
        info = self.pick(*self._mouse)
        if info.position is not None:
            self.trace(info.position)

    def trace(self, position: int | None) -> None:
        """Follow ``position`` through every floor and in the linked views (None: stop)."""
        self.set_state(traced=position)

    def action_next_head(self) -> None:
        self.set_state(heads=cycle_heads(self.state.heads, self.source.n_heads, +1))

    def action_prev_head(self) -> None:
        self.set_state(heads=cycle_heads(self.state.heads, self.source.n_heads, -1))

    def action_next_metric(self) -> None:
        options = tuple(m for m in METRIC_ORDER if m in self.source.metrics) or METRIC_ORDER
        self.set_state(metric=cycle(options, self.state.metric))

    def action_more_arcs(self) -> None:
        self.set_state(top_k=self.state.top_k + 1)

    def action_fewer_arcs(self) -> None:
        self.set_state(top_k=max(0, self.state.top_k - 1))

    def action_raise_threshold(self) -> None:
        self.set_state(threshold=round(min(1.0, self.state.threshold + 0.05), 2))

    def action_lower_threshold(self) -> None:
        self.set_state(threshold=round(max(0.0, self.state.threshold - 0.05), 2))

    def action_toggle_arcs(self) -> None:
        self.set_state(show_arcs=not self.state.show_arcs)

    def action_toggle_columns(self) -> None:
        self.set_state(show_columns=not self.state.show_columns)

    def action_toggle_links(self) -> None:
        self.set_state(show_links=not self.state.show_links)

    def action_toggle_labels(self) -> None:
        self.set_state(show_labels=not self.state.show_labels)

    def _view(self, name: str) -> None:
        self.state.view = name
        self._apply_camera(force=True)
        self.update()

    def action_view_front(self) -> None:
        self._view("front")

    def action_view_side(self) -> None:
        self._view("side")

    def action_view_top(self) -> None:
        self._view("top")

    def action_view_iso(self) -> None:
        self._view("iso")

    def action_clear(self) -> None:
        self.set_state(focus=None, traced=None)

    def action_retry(self) -> None:
        """Ask again for the step on screen (after a read failed)."""
        self.update()

    def action_toggle_help(self) -> None:
        self.set_state(help=not self.state.help)

    def action_quit(self) -> None:
        self.set_state(playing=False)
        self._dump_state(quit=True)
        if not self.off_screen:
            self.plotter.iren.interactor.TerminateApp()

    def action_save_screenshot(self) -> str:
        """Write the window as ``tracekit-view-step<N>.png`` in the current folder (a new
        name if it exists), say so in the hover line and on stdout; returns the path."""
        import imageio.v3 as iio

        base = f"tracekit-view-step{self.state.step}"
        path, n = f"{base}.png", 1
        while os.path.exists(path):
            path, n = f"{base}-{n}.png", n + 1
        iio.imwrite(path, self.screenshot())
        print(f"wrote {path}", flush=True)
        self.last_pick = PickInfo("none", text=f"saved {path}")
        self.hover_text.SetInput(self.last_pick.text)
        if not self.off_screen:
            self.plotter.render()
        self._dump_state(screenshot=path)
        return path

    def press(self, keysym: str) -> None:
        """Deliver a key press exactly as the window would (for scripts and tests)."""
        iren = self.plotter.iren.interactor
        iren.SetKeySym(keysym)
        iren.SetKeyCode(keysym if len(keysym) == 1 else "\0")
        iren.InvokeEvent("KeyPressEvent")

    def scene_size(self) -> tuple[int, int, int]:
        """(boxes, line points, lines) drawn by the last frame in the city (arcs and
        residual links; room kept for more lines is not counted)."""
        lines = [*self._arc_lines, self._link_lines]
        return (self.columns.GetNumberOfCells() // 6,
                sum(p.count * p.length for p in lines), sum(p.count for p in lines))

    # -- output -----------------------------------------------------------------------------
    def screenshot(self) -> np.ndarray:
        """The current window as an RGB array [height, width, 3]."""
        self.plotter.render()
        return np.asarray(self.plotter.screenshot(return_img=True))

    def show(self) -> None:
        """Open the window and run the event loop until it is closed."""
        self.plotter.iren.initialize()
        self._timer_id = self.plotter.iren.interactor.CreateRepeatingTimer(30)
        try:
            self.plotter.show(title=f"tracekit view: {self.source.trace.location}")
        finally:
            self.close()

    def close(self) -> None:
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None:
            fetcher.close()
        src = getattr(self, "source", None)
        if src is not None:
            src.close()
        plotter = getattr(self, "plotter", None)
        if plotter is not None:
            plotter.close()

    def __enter__(self) -> CityViewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_viewer(path: str | os.PathLike[str], **state: Any) -> CityViewer:
    """Open the interactive viewer on ``path`` with initial state fields (step, focus...)."""
    viewer = CityViewer(path, state=ViewState(**state) if state else None)
    viewer.show()
    return viewer


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - thin wrapper
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m tracekit_viewer.app TRACE")
    open_viewer(args[0])

