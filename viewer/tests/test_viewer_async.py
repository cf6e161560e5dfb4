"""The window never waits on a slow store: a trace whose every read takes a while (as over a
network) is read on the fetch thread, while the window keeps the last frame with a
"loading step N..." mark; only the latest request is read; the next steps are prefetched
within the cache budget; a read that fails says so in one line and the window carries on.

The slow trace is a real trace behind a storage backend that sleeps before each array read
(and notes them), :func:`tracekit_viewer.slowstore.open_slow`: what a remote store will look
like to the viewer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from tracekit_viewer.app import LOADING_RGB, CityViewer
from tracekit_viewer.fetch import PREFETCH_STEPS
from tracekit_viewer.slowstore import Latency, open_slow
from tracekit_viewer.state import ViewState
from tracekit_viewer.synthetic import write_synthetic_trace

from tracekit.errors import TraceError

from .test_viewer_interaction import _box_centre, _display

SIZE = (480, 360)


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory) -> str:
    """3 floors, 160 positions: a 4-token prompt, then 156 one-token steps."""
    path = tmp_path_factory.mktemp("traces") / "long.zarr"
    return str(write_synthetic_trace(path, n_layers=3, n_positions=160, d_model=8, n_heads=2,
                                     prompt_length=4, values="exact"))


@pytest.fixture
def network() -> Latency:
    return Latency()


def slow_viewer(path: str, network: Latency, step: int = 0, **kw: Any) -> CityViewer:
    """A viewer in background mode (as in the window) over ``path`` behind ``network``; the
    first frame is read at full speed."""
    trace = open_slow(path, network)
    kw = {"prefetch": False, "window_size": SIZE, **kw}
    viewer = CityViewer(trace, state=ViewState(step=step), off_screen=True, background=True,
                        **kw)
    viewer.screenshot()
    return viewer


def close(viewer: CityViewer) -> None:
    trace = viewer.source.trace
    viewer.close()
    trace.close()


def assert_same_frame(a, b) -> None:
    """Two frames show the same numbers in every view."""
    assert (a.city.step, a.city.start, a.city.end, a.city.texts) == (
        b.city.step, b.city.start, b.city.end, b.city.texts)
    np.testing.assert_array_equal(a.city.values, b.city.values)
    for field in ("query", "key", "floor", "weight", "kind"):
        np.testing.assert_array_equal(getattr(a.city.arcs, field), getattr(b.city.arcs, field))
    np.testing.assert_array_equal(a.layer.matrix, b.layer.matrix)
    np.testing.assert_array_equal(a.attention.matrix, b.attention.matrix)
    assert (a.token.position, a.token.predictions) == (b.token.position, b.token.predictions)
    np.testing.assert_array_equal(a.token.matrix, b.token.matrix)


def loading_pixels(image: np.ndarray) -> int:
    """Pixels of the loading mark's colour."""
    rgb = np.asarray(LOADING_RGB) * 255
    return int((np.abs(image[..., :3].astype(float) - rgb).max(axis=-1) < 24).sum())


def test_a_slow_step_loads_in_the_background_and_matches_the_synchronous_frame(
        exact_trace, network, tmp_path):
    v = slow_viewer(exact_trace, network, step=0)
    try:
        before = v.screenshot()
        network.delay = 0.2
        t0 = time.perf_counter()
        assert v.set_state(step=4, traced=2).step == 4
        assert v.update() is None  # (asking again while it loads does not block either)
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.1, f"update() took {elapsed:.3f} s with 0.2 s reads"
        # the last frame stays, with the mark; the slider already shows where we go
        assert v.loading == 4 and v.frame.city.step == 0
        assert v.loading_mark.GetVisibility()
        assert v.loading_mark.GetInput().strip() == "loading step 4 / 6\u2026"
        assert "step 0 / 6" in v.status.GetInput()
        assert v.step_slider.GetRepresentation().GetValue() == 4
        waiting = v.screenshot()
        import imageio.v3 as iio

        iio.imwrite(tmp_path / "loading.png", waiting)
        assert loading_pixels(waiting) > 300 and loading_pixels(before) < 30
        v.state.playing = True
        assert not v.tick(now=v._last_tick + 5.0)  # playback waits for the step being read
        v.state.playing = False

        shown = v.finish_loading(30)
        assert shown is v.frame and shown.city.step == 4 and shown.city.traced == 2
        assert v.loading is None and not v.loading_mark.GetVisibility()
        assert "step 4 / 6" in v.status.GetInput()
        after = v.screenshot()
        assert loading_pixels(after) < 30
        with CityViewer(exact_trace, state=ViewState(step=4, traced=2), off_screen=True,
                        window_size=SIZE, prefetch=False) as sync:
            assert not sync.background  # off-screen viewers read synchronously
            assert_same_frame(shown, sync.frame)
            assert np.abs(sync.screenshot().astype(int) - after.astype(int)).mean() < 0.5
        # a forced synchronous update reads right away, in background mode too
        network.delay = 0.0
        v.state.step = 5
        fr = v.update(wait=True)
        assert fr is not None and fr.city.step == 5 and v.loading is None
        # hovering reads nothing on the window's thread: a value not cached says so
        v.screenshot()
        x, y = _display(v.city_renderer, _box_centre(v, 2, 6))
        assert v.hover(x, y).text.startswith("token 6 ' because'   L2   residual norm")
        v.source.cache.clear()
        network.clear()
        assert v.hover(x + 1, y).text == "(not read yet)" and network.reads == []
    finally:
        close(v)


def test_scrubbing_fast_reads_only_the_step_it_lands_on(long_trace, network):
    v = slow_viewer(long_trace, network, step=0)
    try:
        network.delay = 0.03
        network.clear()
        t0 = time.perf_counter()
        for step in range(1, 101):  # a hundred steps, faster than one of them can be read
            v.set_step(step)
        scrub = time.perf_counter() - t0
        shown = v.finish_loading(60)
        assert shown.city.step == 100
        # step s shows token 3 + s: its own vectors were read for step 100 and, at most,
        # for the one step whose read had begun when the next request came
        tokens = network.positions_read("top_ids")
        assert 103 in tokens and len(tokens) <= 2, sorted(tokens)
        assert tokens <= {103} | {3 + s for s in range(1, 100)}
        reads = len(network.reads)
        print(f"100 steps scrubbed in {scrub:.2f} s; {reads} reads; tokens read {sorted(tokens)}")
        assert reads < 60  # one frame's worth (and one read in flight), not a hundred frames'
        assert scrub < 100 * network.delay  # the window never waited on a read
    finally:
        close(v)


def test_the_next_steps_are_prefetched_while_paused(long_trace, network):
    v = slow_viewer(long_trace, network, step=20, prefetch=True)
    try:
        assert v.fetcher.idle(60)
        network.delay = 0.01
        v.set_step(30)
        v.finish_loading(60)
        assert v.fetcher.idle(60)
        assert v.fetcher.prefetched == list(range(31, 31 + PREFETCH_STEPS))
        network.clear()
        for step in range(31, 31 + PREFETCH_STEPS):  # stepping on shows each at once
            v.set_step(step)
            assert v.loading is None and v.frame.city.step == step
            assert v.fetcher.idle(60)
        assert network.positions_read("top_ids") <= {3 + s for s in range(31 + PREFETCH_STEPS,
                                                                           31 + 2 * PREFETCH_STEPS)}
        # stepping backwards prefetches backwards
        v.set_step(10)
        v.finish_loading(60)
        assert v.fetcher.idle(60)
        assert v.fetcher.prefetched == list(range(9, 9 - PREFETCH_STEPS, -1))
    finally:
        close(v)


def test_prefetch_keeps_within_the_cache_budget_over_a_long_scrub(long_trace, network):
    budget = 160 << 10  # a frame of this trace reads ~80 KB cold, a next step ~0.6 KB
    v = slow_viewer(long_trace, network, step=0, prefetch=True, cache_bytes=budget)
    try:
        assert v.fetcher.prefetch_bytes == budget // 2
        rng = np.random.default_rng(3)
        for step in rng.integers(1, v.source.n_steps - 1, 40):
            step, before = int(step), v.state.step
            v.set_state(step=step, focus=int(rng.integers(0, 3)))
            assert v.finish_loading(60).city.step == step
            assert v.fetcher.idle(60)
            assert v.source.cache.nbytes <= budget
            # one step on, the way the scrub went, was prefetched: it shows at once
            on = step + (1 if step > before else -1)
            v.set_step(on)
            assert v.loading is None and v.frame.city.step == on
            assert v.source.cache.nbytes <= budget
        # a prefetch stops when it has read its share of the budget, whatever the count
        v.fetcher.prefetch_bytes = 1500
        v.set_step(100)
        v.finish_loading(60)
        assert v.fetcher.idle(60)
        assert 1 <= len(v.fetcher.prefetched) < PREFETCH_STEPS, v.fetcher.prefetched
    finally:
        close(v)


def test_a_read_error_shows_in_one_line_and_the_step_can_be_read_again(exact_trace, network):
    v = slow_viewer(exact_trace, network, step=0)
    try:
        network.failure = TraceError("timed out after 30 s reading residual/c/4/0/0")
        v.set_step(4)
        assert v.finish_loading(30).city.step == 0  # the last frame stays
        assert v.loading is None
        assert v.read_error == ("step 4 could not be read (r: try again): timed out after "
                                "30 s reading residual/c/4/0/0")
        # the mark says it, cut to the width of the window's city view
        mark = v.loading_mark.GetInput().strip()
        assert v.loading_mark.GetVisibility()
        assert mark.startswith("step 4 could not be read (r: try again): timed out")
        assert mark.endswith("...") and v.read_error.startswith(mark[:-3])
        # the store recovers: r reads the step again
        network.failure = None
        v.press("r")
        assert v.loading == 4 and v.read_error is None
        assert v.finish_loading(30).city.step == 4
        assert not v.loading_mark.GetVisibility()
        # the fetch thread lives on: another step, another failure, another step
        network.failure = OSError("connection reset by peer\nsecond line")
        v.set_step(5)
        v.finish_loading(30)
        assert v.read_error == ("step 5 could not be read (r: try again): OSError: "
                                "connection reset by peer")
        network.failure = None
        v.set_step(6)
        assert v.finish_loading(30).city.step == 6 and v.read_error is None
    finally:
        close(v)


def test_a_vocabulary_that_timed_out_is_read_again(tmp_path, network):
    """A time-out while reading the vocabulary fails the frame (to be read again), rather
    than leaving every prediction as a bare id for good, as a corrupt vocabulary does."""
    from tracekit_viewer.source import TraceSource
    from tracekit_viewer.synthetic import WORDS

    path = write_synthetic_trace(tmp_path / "vocab.zarr", n_layers=2, n_positions=8, d_model=8,
                                 n_heads=2, prompt_length=4, vocab=True)
    trace = open_slow(path, network)
    src = TraceSource(trace)
    try:
        network.failure = TraceError("timed out after 30 s reading vocab_bytes/c/0")
        with pytest.raises(TraceError, match="timed out"):
            src.id_text(10)
        network.failure = None
        assert src.id_text(10) == repr(WORDS[10])
    finally:
        src.close()
        trace.close()
