"""The pure step -> scene functions, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from tracekit_viewer.scene import (
    ARC_CURRENT,
    ARC_NORMAL,
    ARC_TRACED,
    CURRENT_RGB,
    TRACED_RGB,
    CityLayout,
    arc_lines,
    arc_points,
    arc_style,
    box_faces,
    box_geometry,
    box_points,
    camera_preset,
    colour_values,
    column_heights,
    combine_heads,
    fit_layout,
    floor_boxes,
    label_slots,
    layernorm_stats,
    link_segments,
    lod_groups,
    select_arcs,
    sparse_rows_to_dense,
    top_dims,
    visible_window,
)
from tracekit_viewer.state import ViewState, cycle_heads, help_text, next_speed

LAYOUT = CityLayout()
GREY = np.linspace(0, 1, 4)[:, None].repeat(3, axis=1)  # 4-entry grey ramp


def test_visible_window_keeps_the_latest_positions():
    assert visible_window(5, 512) == (0, 5)
    assert visible_window(600, 512) == (88, 600)


def test_heights_run_from_min_to_max_over_the_fixed_range():
    lay = CityLayout(min_height=0.1, max_height=2.1)
    h = column_heights(np.array([1.0, 3.0, 5.0, 9.0, -1.0, np.nan]), 1.0, 5.0, lay)
    assert h.tolist() == pytest.approx([0.1, 1.1, 2.1, 2.1, 0.1, 0.0])


def test_colours_bin_values_like_a_vtk_lookup_table():
    rgba = colour_values(np.array([0.0, 0.24, 0.25, 0.99, 1.0, np.nan]), 0.0, 1.0, GREY,
                         alpha=0.5)
    # four bins of width 0.25: grey levels 0, 1/3, 2/3, 1
    assert rgba[:, 0].tolist() == [0, 0, 85, 255, 255, 0]
    assert rgba[:, 3].tolist() == [128, 128, 128, 128, 128, 0]  # NaN is transparent


def test_a_flat_range_gives_mid_colour_not_nan():
    assert column_heights(np.array([2.0]), 2.0, 2.0, LAYOUT)[0] == pytest.approx(
        (LAYOUT.min_height + LAYOUT.max_height) / 2)


def test_box_corners_and_faces():
    pts = box_points(np.array([3.0]), np.array([6.0]), np.array([0.5]), 0.4, np.array([2.0]))
    assert pts.shape == (8, 3)
    assert pts[:4, 2].tolist() == [6.0] * 4 and pts[4:, 2].tolist() == [8.0] * 4
    assert pts[:, 0].min() == 2.75 and pts[:, 0].max() == 3.25
    assert pts[:, 1].min() == -0.2 and pts[:, 1].max() == 0.2
    faces = box_faces(2).reshape(-1, 5)
    assert faces.shape == (12, 5) and (faces[:, 0] == 4).all()
    assert faces[6:, 1:].min() == 8 and faces[6:, 1:].max() == 15


def test_lod_keeps_floors_near_the_focus_in_full_detail():
    lay = CityLayout(lod_budget=100, lod_radius=1)
    assert lod_groups(3, 10, None, lay).tolist() == [1, 1, 1]  # 30 boxes fit
    g = lod_groups(10, 40, 5, lay)
    assert g[4:7].tolist() == [1, 1, 1]
    far = g[np.r_[0:4, 7:10]]
    assert (far == far[0]).all() and far[0] > 1
    total = 3 * 40 + 7 * -(-40 // far[0])
    assert total <= 100 or far[0] >= 40
    # without focus the top floor is the reference
    assert lod_groups(10, 40, None, lay)[-1] == 1


def test_merged_boxes_show_the_peak_they_cover():
    values = np.array([[1.0, 5.0, 2.0, np.nan, np.nan]])
    floors, first, span, vals = floor_boxes(values, np.array([2]), capacity=5)
    assert first.tolist() == [0, 2, 4] and span.tolist() == [2, 2, 2]
    assert vals[:2].tolist() == [5.0, 2.0] and np.isnan(vals[2])


def test_box_geometry_collapses_boxes_past_the_visible_columns():
    values = np.array([[2.0, 4.0, np.nan]])
    pts, vals, floors = box_geometry(values, np.array([1]), capacity=3, n_cols=2, lo=0.0,
                                     hi=4.0, layout=CityLayout(min_height=0.0, max_height=2.0))
    boxes = pts.reshape(3, 8, 3)
    assert boxes[0, 4, 2] == pytest.approx(1.0) and boxes[1, 4, 2] == pytest.approx(2.0)
    assert np.ptp(boxes[2], axis=0).tolist() == [0.0, 0.0, 0.0]  # a point: drawn as nothing
    assert boxes[1, :, 0].mean() == pytest.approx(LAYOUT.spacing)  # column 1 at x = spacing


def test_combine_heads_mean_max_and_one():
    keys = np.array([[[0, 3, -1], [3, 1, 0]]])  # [query, head, rank]
    w = np.array([[[0.6, 0.4, 0.0], [0.5, 0.3, 0.2]]], np.float32)
    k, ww = combine_heads(keys, w, "mean")
    assert k[0].tolist() == [3, 0, 1] and ww[0].tolist() == pytest.approx([0.45, 0.4, 0.15])
    k, ww = combine_heads(keys, w, "max")
    assert k[0].tolist() == [0, 3, 1] and ww[0].tolist() == pytest.approx([0.6, 0.5, 0.3])
    k, ww = combine_heads(keys, w, 1)
    assert k[0].tolist() == [3, 1, 0]
    with pytest.raises(ValueError):
        combine_heads(keys, w, 2)


def test_select_arcs_top_k_threshold_and_self():
    # one floor, queries 0..3; query 3 attends to itself most, then 0, then 2
    keys = np.full((1, 4, 3), -1)
    w = np.zeros((1, 4, 3), np.float32)
    keys[0, 3] = [3, 0, 2]
    w[0, 3] = [0.5, 0.3, 0.2]
    keys[0, 2] = [0, 1, 2]
    w[0, 2] = [0.7, 0.2, 0.1]
    arcs = select_arcs(keys, w, 0, 4, top_k=2, threshold=0.15, current=range(3, 4),
                       traced=None, detailed=np.array([True]), max_arcs=100)
    got = sorted(zip(arcs.query.tolist(), arcs.key.tolist(), arcs.weight.tolist(),
                     arcs.kind.tolist(), strict=True))
    assert got == [(2, 0, pytest.approx(0.7), ARC_NORMAL), (2, 1, pytest.approx(0.2), ARC_NORMAL),
                   (3, 0, pytest.approx(0.3), ARC_CURRENT), (3, 2, pytest.approx(0.2), ARC_CURRENT)]
    # a higher threshold drops the weak ones; the traced token's arcs are marked
    arcs = select_arcs(keys, w, 0, 4, top_k=2, threshold=0.25, current=range(3, 4), traced=0,
                       detailed=np.array([True]), max_arcs=100)
    assert sorted(zip(arcs.query.tolist(), arcs.kind.tolist(), strict=True)) == [
        (2, ARC_TRACED), (3, ARC_TRACED)]


def test_select_arcs_caps_plain_arcs_but_keeps_the_current_token():
    keys = np.zeros((2, 5, 1), np.int64)
    w = np.linspace(0.2, 0.6, 10, dtype=np.float32).reshape(2, 5, 1)
    arcs = select_arcs(keys, w, 0, 5, 1, 0.0, range(4, 5), None, np.array([True, False]),
                       max_arcs=2)
    # floor 1 is far (not detailed): only its current-token arc. Floor 0 keeps its 2
    # strongest plain arcs (queries 2, 3; query 0 only attends to itself) plus the current one.
    assert sorted(zip(arcs.floor.tolist(), arcs.query.tolist(), strict=True)) == [
        (0, 2), (0, 3), (0, 4), (1, 4)]


def test_keys_outside_the_window_are_not_drawn():
    keys = np.array([[[0], [0]]])
    w = np.array([[[0.9], [0.9]]], np.float32)
    arcs = select_arcs(keys, w, 5, 7, 1, 0.1, range(6, 7), None, np.array([True]), 10)
    assert len(arcs) == 0


def test_arc_geometry_starts_at_the_key_and_ends_at_the_query():
    lay = CityLayout(arc_segments=5, arc_lift=0.1, arc_max_peak=1.0)
    pts = arc_points(np.array([0.0, 2.0]), np.array([4.0, 3.0]), np.array([3.0, 0.0]), lay)
    assert pts.shape == (2, 5, 3)
    y0 = -lay.box_depth / 2 - 0.05
    assert pts[0, 0].tolist() == pytest.approx([0.0, y0, 3.1])
    assert pts[0, -1].tolist() == pytest.approx([4.0, y0, 3.1])
    # midpoint: peak min(1.0, 0.25 * 4 + 0.3) = 1.0 along (0, -0.55, 0.835)
    assert pts[0, 2].tolist() == pytest.approx([2.0, y0 - 0.55, 3.1 + 0.835])
    assert pts[1, 2, 2] == pytest.approx(0.1 + 0.835 * (0.25 + 0.3))
    lines = arc_lines(2, 5).reshape(2, 6)
    assert lines[:, 0].tolist() == [5, 5] and lines[1, 1:].tolist() == [5, 6, 7, 8, 9]


def test_arc_style_width_and_opacity_grow_with_weight():
    bins, rgba = arc_style(np.array([0.2, 0.7, 1.0, 0.5, 0.5]),
                           np.array([0, 0, 0, ARC_CURRENT, ARC_TRACED]), 0.2, GREY)
    assert bins.tolist() == [0, 2, 3, 1, 1]
    assert rgba[0, 3] == round(0.25 * 255) and rgba[2, 3] == 255
    assert tuple(rgba[3, :3]) == CURRENT_RGB and tuple(rgba[4, :3]) == TRACED_RGB


def test_residual_links_join_the_top_of_a_column_to_the_next_floor():
    lay = CityLayout(floor_gap=3.0)
    pts = link_segments(np.array([[1.0, 2.0, 0.5], [1.5, 1.0, 0.7]]), n_cols=2, layout=lay)
    seg = pts.reshape(1, 3, 2, 3)
    assert seg[0, 0].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]
    assert seg[0, 1].tolist() == [[1.0, 0.0, 2.0], [1.0, 0.0, 3.0]]
    assert seg[0, 2, 0].tolist() == seg[0, 2, 1].tolist()  # slot 2 not visible: a point


def test_label_slots_are_sparse_but_keep_the_current_token():
    assert label_slots(10, 4, []).tolist() == [0, 3, 6, 9]
    assert label_slots(10, 4, [8, 42]).tolist() == [0, 3, 6, 8, 9]


def test_top_dims_and_layernorm_stats():
    m = np.array([[0.0, -5.0, 1.0], [0.0, 3.0, -1.0]])
    assert top_dims(m, 2).tolist() == [1, 2]
    mean, std = layernorm_stats(np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and std.tolist() == [1.0, 0.0]


def test_sparse_rows_to_dense():
    d = sparse_rows_to_dense(np.array([[0, 3, -1], [2, 2, 5]]),
                             np.array([[0.5, 0.25, 0], [0.5, 0.25, 0.25]]), 1, 3)
    assert d.tolist() == [[0.0, 0.0, 0.25], [0.0, 0.75, 0.0]]


def test_camera_presets_look_at_the_centre():
    bounds = (0.0, 10.0, -1.0, 1.0, 0.0, 4.0)
    for name, axis in (("front", 1), ("side", 0), ("top", 2)):
        pos, focal, up = camera_preset(name, bounds)
        assert focal == pytest.approx((5.0, 0.0, 2.0))
        d = np.subtract(pos, focal)
        assert np.count_nonzero(np.round(d, 9)) == 1 and d[axis] != 0
    assert camera_preset("front", bounds)[0][1] < 0  # in front: looking along +y
    with pytest.raises(ValueError):
        camera_preset("under", bounds)


def test_state_cycles():
    assert [cycle_heads(h, 2) for h in ("mean", "max", 0, 1)] == ["max", 0, 1, "mean"]
    assert cycle_heads("mean", 2, -1) == 1
    assert next_speed(4.0, 1) == 8.0 and next_speed(0.5, -1) == 0.5
    assert ViewState().copy(step=3).step == 3
    text = help_text()
    assert "Space  play / pause" in text and "Right  next step" in text


def test_fit_layout_keeps_a_wide_city_from_being_a_sliver():
    assert fit_layout(10, 3) == CityLayout()  # small: the default sizes
    lay = fit_layout(512, 24)
    height = 24 * lay.floor_gap
    assert 1.8 < 512 * lay.spacing / height < 2.4
    assert lay.max_height / lay.floor_gap == pytest.approx(CityLayout().max_height / 3.0)
