"""VTK data updated in place: meshes, polylines, heatmap images and text labels.

The viewer creates every actor once and, frame after frame, copies new numbers into the
arrays VTK already holds (points, colours, cells), rebuilding a structure only when its size
changes: on a software renderer that is what keeps a frame cheap. Nothing here knows about
traces or frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .scene import arc_lines

__all__ = ["TEXT_RGB", "Labels", "Polylines", "box_edges", "image_actor", "justify_text", "lut",
           "pyramid_faces", "replace_mesh", "write_mesh"]

_VTK_FLOAT = 10  # vtkType.h: VTK_FLOAT
TEXT_RGB = (0.92, 0.92, 0.92)


def lut(name: str, n: int = 256) -> np.ndarray:
    import matplotlib

    return np.asarray(matplotlib.colormaps[name](np.linspace(0, 1, n))[:, :3], np.float64)


class Labels:
    """Text labels at world positions of one renderer, updated in place.

    A pool of text actors sharing one text property: an actor re-rasterizes its text only
    when the text changes (moving it is free), which costs a software renderer a fraction of
    what a labeled-data mapper rebuilding every label each frame does.
    """

    def __init__(self, renderer: Any, size: int = 11, rgb: Sequence[float] = TEXT_RGB,
                 justify: str = "center", bold: bool = False, orientation: float = 0.0,
                 vertical: str = "center") -> None:
        import vtk

        self._vtk = vtk
        self.renderer = renderer
        self.prop = vtk.vtkTextProperty()
        self.prop.SetFontSize(size)
        self.prop.SetColor(*rgb)
        self.prop.SetBold(bold)
        self.prop.SetItalic(False)
        self.prop.SetShadow(False)
        self.prop.SetOrientation(orientation)
        justify_text(self.prop, justify, vertical)
        self.actors: list[Any] = []
        self.count = 0
        self.shown = True

    def set(self, xyz: np.ndarray, texts: Sequence[str]) -> None:
        xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
        while len(self.actors) < len(texts):
            actor = self._vtk.vtkTextActor()
            actor.SetTextProperty(self.prop)
            actor.GetPositionCoordinate().SetCoordinateSystemToWorld()
            actor.SetPickable(False)
            self.renderer.AddViewProp(actor)
            self.actors.append(actor)
        self.count = len(texts)
        for i, actor in enumerate(self.actors):
            if i < self.count:
                if actor.GetInput() != texts[i]:
                    actor.SetInput(texts[i])
                actor.GetPositionCoordinate().SetValue(*xyz[i])
            actor.SetVisibility(self.shown and i < self.count)

    def visible(self, on: bool) -> None:
        self.shown = bool(on)
        for i, actor in enumerate(self.actors):
            actor.SetVisibility(self.shown and i < self.count)


def _set_points(mesh: Any, points: np.ndarray) -> None:
    """Give a mesh these points: copied into its point array when the count is the same."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    pts = np.asarray(points, np.float32).reshape(-1, 3)
    old = mesh.GetPoints()
    if (old is not None and old.GetNumberOfPoints() == len(pts)
            and old.GetDataType() == _VTK_FLOAT):
        vtk_to_numpy(old.GetData())[:] = pts
        old.Modified()
    else:
        import vtk

        new = vtk.vtkPoints()
        new.SetData(numpy_to_vtk(np.ascontiguousarray(pts), deep=True))
        mesh.SetPoints(new)


def _set_cells(mesh: Any, *, faces: np.ndarray | None = None,
               lines: np.ndarray | None = None) -> None:
    """Give a mesh new polygons or lines (VTK's flat [n, i0, ..., n, ...] layout)."""
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtkIdTypeArray

    for cells, setter in ((faces, mesh.SetPolys), (lines, mesh.SetLines)):
        if cells is not None:
            arr = vtk.vtkCellArray()
            arr.ImportLegacyFormat(numpy_to_vtkIdTypeArray(
                np.ascontiguousarray(cells, dtype=np.int64), deep=True))
            setter(arr)


def _set_colours(mesh: Any, rgba: np.ndarray, *, point: bool = False) -> None:
    """Set the mesh's ``rgba`` colours per point or per cell, in place when the size holds."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    data = mesh.GetPointData() if point else mesh.GetCellData()
    rgba = np.asarray(rgba, np.uint8).reshape(-1, 4)
    arr = data.GetArray("rgba")
    if arr is not None and arr.GetNumberOfTuples() == len(rgba):
        vtk_to_numpy(arr)[:] = rgba
        arr.Modified()
    else:
        new = numpy_to_vtk(np.ascontiguousarray(rgba), deep=True)
        new.SetName("rgba")
        data.AddArray(new)
        data.SetActiveScalars("rgba")


def write_mesh(mesh: Any, points: np.ndarray, rgba: np.ndarray, *, point: bool = False) -> None:
    """Copy new point positions and colours into a mesh's existing arrays."""
    _set_points(mesh, points)
    _set_colours(mesh, rgba, point=point)
    mesh.Modified()


def replace_mesh(mesh: Any, points: np.ndarray, *, faces: np.ndarray | None = None,
             lines: np.ndarray | None = None, rgba: np.ndarray | None = None,
             point: bool = False) -> None:
    """Give a mesh new points and cells (its actor and mapper stay the same)."""
    _set_points(mesh, points)
    _set_cells(mesh, faces=faces, lines=lines)
    if rgba is not None:
        _set_colours(mesh, rgba, point=point)
    mesh.Modified()


class Polylines:
    """Polylines of ``length`` points each, one colour per line, in one mesh whose cells are
    rebuilt only when it needs room for more lines than ever before: the lines past the ones
    shown collapse onto the first point, transparent, so a frame copies only points and
    colours (per point: no cell-to-colour map to rebuild)."""

    def __init__(self, mesh: Any, length: int) -> None:
        self.mesh = mesh
        self.length = length
        self.capacity = 0
        self.count = 0

    def set(self, points: np.ndarray, rgba: np.ndarray) -> None:
        """``points`` [n, length, 3], ``rgba`` [n, 4]."""
        from vtkmodules.util.numpy_support import vtk_to_numpy

        n, k = len(points), self.length
        if n > self.capacity or self.capacity == 0:
            self.capacity = max(16, 1 << max(0, n - 1).bit_length())
            cap = self.capacity
            replace_mesh(self.mesh, np.zeros((cap * k, 3)), lines=arc_lines(cap, k),
                     rgba=np.zeros((cap * k, 4), np.uint8), point=True)
        cap = self.capacity
        pts = vtk_to_numpy(self.mesh.GetPoints().GetData()).reshape(cap, k, 3)
        pts[:n] = points
        pts[n:] = points[0, 0] if n else 0.0
        self.mesh.GetPoints().Modified()
        arr = self.mesh.GetPointData().GetArray("rgba")
        colours = vtk_to_numpy(arr).reshape(cap, k, 4)
        colours[:n] = np.asarray(rgba, np.uint8)[:, None, :]
        colours[n:] = 0
        arr.Modified()
        self.mesh.Modified()
        self.count = n


def image_actor(renderer: Any, lut_rgb: np.ndarray) -> tuple[Any, Any]:
    """An empty one-value-per-pixel image, drawn through a colour table by an image actor
    (nearest-pixel, NaN grey)."""
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(1, 1, 1)
    arr = vtk.vtkFloatArray()
    arr.SetName("value")
    arr.InsertNextValue(0.0)
    image.GetPointData().SetScalars(arr)
    lut = vtk.vtkLookupTable()
    lut.SetNumberOfTableValues(len(lut_rgb))
    for i, (r, g, b) in enumerate(lut_rgb):
        lut.SetTableValue(i, r, g, b, 1.0)
    lut.SetNanColor(0.25, 0.25, 0.28, 1.0)
    lut.SetRange(-1.0, 1.0)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    actor.GetMapper().BorderOn()  # whole pixels at the edges, not half ones
    prop = actor.GetProperty()
    prop.SetLookupTable(lut)
    prop.UseLookupTableScalarRangeOn()
    prop.SetInterpolationTypeToNearest()
    actor.SetPickable(False)
    renderer.AddActor(actor)
    return image, actor


def justify_text(prop: Any, horizontal: str, vertical: str) -> None:
    """Set a vtkTextProperty's justification from words (left/center/right, top/center/...)."""
    getattr(prop, {"left": "SetJustificationToLeft", "center": "SetJustificationToCentered",
                   "right": "SetJustificationToRight"}[horizontal])()
    getattr(prop, {"top": "SetVerticalJustificationToTop",
                   "center": "SetVerticalJustificationToCentered",
                   "bottom": "SetVerticalJustificationToBottom"}[vertical])()


def box_edges() -> np.ndarray:
    """The 12 edges of a box with corners ordered bottom (0-3) then top (4-7)."""
    edges = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5),
             (2, 6), (3, 7)]
    return np.array([[2, a, b] for a, b in edges], np.int64).reshape(-1)


def pyramid_faces(n: int) -> np.ndarray:
    """Faces of ``n`` downward pyramids of 5 points each (4 base corners, then the apex)."""
    out = []
    for i in range(n):
        b = 5 * i
        out += [4, b, b + 1, b + 2, b + 3]
        for j in range(4):
            out += [3, b + j, b + (j + 1) % 4, b + 4]
    return np.array(out, np.int64)
