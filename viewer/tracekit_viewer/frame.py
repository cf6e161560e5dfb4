"""State -> frame data: everything one frame shows, as plain arrays, read through a source.

:func:`compute_frame` is the only place that decides *what* to read for a step: the
summaries of the visible positions for the city, the full vectors of the focused floor for the
layer view, one block of attention rows for the attention view and one position's vectors for
the token view. It returns numbers only; :mod:`tracekit_viewer.scene` turns them into geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import ArcSet, CityLayout, layernorm_stats, lod_groups, select_arcs, top_dims
from .source import TraceSource
from .state import ViewState

__all__ = ["AttentionPanel", "CityFrame", "Frame", "LayerPanel", "TokenPanel", "compute_frame"]

PANEL_ROWS = 48  # positions shown by the layer and attention views (the latest ones)
PANEL_DIMS = 32  # most active dimensions shown by the layer and token views
LENS_SHOWN = 3


@dataclass
class CityFrame:
    """The 3D view: metric values of the visible positions on every floor, and the arcs."""

    step: int
    n_steps: int
    start: int  # visible positions are [start, end)
    end: int
    capacity: int  # columns the geometry is laid out for (constant per trace)
    groups: np.ndarray  # positions merged per box on each floor (level of detail)
    current: range
    traced: int | None  # traced position if it is computed by this step
    focus: int | None
    metric: str
    heads: str | int
    values: np.ndarray  # [n_floors, n_cols]
    value_range: tuple[float, float]
    contribution: np.ndarray | None  # [n_floors, n_cols]
    arcs: ArcSet
    texts: list[str]

    @property
    def n_cols(self) -> int:
        return self.end - self.start


@dataclass
class LayerPanel:
    """Heatmap of the focused floor: the latest positions x their most active dimensions."""

    floor: int
    array: str
    positions: range
    dims: np.ndarray
    matrix: np.ndarray  # [len(positions), len(dims)]
    scale: float  # colour scale: +-scale
    texts: list[str]


@dataclass
class AttentionPanel:
    """Query x key attention of the focused floor and head selection."""

    floor: int
    heads: str | int
    queries: range
    keys: range
    earlier: np.ndarray | None  # [n_queries]: weight on keys before ``keys`` (None: all shown)
    matrix: np.ndarray  # [n_queries, n_keys]
    current: range
    traced: int | None
    texts: list[str]  # of the positions in ``keys`` (== ``queries``)
    exact: bool  # False when rebuilt from the top-k summary


@dataclass
class TokenPanel:
    """One token's states through the network."""

    position: int
    text: str
    traced: bool
    point_labels: list[str]
    dims: np.ndarray | None
    matrix: np.ndarray | None  # [n_points, len(dims)] residual values
    scale: float
    residual_norm: np.ndarray | None  # [n_points]
    ln_mean: np.ndarray | None  # [n_points]
    ln_std: np.ndarray | None  # [n_points]
    attn_norm: np.ndarray | None  # [n_floors]
    mlp_norm: np.ndarray | None  # [n_floors]
    lens: list[list[tuple[str, float]]] | None  # per point: (text, probability)
    predictions: list[tuple[str, float]] | None


@dataclass
class Frame:
    state: ViewState
    city: CityFrame
    layer: LayerPanel | None
    attention: AttentionPanel | None
    token: TokenPanel | None


def capacity_of(source: TraceSource, layout: CityLayout) -> int:
    return max(1, min(layout.window, source.n_positions))


def compute_frame(source: TraceSource, state: ViewState, layout: CityLayout, *,
                  panels: bool = True) -> Frame:
    """Read and compute everything the views show for ``state``."""
    step = min(max(0, state.step), source.n_steps - 1)
    current = source.step_range(step)
    start, end = max(0, current.stop - layout.window), current.stop
    capacity = capacity_of(source, layout)
    groups = lod_groups(source.n_floors, capacity, state.focus, layout)
    traced = state.traced if state.traced is not None and state.traced < end else None
    metric = state.metric if state.metric in source.metrics or not source.metrics else (
        source.metrics[0])  # show what the trace has

    values = source.metric(metric, start, end).T
    contribution = source.contribution(start, end)
    keys, weights = source.top_attention(start, end, state.heads)
    arcs = select_arcs(np.swapaxes(keys, 0, 1), np.swapaxes(weights, 0, 1), start, end,
                       state.top_k, state.threshold, range(current.stop - 1, current.stop),
                       traced, groups == 1,
                       layout.max_arcs)
    lo_hi = source.value_range(metric) if metric in source.metrics else (0.0, 1.0)
    city = CityFrame(step=step, n_steps=source.n_steps, start=start, end=end,
                     capacity=capacity, groups=groups, current=current, traced=traced,
                     focus=state.focus, metric=metric, heads=state.heads,
                     values=values, value_range=lo_hi,
                     contribution=None if contribution is None else contribution.T,
                     arcs=arcs, texts=source.texts(start, end))
    if not panels:
        return Frame(state, city, None, None, None)
    floor = state.focus if state.focus is not None else source.n_floors - 1
    rows = range(max(0, end - PANEL_ROWS), end)
    return Frame(state, city, _layer_panel(source, state, floor, rows),
                 _attention_panel(source, state, floor, rows, current, traced),
                 _token_panel(source, traced if traced is not None else current.stop - 1,
                              traced is not None))


def _layer_panel(source: TraceSource, state: ViewState, floor: int, rows: range
                 ) -> LayerPanel | None:
    if not source.vector_arrays:
        return None
    array = state.metric if state.metric in source.vector_arrays else source.vector_arrays[0]
    full = source.vectors(array, floor, rows.start, rows.stop)
    dims = top_dims(full, PANEL_DIMS)
    return LayerPanel(floor=floor, array=array, positions=rows, dims=dims,
                      matrix=full[:, dims], scale=source.robust_scale(array, floor),
                      texts=source.texts(rows.start, rows.stop))


def _attention_panel(source: TraceSource, state: ViewState, floor: int, rows: range,
                     current: range, traced: int | None) -> AttentionPanel | None:
    if not (source.has_attention or source.has_attention_summary):
        return None
    matrix = source.attention_matrix(floor, state.heads, rows.start, rows.stop, rows.start,
                                     rows.stop)
    earlier = None
    if rows.start > 0:
        # Rows of a softmax sum to 1 (so do their means over heads): what is not on a shown
        # key is on an earlier one. For "max over heads" no such identity holds.
        earlier = (np.clip(1.0 - matrix.sum(axis=1), 0.0, 1.0) if state.heads != "max"
                   else np.full(len(rows), np.nan, np.float32))
    return AttentionPanel(floor=floor, heads=state.heads, queries=rows, keys=rows,
                          earlier=earlier, matrix=matrix, current=current, traced=traced,
                          texts=source.texts(rows.start, rows.stop),
                          exact=source.has_attention)


def point_label(point: int) -> str:
    return "embed" if point == 0 else f"L{point - 1} out"


def _token_panel(source: TraceSource, position: int, traced: bool) -> TokenPanel:
    st = source.token_state(position)
    labels = [point_label(p) for p in source.points]
    res = st.get("residual")
    dims = matrix = norm = ln_mean = ln_std = None
    scale = 1.0
    if res is not None:
        dims = top_dims(res, PANEL_DIMS)
        matrix = res[:, dims]
        norm = np.sqrt(np.einsum("ij,ij->i", res.astype(np.float64), res.astype(np.float64)))
        ln_mean, ln_std = layernorm_stats(res)
        scale = source.robust_scale("residual")
    attn = st.get("attn_out")
    mlp = st.get("mlp_out")
    lens = None
    if "lens_ids" in st:
        lens = [[(source.id_text(i), float(np.exp(lp))) for i, lp in
                 zip(st["lens_ids"][p][:LENS_SHOWN], st["lens_logprobs"][p][:LENS_SHOWN],
                     strict=True) if i >= 0] for p in range(len(source.points))]
    preds = None
    if "top_ids" in st:
        preds = [(source.id_text(i), float(np.exp(lp))) for i, lp in
                 zip(st["top_ids"][:5], st["top_logprobs"][:5], strict=True) if i >= 0]
    return TokenPanel(
        position=position, text=source.token_text(position), traced=traced,
        point_labels=labels, dims=dims, matrix=matrix, scale=scale, residual_norm=norm,
        ln_mean=ln_mean, ln_std=ln_std,
        attn_norm=None if attn is None else np.linalg.norm(attn.astype(np.float64), axis=1),
        mlp_norm=None if mlp is None else np.linalg.norm(mlp.astype(np.float64), axis=1),
        lens=lens, predictions=preds)
