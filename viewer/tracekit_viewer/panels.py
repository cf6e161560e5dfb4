"""The three linked views beside the city: the focused layer's heatmap, its attention
pattern and one token's states (the seed's 2x2 layout: layer view top right, attention
bottom left, token states bottom right).

:class:`PanelViews` is a part of :class:`tracekit_viewer.app.CityViewer`, kept in its own
module: it builds the panels' actors once and copies each frame's panel data into them. It
uses the viewer's plotter, source, current frame and its small building helpers
(``_fs``, ``_text``, ``_add_rgba_mesh``, ``_empty_lines``, ``_make_scalar_bar``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .frame import AttentionPanel, LayerPanel, TokenPanel
from .hud import short_text
from .meshes import Labels, image_actor, lut, replace_mesh
from .scene import CURRENT_RGB, TRACED_RGB, label_slots
from .state import head_label

__all__ = ["ATTN_CMAP", "PANEL_BACKGROUND", "PanelViews", "SIGNED_CMAP"]

PANEL_BACKGROUND = (0.10, 0.11, 0.13)
SIGNED_CMAP, ATTN_CMAP = "RdBu_r", "magma"


class PanelViews:
    """Building and updating the layer, attention and token views (a part of CityViewer)."""

    plotter: Any
    source: Any
    frame: Any
    _panel_keys: dict[str, tuple]

    def _build_panels(self) -> None:
        pv = self._pv
        self.panel_renderers: dict[str, Any] = {}
        self.images: dict[str, Any] = {}
        self.image_actors: dict[str, Any] = {}
        self.outlines: dict[str, Any] = {}
        self.panel_titles: dict[str, Any] = {}
        self.panel_labels: dict[str, tuple[Labels, Labels]] = {}
        specs = (("layer", (0, 1), SIGNED_CMAP), ("attention", (1, 0), ATTN_CMAP),
                 ("token", (1, 1), SIGNED_CMAP))
        for name, (r, c), cmap in specs:
            self.plotter.subplot(r, c)
            ren = self.plotter.renderer
            ren.set_background(PANEL_BACKGROUND)
            self.panel_renderers[name] = ren
            # A heatmap is an image drawn as one texture (one quad), not a mesh of cells:
            # updating it re-colours a few thousand pixels, nothing is re-tessellated.
            image, actor = image_actor(ren, lut(cmap))
            self.images[name] = image
            self.image_actors[name] = actor
            outline = self._empty_lines()
            oa = self._add_rgba_mesh(outline, name=f"{name}-outline", line_width=2.0,
                                     lighting=False)
            oa.SetPickable(False)
            self.outlines[name] = outline
            self.panel_titles[name] = self._text(ren, (0.02, 0.98), size=self._fs(13))
            rows = Labels(ren, size=self._fs(10), justify="right")
            cols = Labels(ren, size=self._fs(10), justify="right", orientation=60.0)
            self.panel_labels[name] = (rows, cols)
            ren.camera.parallel_projection = True
        self.plotter.subplot(1, 1)
        self.bars = pv.PolyData(np.zeros((4, 3)), faces=np.array([4, 0, 1, 2, 3]))
        self.bars.cell_data["rgba"] = np.zeros((1, 4), np.uint8)
        self.bars_actor = self._add_rgba_mesh(self.bars, name="bars", lighting=False)
        self.bars_actor.SetPickable(False)
        self.token_notes = Labels(self.panel_renderers["token"], size=self._fs(9), justify="left")
        self.panel_bars = {
            "layer": self._make_scalar_bar(self.panel_renderers["layer"], lut(SIGNED_CMAP),
                                           position=(0.89, 0.2)),
            "attention": self._make_scalar_bar(self.panel_renderers["attention"],
                                               lut(ATTN_CMAP), position=(0.89, 0.2)),
        }
        for bar in self.panel_bars.values():
            bar.SetWidth(0.1)
            bar.SetBarRatio(0.3)
        self.plotter.subplot(0, 0)

    # -- panels -----------------------------------------------------------------------------
    def _panel_aspect(self, name: str) -> float:
        """Width / height of a panel's viewport in pixels."""
        vx0, vy0, vx1, vy1 = self.panel_renderers[name].GetViewport()
        w, h = self.plotter.window_size
        return max(1e-6, (vx1 - vx0) * w) / max(1e-6, (vy1 - vy0) * h)

    def _set_image(self, name: str, matrix: np.ndarray, clim: tuple[float, float],
                   spacing: float = 1.0) -> None:
        """Show ``matrix`` (row 0 at the top) as the panel's image; cells are ``spacing``
        wide and 1 high."""
        from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

        image = self.images[name]
        ny, nx = matrix.shape if matrix.size else (1, 1)
        data = (matrix if matrix.size else np.full((1, 1), np.nan))[::-1].astype(np.float32)
        # pixel (i, j) is centred on the cell [i, i + 1] x spacing, [j - ny, j - ny + 1]
        if image.GetDimensions() != (nx, ny, 1):
            image.SetDimensions(nx, ny, 1)
        image.SetSpacing(spacing, 1.0, 1.0)
        image.SetOrigin(0.5 * spacing, 0.5 - ny, 0.0)
        old = image.GetPointData().GetScalars()
        if old is not None and old.GetNumberOfTuples() == data.size:
            vtk_to_numpy(old)[:] = data.ravel()
            old.Modified()
        else:
            arr = numpy_to_vtk(np.ascontiguousarray(data.ravel()), deep=True)
            arr.SetName("value")
            image.GetPointData().SetScalars(arr)
        image.Modified()
        self.image_actors[name].GetProperty().GetLookupTable().SetRange(*clim)

    def _set_outline(self, name: str, boxes: list[tuple[float, float, float, float, tuple]]
                     ) -> None:
        """Rectangles (x0, y0, x1, y1, rgb) drawn over a panel."""
        if not boxes:
            replace_mesh(self.outlines[name], np.zeros((2, 3)), lines=np.array([2, 0, 1]),
                     rgba=np.zeros((1, 4), np.uint8))
            return
        pts, lines, rgba = [], [], []
        for i, (x0, y0, x1, y1, rgb) in enumerate(boxes):
            pts += [[x0, y0, 0.01], [x1, y0, 0.01], [x1, y1, 0.01], [x0, y1, 0.01]]
            lines += [5, 4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i]
            rgba.append((*rgb, 255))
        replace_mesh(self.outlines[name], np.array(pts, float), lines=np.array(lines),
                 rgba=np.array(rgba, np.uint8))

    def _fit_panel(self, name: str, x0: float, x1: float, y0: float, y1: float) -> None:
        """Frame the content box in the panel's camera (only when the box changes)."""
        key = (round(x0, 3), round(x1, 3), round(y0, 3), round(y1, 3))
        if self._panel_keys.get(name) == key:
            return
        self._panel_keys[name] = key
        ren = self.panel_renderers[name]
        cam = ren.GetActiveCamera()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        cam.SetFocalPoint(cx, cy, 0.0)
        cam.SetPosition(cx, cy, 100.0)
        cam.SetViewUp(0.0, 1.0, 0.0)
        cam.ParallelProjectionOn()
        aspect = self._panel_aspect(name)
        cam.SetParallelScale(max((y1 - y0) / 2, (x1 - x0) / 2 / aspect) * 1.02)
        ren.ResetCameraClippingRange()
        ren.camera.is_set = True  # keep pyvista from resetting it on the first render

    def _margins(self, name: str, rows: int, chars: int = 10) -> tuple[float, float]:
        """Rows of space to leave under a panel's ``rows`` rows for its slanted column
        labels of up to ``chars`` characters, and above them for its title, so that neither
        is cut off or overlaps the matrix."""
        _, vy0, _, vy1 = self.panel_renderers[name].GetViewport()
        height = (vy1 - vy0) * self.plotter.window_size[1]
        below = 0.55 * self._fs(10) * chars * 0.87 + 4  # pixels: text slanted at 60 degrees
        above = 1.9 * self._fs(13)
        if height <= 2 * (below + above):
            return 5.0, 2.5
        # m rows of margin take m / (rows + all margins) of the height
        per_row = (height - below - above) / rows
        return max(4.0, below / per_row), max(1.5, above / per_row)

    def _axis_labels(self, name: str, n: int, axis: int) -> np.ndarray:
        """Which of ``n`` rows (axis 1) or columns (axis 0) of a panel get a label: as many
        as fit without overlapping."""
        vp = self.panel_renderers[name].GetViewport()
        px = (vp[2 + axis] - vp[axis]) * self.plotter.window_size[axis]
        # text is the dearest thing to draw on a software renderer: one label per ~2 lines
        return label_slots(n, max(2, int(0.6 * px / (self._fs(10) * 2.4))), [])

    def _update_layer(self, p: LayerPanel | None) -> None:
        rows_l, cols_l = self.panel_labels["layer"]
        title = self.panel_titles["layer"]
        if p is None:
            self._set_image("layer", np.zeros((0, 0)), (-1, 1))
            title.SetInput("layer view: the trace has no full vectors")
            rows_l.set(np.zeros((0, 3)), [])
            cols_l.set(np.zeros((0, 3)), [])
            return
        layer = self.source.floors[p.floor]
        title.SetInput(f"layer view   L{layer} {p.array}   positions {p.positions.start}-"
                       f"{p.positions.stop - 1} x {len(p.dims)} most active dims")
        self._set_image("layer", p.matrix, (-p.scale, p.scale))
        self.panel_bars["layer"].GetLookupTable().SetRange(-p.scale, p.scale)
        n = len(p.positions)
        slots = self._axis_labels("layer", n, 1)
        rows_l.set(np.column_stack([np.full(len(slots), -0.3), -(slots + 0.5),
                                    np.zeros(len(slots))]),
                   [f"{p.positions.start + s} {short_text(p.texts[s], 8)}" for s in slots])
        cslots = self._axis_labels("layer", len(p.dims), 0)
        cols_l.set(np.column_stack([cslots + 0.5, np.full(len(cslots), -n - 0.3),
                                    np.zeros(len(cslots))]),
                   [f"d{int(p.dims[s])}" for s in cslots])
        c = self.frame.city if self.frame else None
        boxes = []
        if c is not None:
            for pos in c.current[-1:]:
                if pos in p.positions:
                    i = pos - p.positions.start
                    boxes.append((0, -i - 1, len(p.dims), -i, CURRENT_RGB))
            if c.traced is not None and c.traced in p.positions:
                i = c.traced - p.positions.start
                boxes.append((0, -i - 1, len(p.dims), -i, TRACED_RGB))
        self._set_outline("layer", boxes)
        below, above = self._margins("layer", n, 5)
        self._fit_panel("layer", -7.0, len(p.dims) + 6.0, -n - below, above)

    def _update_attention(self, p: AttentionPanel | None) -> None:
        rows_l, cols_l = self.panel_labels["attention"]
        title = self.panel_titles["attention"]
        if p is None:
            self._set_image("attention", np.zeros((0, 0)), (0, 1))
            title.SetInput("attention: not captured in this trace")
            rows_l.set(np.zeros((0, 3)), [])
            cols_l.set(np.zeros((0, 3)), [])
            self._set_outline("attention", [])
            return
        layer = self.source.floors[p.floor]
        m = p.matrix
        off = 0
        if p.earlier is not None:
            m = np.concatenate([p.earlier[:, None], m], axis=1)
            off = 1
        src = "" if p.exact else "  (from top-k summary)"
        title.SetInput(f"attention   L{layer}   {head_label(p.heads)}   query (rows) x key "
                       f"(columns){src}")
        self._set_image("attention", m, (0.0, 1.0))
        self.panel_bars["attention"].GetLookupTable().SetRange(0.0, 1.0)
        nq, nk = m.shape
        slots = self._axis_labels("attention", nq, 1)
        rows_l.set(np.column_stack([np.full(len(slots), -0.3), -(slots + 0.5),
                                    np.zeros(len(slots))]),
                   [f"{p.queries.start + s} {short_text(p.texts[s], 8)}" for s in slots])
        kslots = self._axis_labels("attention", len(p.keys), 0)
        ctexts = [f"{p.keys.start + s} {short_text(p.texts[s], 6)}" for s in kslots]
        cx = kslots + off + 0.5
        if off:  # the "earlier" column's label takes the place of the first key's
            keep = kslots > 0
            cx = np.concatenate([[0.5], cx[keep]])
            ctexts = ["earlier"] + [t for t, k in zip(ctexts, keep, strict=True) if k]
        cols_l.set(np.column_stack([cx, np.full(len(cx), -nq - 0.3), np.zeros(len(cx))]),
                   ctexts)
        boxes = []
        for pos in p.current[-1:]:
            if pos in p.queries:
                i = pos - p.queries.start
                boxes.append((0, -i - 1, nk, -i, CURRENT_RGB))
        if p.traced is not None and p.traced in p.queries:
            i = p.traced - p.queries.start
            boxes.append((0, -i - 1, nk, -i, TRACED_RGB))  # the attention it gives
            boxes.append((i + off, -nq, i + off + 1, 0, TRACED_RGB))  # ... and receives
        self._set_outline("attention", boxes)
        below, above = self._margins("attention", nq)
        self._fit_panel("attention", -7.0, nk + 6.0, -nq - below, above)

    def _update_token(self, p: TokenPanel | None) -> None:
        rows_l, cols_l = self.panel_labels["token"]
        title = self.panel_titles["token"]
        if p is None:
            return
        how = "traced token" if p.traced else "current token"
        pred = ""
        if p.predictions:
            pred = "   next: " + ", ".join(f"{t} {pr:.0%}" for t, pr in p.predictions[:3])
        title.SetInput(f"token states   {how} {p.position} {short_text(p.text, 16)!r}{pred}")
        n_pts = len(p.point_labels)
        nd = 0 if p.matrix is None else p.matrix.shape[1]
        # Lay the panel out in its own aspect ratio: labels | heatmap | bars | notes.
        height = n_pts + 3.0
        width = self._panel_aspect("token") * height
        hx = 0.30 * width  # heatmap width
        if p.matrix is not None:
            # rows bottom-up like the floors: the embedding at the bottom
            self._set_image("token", p.matrix[::-1], (-p.scale, p.scale),
                            spacing=hx / max(1, nd))
        else:
            self._set_image("token", np.zeros((0, 0)), (-1, 1))
        # as many rows labelled (and annotated) as fit, the top (last) point always
        vx0, vy0, vx1, vy1 = self.panel_renderers["token"].GetViewport()
        pitch = (vy1 - vy0) * self.plotter.window_size[1] / height
        two_lines = pitch >= 2.6 * self._fs(9)
        shown = set(label_slots(n_pts, max(2, int(n_pts * pitch / (self._fs(9) * 1.5))),
                                [n_pts - 1]).tolist())
        # the notes start at 0.48 of the panel's width: cut them to what is left
        note_px = 0.5 * (vx1 - vx0) * self.plotter.window_size[0]
        note_chars = max(8, int(note_px / (0.6 * self._fs(9))))
        rows = np.array(sorted(shown), dtype=np.int64)
        rows_l.set(np.column_stack([np.full(len(rows), -0.3), -(n_pts - rows - 0.5),
                                    np.zeros(len(rows))]), [p.point_labels[i] for i in rows])
        cols_l.set(np.zeros((0, 3)), [])
        # bars: residual norm (grey), what attention (blue) and the MLP (orange) added
        bx = hx + 0.02 * width
        blen = 0.14 * width
        quads, colours = [], []

        def bar(row: int, value: float, vmax: float, lane: int, rgb: tuple) -> None:
            if value is None or not np.isfinite(value) or vmax <= 0:
                return
            y_top = -(n_pts - 1 - row)
            y0 = y_top - 1 + 0.08 + lane * 0.3
            x1 = bx + blen * min(1.0, value / vmax)
            quads.append([[bx, y0, 0], [x1, y0, 0], [x1, y0 + 0.26, 0], [bx, y0 + 0.26, 0]])
            colours.append((*rgb, 255))

        vr = {m: self.source.value_range(m)[1] for m in self.source.metrics}
        notes, note_xyz = [], []
        for i, point in enumerate(self.source.points):
            if p.residual_norm is not None:
                bar(i, float(p.residual_norm[i]), vr.get("residual", 0.0), 2, (180, 180, 180))
            if point - 1 in self.source.floors:
                f = self.source.floors.index(point - 1)
                if p.attn_norm is not None:
                    bar(i, float(p.attn_norm[f]), vr.get("attn_out", 0.0), 1, (80, 150, 255))
                if p.mlp_norm is not None:
                    bar(i, float(p.mlp_norm[f]), vr.get("mlp_out", 0.0), 0, (255, 150, 60))
            if i not in shown:
                continue
            parts = []
            if p.residual_norm is not None:
                parts.append(f"|r| {p.residual_norm[i]:.3g}  mean {p.ln_mean[i]:+.2g} "
                             f"std {p.ln_std[i]:.3g}")
            if p.lens:
                parts.append("lens " + " ".join(f"{t} {pr:.0%}" for t, pr in p.lens[i]))
            lines = parts if two_lines else ["  ".join(parts)]
            notes.append("\n".join(short_text(line, note_chars) for line in lines))
            note_xyz.append([bx + blen + 0.02 * width, -(n_pts - 1 - i) - 0.5, 0.0])
        if quads:
            q = np.array(quads, float).reshape(-1, 3)
            faces = np.column_stack([np.full(len(quads), 4),
                                     4 * np.arange(len(quads))[:, None] + np.arange(4)])
            replace_mesh(self.bars, q, faces=faces.reshape(-1), rgba=np.array(colours, np.uint8))
        self.bars_actor.SetVisibility(bool(quads))
        self.token_notes.set(np.array(note_xyz).reshape(-1, 3), notes)
        self._set_outline("token", [])
        self._fit_panel("token", -0.14 * width, 0.86 * width, -n_pts - 1.0, 2.0)
