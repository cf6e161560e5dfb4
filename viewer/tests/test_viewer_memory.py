"""Scrubbing a trace many times larger than the viewer's cache keeps its memory flat."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from tracekit_viewer.app import CityViewer
from tracekit_viewer.state import ViewState
from tracekit_viewer.synthetic import write_synthetic_trace

CACHE = 4 << 20


def test_scrubbing_a_large_trace_keeps_memory_flat(tmp_path):
    psutil = pytest.importorskip("psutil")
    # ~45 MB on disk: 11x the cache, 768 positions x 8 layers x 256 wide, 4 heads
    path = write_synthetic_trace(tmp_path / "big.zarr", n_layers=8, n_positions=768,
                                 d_model=256, n_heads=4, values="random", prompt_length=16)
    proc = psutil.Process()
    rng = np.random.default_rng(0)
    with CityViewer(str(path), state=ViewState(focus=3, traced=5), off_screen=True,
                    window_size=(240, 180), cache_bytes=CACHE, prefetch=False) as v:
        n = v.source.n_steps

        def scrub(count: int) -> None:
            for _ in range(count):
                step = int(rng.integers(0, n))
                v.set_state(step=step, traced=int(rng.integers(0, v.source.step_range(step).stop)),
                            focus=int(rng.integers(0, 8)),
                            heads=["mean", "max", 0, 3][int(rng.integers(0, 4))])
                v.screenshot()
                assert v.source.cache.nbytes <= CACHE

        scrub(8)  # warm up: VTK buffers, caches, allocator pools
        gc.collect()
        before = proc.memory_info().rss
        scrub(24)
        gc.collect()
        grown = proc.memory_info().rss - before
    print(f"RSS grew by {grown / 2**20:.1f} MiB over 24 random scrubs")
    assert grown < 12 << 20, f"RSS grew by {grown / 2**20:.1f} MiB while scrubbing"
