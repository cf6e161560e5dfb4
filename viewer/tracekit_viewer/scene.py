"""Step -> scene: the geometry and colours of the neural city, as pure numpy functions.

Nothing here touches VTK or a trace. The data layer (:mod:`tracekit_viewer.frame`) turns a
trace and a view state into plain arrays; these functions turn those arrays into box corners,
RGBA colours, arc polylines and label positions; :mod:`tracekit_viewer.app` copies the result
into VTK arrays that already exist. Every function is deterministic and tested numerically.

Coordinates: x runs along the sequence (one column per visible position, ``layout.spacing``
apart), z is up (floor ``f`` sits at ``f * layout.floor_gap``), y is depth (arcs bulge towards
-y, in front of the columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ArcSet",
    "CityLayout",
    "arc_lines",
    "arc_points",
    "arc_style",
    "box_faces",
    "box_points",
    "camera_preset",
    "colour_values",
    "column_heights",
    "combine_heads",
    "floor_boxes",
    "fit_layout",
    "floor_z",
    "label_slots",
    "layernorm_stats",
    "link_segments",
    "lod_groups",
    "select_arcs",
    "sparse_rows_to_dense",
    "top_dims",
    "visible_window",
]

# Arc kinds: what an arc is drawn as.
ARC_NORMAL, ARC_CURRENT, ARC_TRACED = 0, 1, 2
CURRENT_RGB = (255, 140, 0)  # the current token: orange
TRACED_RGB = (0, 220, 255)  # the traced token: cyan
WIDTH_BINS = 4  # arcs are drawn in this many line widths


@dataclass(frozen=True)
class CityLayout:
    """Sizes of the city and the budgets that keep a frame cheap."""

    spacing: float = 1.0
    box_width: float = 0.7
    box_depth: float = 0.7
    floor_gap: float = 3.0
    min_height: float = 0.05
    max_height: float = 2.2
    arc_segments: int = 10
    arc_lift: float = 0.08
    arc_max_peak: float = 2.4
    window: int = 512  # most positions shown at once (the latest ones)
    lod_budget: int = 8192  # most boxes drawn before far floors are merged
    lod_radius: int = 2  # floors this close to the focus always get one box per position
    fade_alpha: float = 0.12  # opacity of floors that are not focused
    max_arcs: int = 1500  # most arcs drawn (the current and traced token's always are)
    max_labels: int = 32
    max_links: int = 64  # columns with residual links drawn (plus current and traced)


# -- layout ---------------------------------------------------------------------------------
def fit_layout(n_cols: int, n_floors: int, base: CityLayout | None = None) -> CityLayout:
    """A layout whose city is about twice as wide as it is tall: floors move apart (and
    columns and arcs grow with them) when there are many positions per floor."""
    from dataclasses import replace

    base = base or CityLayout()
    width = max(1, n_cols) * base.spacing
    gap = max(base.floor_gap, 0.5 * width / max(1, n_floors) * 0.9)
    scale = gap / base.floor_gap
    return replace(base, floor_gap=gap, max_height=base.max_height * scale,
                   min_height=base.min_height * scale, arc_max_peak=base.arc_max_peak * scale)


def visible_window(end: int, window: int) -> tuple[int, int]:
    """Positions ``[start, end)`` shown when ``end`` positions are computed."""
    return max(0, end - window), end


def floor_z(n_floors: int, layout: CityLayout) -> np.ndarray:
    """Height of each floor's base."""
    return np.arange(n_floors, dtype=np.float64) * layout.floor_gap


def lod_groups(n_floors: int, n_cols: int, focus: int | None, layout: CityLayout) -> np.ndarray:
    """Positions merged into one box on each floor (1 = full detail).

    Floors within ``lod_radius`` of the focus (or of the top floor when nothing is focused)
    keep one box per position; when the city would exceed ``lod_budget`` boxes, the other
    floors merge the smallest power-of-two number of neighbouring positions that fits.
    """
    groups = np.ones(n_floors, dtype=np.int64)
    if n_floors * n_cols <= layout.lod_budget or n_cols <= 1:
        return groups
    ref = n_floors - 1 if focus is None else int(focus)
    far = np.abs(np.arange(n_floors) - ref) > layout.lod_radius
    n_near, n_far = int((~far).sum()), int(far.sum())
    g = 1
    while g < n_cols and n_near * n_cols + n_far * -(-n_cols // g) > layout.lod_budget:
        g *= 2
    groups[far] = g
    return groups


def floor_boxes(values: np.ndarray, groups: np.ndarray, capacity: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of every floor: (floor, first slot, slots covered, value), floor by floor.

    ``values`` is [n_floors, n_cols] (NaN where nothing is known); floor ``f`` gets
    ``ceil(capacity / groups[f])`` boxes whatever ``n_cols`` is, so the box count only changes
    when the level of detail does. A merged box shows the largest value it covers (peaks stay
    visible); a box covering no visible column has value NaN (drawn empty).
    """
    n_floors, n_cols = values.shape
    floors, firsts, spans, vals = [], [], [], []
    for f in range(n_floors):
        g = int(groups[f])
        n_boxes = -(-capacity // g)
        padded = np.full(n_boxes * g, np.nan, dtype=np.float64)
        padded[: min(n_cols, capacity)] = values[f, :capacity]
        merged = np.fmax.reduce(padded.reshape(n_boxes, g), axis=1)
        floors.append(np.full(n_boxes, f, dtype=np.int64))
        firsts.append(np.arange(n_boxes, dtype=np.int64) * g)
        spans.append(np.full(n_boxes, g, dtype=np.int64))
        vals.append(merged)
    return (np.concatenate(floors), np.concatenate(firsts), np.concatenate(spans),
            np.concatenate(vals))


# -- values -> heights and colours --------------------------------------------------------
def _unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values scaled to [0, 1] on the fixed range (NaN stays NaN)."""
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        return np.where(np.isnan(values), np.nan, 0.5)
    return np.clip((np.asarray(values, dtype=np.float64) - lo) / span, 0.0, 1.0)


def column_heights(values: np.ndarray, lo: float, hi: float, layout: CityLayout) -> np.ndarray:
    """Box heights: ``min_height`` at ``lo`` to ``max_height`` at ``hi`` (0 where NaN)."""
    u = _unit(values, lo, hi)
    h = layout.min_height + (layout.max_height - layout.min_height) * u
    return np.where(np.isnan(u), 0.0, h)


def colour_values(values: np.ndarray, lo: float, hi: float, lut: np.ndarray,
                  alpha: np.ndarray | float = 1.0) -> np.ndarray:
    """RGBA uint8 of values on a fixed range through ``lut`` ([n, 3] floats in 0..1).

    Entry ``i`` of the lut covers ``[i/n, (i+1)/n)`` of the range (as VTK lookup tables do);
    NaN is fully transparent.
    """
    u = _unit(values, lo, hi)
    n = len(lut)
    idx = np.clip(np.floor(np.nan_to_num(u) * n), 0, n - 1).astype(np.int64)
    rgb = np.round(np.asarray(lut, dtype=np.float64)[idx] * 255.0)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), u.shape)
    out = np.empty((*u.shape, 4), dtype=np.uint8)
    out[..., :3] = rgb.astype(np.uint8)
    out[..., 3] = np.where(np.isnan(u), 0, np.round(np.clip(a, 0, 1) * 255)).astype(np.uint8)
    return out


# -- boxes ----------------------------------------------------------------------------------
#: The six quads of a box whose corners are ordered bottom (0-3) then top (4-7), CCW from -x-y.
_BOX_FACES = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4],
                       [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]], dtype=np.int64)


def box_points(cx: np.ndarray, z0: np.ndarray, width: np.ndarray, depth: float,
               height: np.ndarray) -> np.ndarray:
    """Corners [n * 8, 3] of boxes centred at (cx, 0) standing on z0. A box of zero width
    and height collapses to one point (drawn as nothing)."""
    cx, z0 = np.asarray(cx, np.float64), np.asarray(z0, np.float64)
    hw = np.asarray(width, np.float64) / 2
    hd = np.where(hw > 0, depth / 2, 0.0)
    h = np.asarray(height, np.float64)
    n = len(cx)
    pts = np.empty((n, 8, 3), dtype=np.float64)
    sx = np.array([-1, 1, 1, -1], np.float64)
    sy = np.array([-1, -1, 1, 1], np.float64)
    for level, zz in ((0, z0), (1, z0 + h)):
        pts[:, level * 4:level * 4 + 4, 0] = cx[:, None] + sx[None, :] * hw[:, None]
        pts[:, level * 4:level * 4 + 4, 1] = sy[None, :] * hd[:, None]
        pts[:, level * 4:level * 4 + 4, 2] = zz[:, None]
    return pts.reshape(n * 8, 3)


def box_faces(n_boxes: int) -> np.ndarray:
    """VTK polygon connectivity ([4, a, b, c, d] per quad) of ``n_boxes`` boxes."""
    quads = _BOX_FACES[None, :, :] + 8 * np.arange(n_boxes, dtype=np.int64)[:, None, None]
    cells = np.concatenate([np.full((n_boxes, 6, 1), 4, np.int64), quads], axis=2)
    return cells.reshape(-1)


def box_geometry(values: np.ndarray, groups: np.ndarray, capacity: int, n_cols: int,
                 lo: float, hi: float, layout: CityLayout
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corners, per-box value and per-box floor of the whole city (see :func:`floor_boxes`).

    Boxes covering no visible column collapse to a point.
    """
    floors, first, span, vals = floor_boxes(values, groups, capacity)
    return box_corners(floors, first, span, vals, values.shape[0], n_cols, lo, hi,
                       layout), vals, floors


def box_corners(floors: np.ndarray, first: np.ndarray, span: np.ndarray, vals: np.ndarray,
                n_floors: int, n_cols: int, lo: float, hi: float, layout: CityLayout
                ) -> np.ndarray:
    """Corners of the boxes given by :func:`floor_boxes` (see :func:`box_geometry`)."""
    covered = np.clip(n_cols - first, 0, span)
    width = np.where(covered > 0, (covered - 1) * layout.spacing + layout.box_width, 0.0)
    cx = (first + np.maximum(covered - 1, 0) / 2) * layout.spacing
    h = np.where(covered > 0, column_heights(vals, lo, hi, layout), 0.0)
    z0 = floor_z(n_floors, layout)[floors]
    return box_points(cx, z0, width, layout.box_depth, h)


# -- attention ------------------------------------------------------------------------------
def combine_heads(keys: np.ndarray, weights: np.ndarray, mode: str | int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query top keys over heads: ``keys``/``weights`` are [..., head, rank] (key -1 =
    none); the result is [..., rank], sorted by weight, ties by key.

    ``mode`` is a head index, ``"max"`` (largest weight any head gives a key) or ``"mean"``
    (sum over heads / number of heads). Built from per-head top-k lists, a key outside a
    head's list counts as 0 for that head, so ``"mean"`` is a lower bound when a key is in
    some heads' lists but not all.
    """
    keys = np.asarray(keys)
    weights = np.asarray(weights, dtype=np.float32)
    *lead, H, K = keys.shape
    if isinstance(mode, (int, np.integer)):
        if not 0 <= int(mode) < H:
            raise ValueError(f"head {mode} out of range (0..{H - 1})")
        return keys[..., int(mode), :].copy(), weights[..., int(mode), :].copy()
    if mode not in ("mean", "max"):
        raise ValueError(f"head mode must be 'mean', 'max' or a head index, not {mode!r}")
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    width = H * K
    fk = keys.reshape(rows, width).astype(np.int64)
    fw = weights.reshape(rows, width)
    sentinel = np.iinfo(np.int64).max
    fk = np.where(fk < 0, sentinel, fk)
    fw = np.where(fk == sentinel, 0.0, fw).astype(np.float32)
    order = np.argsort(fk, axis=1, kind="stable")
    sk = np.take_along_axis(fk, order, axis=1)
    sw = np.take_along_axis(fw, order, axis=1)
    new = np.ones_like(sk, dtype=bool)
    new[:, 1:] = sk[:, 1:] != sk[:, :-1]
    starts = np.flatnonzero(new.ravel())
    reduce = np.add if mode == "mean" else np.maximum
    red = reduce.reduceat(sw.ravel(), starts)
    if mode == "mean":
        red = red / H
    row_of = starts // width
    col_of = np.cumsum(new, axis=1).ravel()[starts] - 1
    uk = np.full((rows, width), -1, np.int64)
    uw = np.zeros((rows, width), np.float32)
    key_u = sk.ravel()[starts]
    valid = key_u != sentinel
    uk[row_of[valid], col_of[valid]] = key_u[valid]
    uw[row_of[valid], col_of[valid]] = red[valid]
    # sort by weight desc, then key asc (uk is key-sorted already; stable sort keeps that)
    rank = np.argsort(-uw, axis=1, kind="stable")[:, :K]
    out_k = np.take_along_axis(uk, rank, axis=1)
    out_w = np.take_along_axis(uw, rank, axis=1)
    out_w = np.where(out_k < 0, 0.0, out_w).astype(np.float32)
    return out_k.reshape(*lead, K).astype(np.int32), out_w.reshape(*lead, K)


@dataclass
class ArcSet:
    """Arcs to draw: floor index, query and key positions, weight and kind (0 normal,
    1 current token, 2 traced token)."""

    floor: np.ndarray
    query: np.ndarray
    key: np.ndarray
    weight: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return len(self.floor)

    @classmethod
    def empty(cls) -> ArcSet:
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), z.copy(), np.zeros(0, np.float32), z.copy())


def select_arcs(keys: np.ndarray, weights: np.ndarray, start: int, end: int, top_k: int,
                threshold: float, current: range, traced: int | None,
                detailed: np.ndarray, max_arcs: int) -> ArcSet:
    """The arcs worth drawing.

    ``keys``/``weights`` are [n_floors, end - start, rank] per visible query (heads already
    combined). An arc is drawn for each of a query's ``top_k`` strongest keys that is visible,
    is not the query itself and weighs at least ``threshold``. On floors where ``detailed`` is
    False (far from the focus) only the current and traced token's arcs are drawn. When more
    than ``max_arcs`` arcs remain, the weakest go, except those of the current and traced
    token, which always stay.
    """
    n_floors, n_q, rank = keys.shape
    k = max(0, min(int(top_k), rank))
    if n_q == 0 or k == 0:
        return ArcSet.empty()
    # A token attending to itself cannot be an arc: rank the other keys only.
    q_all = (start + np.arange(n_q))[None, :, None]
    w_all = np.where((keys >= 0) & (keys != q_all), weights, -1.0).astype(np.float32)
    order = np.argsort(-w_all, axis=2, kind="stable")[:, :, :k]
    kk = np.take_along_axis(keys, order, axis=2).astype(np.int64)
    ww = np.take_along_axis(w_all, order, axis=2)
    f_idx = np.broadcast_to(np.arange(n_floors)[:, None, None], kk.shape)
    q_pos = np.broadcast_to(q_all, kk.shape)
    is_current = (q_pos >= current.start) & (q_pos < current.stop)
    is_traced = (q_pos == traced) | (kk == traced) if traced is not None else np.zeros_like(
        is_current)
    special = is_current | is_traced
    ok = (kk >= start) & (kk < end) & (kk != q_pos) & (ww >= threshold) & (ww > 0)
    ok &= special | np.asarray(detailed, bool)[:, None, None]
    sel = np.flatnonzero(ok.ravel())
    spec = special.ravel()[sel]
    plain = sel[~spec]
    if len(plain) > max_arcs:
        w = ww.ravel()[plain]
        keep = np.argsort(-w, kind="stable")[:max_arcs]
        plain = np.sort(plain[keep])
    sel = np.sort(np.concatenate([sel[spec], plain]))
    kind = np.where(is_traced.ravel()[sel], ARC_TRACED,
                    np.where(is_current.ravel()[sel], ARC_CURRENT, ARC_NORMAL))
    return ArcSet(f_idx.ravel()[sel].astype(np.int64), q_pos.ravel()[sel].astype(np.int64),
                  kk.ravel()[sel], ww.ravel()[sel], kind.astype(np.int64))


def arc_points(x_key: np.ndarray, x_query: np.ndarray, z: np.ndarray, layout: CityLayout
               ) -> np.ndarray:
    """Polyline points [n, segments, 3] of arcs from key to query columns.

    Each arc is a quadratic Bezier in front of the columns, starting at the key column and
    ending at the query column at height ``z + arc_lift``; its peak rises and comes forward by
    an amount that grows with the distance (capped at ``arc_max_peak``).
    """
    x_key = np.asarray(x_key, np.float64)
    x_query = np.asarray(x_query, np.float64)
    z = np.asarray(z, np.float64) + layout.arc_lift
    n, s = len(x_key), layout.arc_segments
    y0 = -layout.box_depth / 2 - 0.05
    p0 = np.stack([x_key, np.full(n, y0), z], axis=1)
    p2 = np.stack([x_query, np.full(n, y0), z], axis=1)
    peak = np.minimum(layout.arc_max_peak, 0.25 * np.abs(x_query - x_key) + 0.3)
    direction = np.array([0.0, -0.55, 0.835])
    p1 = (p0 + p2) / 2 + 2 * peak[:, None] * direction[None, :]
    t = np.linspace(0.0, 1.0, s)[None, :, None]
    return (1 - t) ** 2 * p0[:, None, :] + 2 * (1 - t) * t * p1[:, None, :] + t**2 * p2[:, None, :]


def arc_lines(n_arcs: int, segments: int) -> np.ndarray:
    """VTK line connectivity ([segments, i0, ..., i_{s-1}] per arc) for :func:`arc_points`."""
    idx = np.arange(n_arcs * segments, dtype=np.int64).reshape(n_arcs, segments)
    return np.concatenate([np.full((n_arcs, 1), segments, np.int64), idx], axis=1).reshape(-1)


def arc_style(weights: np.ndarray, kinds: np.ndarray, threshold: float, lut: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Width bin (0..WIDTH_BINS-1) and RGBA of each arc.

    Weight maps to width and opacity over ``[threshold, 1]``; normal arcs take their colour
    from ``lut``, the current token's are orange and the traced token's cyan, fully opaque.
    """
    w = np.asarray(weights, np.float64)
    lo = min(max(float(threshold), 0.0), 0.999)
    u = np.clip((w - lo) / (1.0 - lo), 0.0, 1.0)
    width_bin = np.minimum((u * WIDTH_BINS).astype(np.int64), WIDTH_BINS - 1)
    rgba = colour_values(u, 0.0, 1.0, lut, alpha=0.25 + 0.75 * u)
    kinds = np.asarray(kinds)
    for kind, rgb in ((ARC_CURRENT, CURRENT_RGB), (ARC_TRACED, TRACED_RGB)):
        m = kinds == kind
        rgba[m, :3] = rgb
        rgba[m, 3] = 255
    return width_bin, rgba


# -- residual links, labels ---------------------------------------------------------------
def link_segments(col_heights: np.ndarray, n_cols: int, layout: CityLayout) -> np.ndarray:
    """Points [(n_floors - 1) * capacity * 2, 3] of the residual links: from the top of each
    column's box on floor f to the base of floor f + 1. ``col_heights`` is [n_floors,
    capacity]; slots past ``n_cols`` collapse to a point."""
    n_floors, cap = col_heights.shape
    if n_floors < 2:
        return np.zeros((0, 3))
    z = floor_z(n_floors, layout)
    x = np.arange(cap, dtype=np.float64) * layout.spacing
    bottom = z[:-1, None] + col_heights[:-1]
    top = np.broadcast_to(z[1:, None], bottom.shape).copy()
    live = np.arange(cap)[None, :] < n_cols
    top = np.where(live, top, bottom)
    pts = np.empty((n_floors - 1, cap, 2, 3))
    pts[..., 0] = x[None, :, None]
    pts[..., 1] = 0.0
    pts[..., 0, 2] = bottom
    pts[..., 1, 2] = top
    return pts.reshape(-1, 3)


def link_alpha(contribution: np.ndarray) -> np.ndarray:
    """Opacity of a residual link from the relative size of what the block adds to the
    stream (``|attn_out| + |mlp_out|`` over ``|residual in|``); NaN (unknown) gets 0.3."""
    c = np.asarray(contribution, np.float64)
    return np.where(np.isnan(c), 0.3, 0.15 + 0.7 * np.clip(c, 0.0, 1.0))


def label_slots(n_cols: int, max_labels: int, always: list[int]) -> np.ndarray:
    """Which of ``n_cols`` columns get a text label: evenly spaced, at most ``max_labels``,
    plus the ``always`` ones (current and traced token) when visible."""
    if n_cols <= 0:
        return np.zeros(0, np.int64)
    every = max(1, -(-n_cols // max(1, max_labels)))
    slots = set(range(0, n_cols, every))
    slots.update(s for s in always if 0 <= s < n_cols)
    return np.array(sorted(slots), dtype=np.int64)


# -- linked views -------------------------------------------------------------------------
def top_dims(matrix: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` most active dimensions (largest mean |value| over rows), most
    active first, ties by index."""
    m = np.abs(np.asarray(matrix, np.float64))
    if m.ndim == 1:
        m = m[None, :]
    score = m.mean(axis=0) if len(m) else np.zeros(m.shape[1])
    order = np.argsort(-score, kind="stable")
    return order[: min(n, len(order))]


def layernorm_stats(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the hidden axis: what a layer norm divides out."""
    v = np.asarray(vectors, np.float64)
    return v.mean(axis=-1), v.std(axis=-1)


def sparse_rows_to_dense(keys: np.ndarray, weights: np.ndarray, k0: int, n_keys: int
                         ) -> np.ndarray:
    """Dense [rows, n_keys] matrix of keys ``k0..k0+n_keys`` from top-k lists (rest 0)."""
    keys = np.asarray(keys, np.int64)
    out = np.zeros((keys.shape[0], n_keys), np.float32)
    rows = np.broadcast_to(np.arange(keys.shape[0])[:, None], keys.shape)
    ok = (keys >= k0) & (keys < k0 + n_keys)
    np.add.at(out, (rows[ok], keys[ok] - k0), np.asarray(weights, np.float32)[ok])
    return out


# -- camera -------------------------------------------------------------------------------
def camera_preset(name: str, bounds: tuple[float, float, float, float, float, float],
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float],
                             tuple[float, float, float]]:
    """(position, focal point, view up) of a named camera over ``bounds``.

    ``front`` looks along +y (positions left to right, floors bottom to top); ``side`` looks
    along -x, down the sequence; ``top`` looks down; ``iso`` is a three-quarter view.
    """
    x0, x1, y0, y1, z0, z1 = bounds
    c = np.array([(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2])
    size = max(x1 - x0, y1 - y0, z1 - z0, 1e-6)
    directions = {
        "front": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
        "side": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
        "top": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
        "iso": ((-0.25, -1.0, 0.5), (0.0, 0.0, 1.0)),
    }
    if name not in directions:
        raise ValueError(f"camera preset must be one of {sorted(directions)}, not {name!r}")
    d, up = directions[name]
    d = np.asarray(d) / np.linalg.norm(d)
    pos = c + d * size * 1.6
    return tuple(pos.tolist()), tuple(c.tolist()), up  # type: ignore[return-value]
