"""What a step of a known trace puts on screen: values, heights, colours, arcs, panels; and
the bounded, cached reading behind it."""

from __future__ import annotations

import numpy as np
import pytest
from tracekit_viewer.frame import compute_frame
from tracekit_viewer.scene import ARC_CURRENT, CityLayout, box_geometry, colour_values
from tracekit_viewer.source import BlockCache, TraceSource, id_label
from tracekit_viewer.state import ViewState
from tracekit_viewer.synthetic import (
    WORDS,
    exact_attention,
    exact_residual_norm,
    write_synthetic_trace,
)

LAYOUT = CityLayout(min_height=0.0, max_height=2.0)


@pytest.fixture
def source(exact_trace):
    s = TraceSource(exact_trace)
    yield s
    s.close()


def test_steps_and_the_visible_positions(source):
    # a 4-token prompt in step 0, then one token per step
    assert source.n_steps == 7 and source.n_positions == 10
    assert source.step_range(0) == range(0, 4) and source.step_range(6) == range(9, 10)
    fr = compute_frame(source, ViewState(step=2), LAYOUT).city
    assert (fr.start, fr.end, fr.current) == (0, 6, range(5, 6))
    assert fr.texts == list(WORDS[:6])
    fr = compute_frame(source, ViewState(step=6), CityLayout(window=4)).city
    assert (fr.start, fr.end) == (6, 10)


def test_city_values_heights_and_colours(source):
    fr = compute_frame(source, ViewState(step=3), LAYOUT).city
    expected = np.array([[exact_residual_norm(p, layer + 1) for p in range(7)]
                         for layer in range(3)])
    assert fr.values.tolist() == expected.tolist()
    assert fr.value_range == (1.0, 5.5)  # residual norms over every point, position
    pts, vals, floors = box_geometry(fr.values, fr.groups, fr.capacity, fr.n_cols,
                                     *fr.value_range, LAYOUT)
    boxes = pts.reshape(-1, 8, 3)
    heights = boxes[:, 4, 2] - boxes[:, 0, 2]
    # floor 2 (model layer 2), position 3: norm 1 + 3 + 0.5 * 3 = 5.5 -> the full height
    i = 2 * fr.capacity + 3
    assert (floors[i], vals[i]) == (2, 5.5) and heights[i] == pytest.approx(2.0)
    # floor 0, position 0: norm 2.0 -> (2 - 1) / 4.5 of the height, on the floor at z = 0
    assert heights[0] == pytest.approx(2.0 / 4.5) and boxes[0, 0, 2] == 0.0
    # positions 7..9 are not computed yet: no box
    assert heights[7:10].tolist() == [0.0, 0.0, 0.0]
    lut = np.linspace(0, 1, 10)[:, None].repeat(3, axis=1)
    rgba = colour_values(vals, *fr.value_range, lut)
    assert rgba[i].tolist() == [255, 255, 255, 255] and rgba[7, 3] == 0


@pytest.mark.parametrize("heads", ["mean", "max", 0, 1])
def test_arcs_match_the_known_attention(source, heads):
    st = ViewState(step=6, heads=heads, top_k=2, threshold=0.15)
    arcs = compute_frame(source, st, LAYOUT).city.arcs
    expected = set()
    for f in range(3):
        for q in range(10):
            per_head = [exact_attention(q, f, h) for h in range(2)]
            keys = set().union(*per_head)
            if heads == "mean":
                w = {k: sum(p.get(k, 0) for p in per_head) / 2 for k in keys}
            elif heads == "max":
                w = {k: max(p.get(k, 0) for p in per_head) for k in keys}
            else:
                w = per_head[heads]
            others = sorted(((-v, k) for k, v in w.items() if k != q))[:2]
            expected |= {(f, q, k, -nv) for nv, k in others if -nv >= 0.15}
    got = {(int(f), int(q), int(k), float(w)) for f, q, k, w in
           zip(arcs.floor, arcs.query, arcs.key, arcs.weight, strict=True)}
    assert got == expected
    assert set(arcs.query[arcs.kind == ARC_CURRENT].tolist()) == {9}


def test_scrubbing_backwards_gives_the_same_frame_as_going_there(exact_trace):
    a = TraceSource(exact_trace)
    b = TraceSource(exact_trace)
    try:
        st = ViewState(traced=2, focus=1)
        for s in (6, 5, 1, 3, 0, 6, 2):  # source a scrubs around
            compute_frame(a, st.copy(step=s), LAYOUT)
        fa = compute_frame(a, st.copy(step=2), LAYOUT)
        fb = compute_frame(b, st.copy(step=2), LAYOUT)  # source b goes straight there
        assert fa.city.values.tolist() == fb.city.values.tolist()
        for name in ("floor", "query", "key", "weight", "kind"):
            assert getattr(fa.city.arcs, name).tolist() == getattr(fb.city.arcs, name).tolist()
        assert fa.attention.matrix.tolist() == fb.attention.matrix.tolist()
        assert fa.layer.matrix.tolist() == fb.layer.matrix.tolist()
        assert fa.token.position == fb.token.position == 2
    finally:
        a.close()
        b.close()


def test_panels_follow_focus_head_and_traced_token(source):
    fr = compute_frame(source, ViewState(step=4, focus=1, heads=1, traced=3), LAYOUT)
    att = fr.attention
    assert att.floor == 1 and att.queries == range(0, 8) and att.earlier is None
    for q in range(8):
        row = np.zeros(8)
        for k, w in exact_attention(q, 1, 1).items():
            row[k] = w
        assert att.matrix[q].tolist() == row.tolist()
    assert att.current == range(7, 8) and att.traced == 3
    lay = fr.layer
    assert lay.floor == 1 and lay.array == "residual" and lay.positions == range(0, 8)
    # one-hot residuals: each row's only non-zero is its norm
    assert np.abs(lay.matrix).max(axis=1).tolist() == [exact_residual_norm(p, 2)
                                                       for p in range(8)]
    tok = fr.token
    assert tok.traced and tok.position == 3 and tok.text == WORDS[3]
    assert tok.residual_norm.tolist() == [exact_residual_norm(3, p) for p in range(4)]
    assert tok.attn_norm.tolist() == [0.5, 1.0, 1.5]
    assert tok.mlp_norm.tolist() == [1.25, 1.5, 1.75]  # 0.25 (layer + 1) + 3 % 2
    # logit lens: ids (position + point + rank) % 20, all seen in the sequence
    assert [t for t, _ in tok.lens[0]] == [repr(WORDS[3]), repr(WORDS[4]), repr(WORDS[5])]
    assert tok.lens[0][0][1] == pytest.approx(np.exp(-1))


def test_prediction_labels_are_quoted_text_or_the_id() -> None:
    assert id_label(5, "fib") == "'fib'"
    assert id_label(7, "\n    ") == "'\\n    '"  # escaped, so a label stays one line
    assert id_label(9, "\\xe2") == "'\\\\xe2'"
    assert id_label(68, None) == "#68"


@pytest.mark.parametrize("vocab", [True, False])
def test_predictions_show_text_from_the_stored_vocabulary(tmp_path, vocab: bool) -> None:
    path = write_synthetic_trace(tmp_path / "t.zarr", n_layers=3, n_positions=10, d_model=8,
                                 n_heads=2, prompt_length=4, vocab=vocab)
    s = TraceSource(path)
    try:
        tok = compute_frame(s, ViewState(step=6, traced=9), LAYOUT).token
        # Position 9 predicts ids 10, 11, ...: words that never occur in the 10 positions,
        # so without a vocabulary the viewer can only show their ids.
        labels = [t for t, _ in tok.predictions]
        assert labels[:2] == ([repr(WORDS[10]), repr(WORDS[11])] if vocab else ["#10", "#11"])
        assert s.id_text(len(WORDS) + 3) == (repr(f" w{len(WORDS) + 3}") if vocab
                                             else f"#{len(WORDS) + 3}")
        assert s.id_text(2) == repr(WORDS[2])  # seen in the sequence: text either way
    finally:
        s.close()


def test_a_traced_token_not_yet_computed_is_not_shown(source):
    fr = compute_frame(source, ViewState(step=1, traced=8), LAYOUT)
    assert fr.city.traced is None and not fr.token.traced and fr.token.position == 4


def test_attention_panel_earlier_column_when_the_window_scrolls(tmp_path):
    path = write_synthetic_trace(tmp_path / "long.zarr", n_layers=2, n_positions=60,
                                 d_model=8, n_heads=2, values="exact")
    src = TraceSource(path)
    try:
        fr = compute_frame(src, ViewState(step=src.n_steps - 1, heads=0), LAYOUT)
        att = fr.attention
        assert att.queries == range(12, 60)
        # head 0 puts 0.5 on the first token, left of the window (and query 12 another 0.25
        # on token 11)
        assert att.earlier.tolist() == pytest.approx([0.75] + [0.5] * 47)
        fr = compute_frame(src, ViewState(step=src.n_steps - 1, heads="max"), LAYOUT)
        assert np.isnan(fr.attention.earlier).all()  # no such identity for a max
    finally:
        src.close()


def test_hdf5_and_zarr_show_the_same_frame(exact_trace, exact_trace_h5):
    a = TraceSource(exact_trace)
    b = TraceSource(exact_trace_h5)
    try:
        st = ViewState(step=5, traced=1)
        fa, fb = compute_frame(a, st, LAYOUT), compute_frame(b, st, LAYOUT)
        assert fa.city.values.tolist() == fb.city.values.tolist()
        assert fa.city.arcs.weight.tolist() == fb.city.arcs.weight.tolist()
        assert fa.attention.matrix.tolist() == fb.attention.matrix.tolist()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("captured", [(), ("residual",), ("attention",),
                                      ("attn_out", "mlp_out", "predictions")])
def test_any_array_may_be_missing(tmp_path, captured):
    path = write_synthetic_trace(tmp_path / "partial.zarr", n_layers=2, n_positions=6,
                                 d_model=8, n_heads=2, values="exact", captured=captured)
    src = TraceSource(path)
    try:
        fr = compute_frame(src, ViewState(step=2, traced=1, metric="residual"), LAYOUT)
        assert fr.city.values.shape == (2, 6)
        assert np.isnan(fr.city.values).all() == (not src.metrics)
        assert fr.city.metric == (src.metrics[0] if "residual" not in captured and src.metrics
                                  else "residual")
        assert (len(fr.city.arcs) > 0) == ("attention" in captured)
        assert (fr.attention is None) == ("attention" not in captured)
        assert (fr.layer is None) == (not src.vector_arrays)
        assert fr.token.position == 1
    finally:
        src.close()


def test_block_cache_is_bounded_and_least_recently_used_goes_first():
    cache = BlockCache(max_bytes=2500)
    for key in "abc":
        cache.put(key, np.zeros(1000, np.uint8))
        if key == "b":
            assert cache.lookup("a")[0]  # touch a: b is now the oldest
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 2000


def test_scrubbing_keeps_the_cache_within_its_budget(exact_trace):
    src = TraceSource(exact_trace, cache_bytes=20_000)
    try:
        rng = np.random.default_rng(0)
        for s in rng.integers(0, src.n_steps, 30):
            compute_frame(src, ViewState(step=int(s), traced=int(rng.integers(0, 10)),
                                         focus=int(rng.integers(0, 3))), LAYOUT)
            assert src.cache.nbytes <= 20_000
    finally:
        src.close()


def test_prefetch_warms_the_cache_for_the_next_steps(exact_trace):
    from tracekit_viewer.fetch import FrameFetcher

    src = TraceSource(exact_trace)
    fetcher = FrameFetcher(src, LAYOUT, prefetch_steps=3)
    try:
        st = ViewState(step=1, focus=2, traced=0)
        compute_frame(src, st, LAYOUT)
        assert fetcher.cached(st.copy(step=2)) is None  # not read yet
        fetcher.prefetch(st)
        assert fetcher.idle(30)
        assert fetcher.prefetched == [2, 3, 4]
        misses = src.cache.misses
        for s in (2, 3, 4):
            compute_frame(src, st.copy(step=s), LAYOUT)
        assert src.cache.misses == misses  # everything came from the cache
    finally:
        fetcher.close()
        src.close()
