"""Viewer on a slow trace: how long the window's thread is blocked per step change, reading in
the background against reading on the spot.

A synthetic 12-layer x 384-position trace is opened behind a store that waits ``--delay``
seconds before every array read (:mod:`tracekit_viewer.slowstore`, what a trace on HTTP or
object storage looks like). Two off-screen viewers scrub the same random steps, samples
alternating so that machine noise hits both alike:

* baseline: ``update()`` reads on the window's thread (as every viewer did before, and as
  ``tracekit render`` still does);
* background: ``update()`` only asks the fetch thread (as the window does now), then the
  frame is waited for and shown.

Printed per mode: the time the window's thread was blocked in the step change (p50 / p95 /
max), the time until the new frame was on screen, and the reads made; then a scrub across 50
steps, faster than a step can be read, and the reads it made. Ratios are background over
baseline.

    python benchmarks/bench_viewer_slow.py                      # 50 ms per read
    python benchmarks/bench_viewer_slow.py --delay 0.02 --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if sys.platform == "linux" and not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from tracekit_viewer.app import CityViewer  # noqa: E402
from tracekit_viewer.slowstore import Latency, open_slow  # noqa: E402
from tracekit_viewer.state import ViewState  # noqa: E402
from tracekit_viewer.synthetic import write_synthetic_trace  # noqa: E402

SIZE = (800, 600)


def ms(samples: list[float]) -> tuple[float, float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.max())


def open_viewer(path: Path, latency: Latency, background: bool) -> CityViewer:
    viewer = CityViewer(open_slow(path, latency), state=ViewState(step=0, focus=6),
                        off_screen=True, window_size=SIZE, prefetch=False,
                        background=background)
    viewer.screenshot()
    return viewer


def step_change(viewer: CityViewer, latency: Latency, step: int) -> tuple[float, float, int]:
    """(seconds the caller was blocked, seconds until the frame was shown, reads made)."""
    before = len(latency.reads)
    t0 = time.perf_counter()
    viewer.set_step(step)
    blocked = time.perf_counter() - t0
    viewer.finish_loading(120)
    assert viewer.frame.city.step == step
    shown = time.perf_counter() - t0
    return blocked, shown, len(latency.reads) - before


def scrub(viewer: CityViewer, latency: Latency, start: int, count: int) -> tuple[float, int]:
    """Step through ``count`` steps one call after the other, then wait for the last one:
    (seconds until it was shown, reads made)."""
    before = len(latency.reads)
    t0 = time.perf_counter()
    for step in range(start, start + count):
        viewer.set_step(step)
    viewer.finish_loading(600)
    assert viewer.frame.city.step == start + count - 1
    return time.perf_counter() - t0, len(latency.reads) - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.05, help="seconds per array read")
    ap.add_argument("--steps", type=int, default=24, help="random step changes per mode")
    args = ap.parse_args()
    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_trace(Path(tmp) / "slow.zarr", n_layers=12, n_positions=384,
                                     d_model=64, n_heads=4, prompt_length=8, values="random")
        lat = {"baseline": Latency(), "background": Latency()}
        viewers = {m: open_viewer(path, lat[m], m == "background") for m in lat}
        for m in lat:
            lat[m].delay = args.delay
        n = viewers["baseline"].source.n_steps
        rng = np.random.default_rng(0)
        results: dict[str, dict[str, list]] = {m: {"blocked": [], "shown": [], "reads": []}
                                              for m in lat}
        for step in rng.integers(0, n, args.steps):
            for m in lat:  # alternate: the same step, one mode after the other
                blocked, shown, reads = step_change(viewers[m], lat[m], int(step))
                results[m]["blocked"].append(blocked)
                results[m]["shown"].append(shown)
                results[m]["reads"].append(reads)
        scrubs = {m: scrub(viewers[m], lat[m], 1, 50) for m in lat}
        for v in viewers.values():
            trace = v.source.trace
            v.close()
            trace.close()
    print(f"{args.steps} random step changes, {args.delay * 1e3:.0f} ms per read, off-screen "
          f"{SIZE[0]}x{SIZE[1]}, 2x2 views; load average {load0} at start (shared machine)")
    print(f"{'mode':<11} {'UI blocked p50/p95/max ms':>27} {'frame shown p50/p95 ms':>24} "
          f"{'reads/step':>10} {'scrub 50 steps: s, reads':>25}")
    for m in lat:
        b, s = ms(results[m]["blocked"]), ms(results[m]["shown"])
        print(f"{m:<11} {b[0]:>9.1f} / {b[1]:>6.1f} / {b[2]:>6.1f} {s[0]:>13.0f} / "
              f"{s[1]:>6.0f} {np.mean(results[m]['reads']):>10.1f} "
              f"{scrubs[m][0]:>17.2f}, {scrubs[m][1]:>5d}")
    base, bg = results["baseline"], results["background"]
    print(f"ratio background/baseline: UI blocked p50 "
          f"{np.median(bg['blocked']) / np.median(base['blocked']):.4f}x, max "
          f"{max(bg['blocked']) / max(base['blocked']):.4f}x; frame shown p50 "
          f"{np.median(bg['shown']) / np.median(base['shown']):.2f}x; scrub of 50 steps: "
          f"time {scrubs['background'][0] / scrubs['baseline'][0]:.3f}x, reads "
          f"{scrubs['background'][1] / max(1, scrubs['baseline'][1]):.3f}x")


if __name__ == "__main__":
    main()
