"""Viewer benchmark: frame updates against a bare PyVista scene, and memory against trace size.

1. Frame update. A synthetic 24-layer x 512-position trace is scrubbed to random steps; each
   sample is "set the step, render" (the viewer reads, computes and updates its meshes). In the
   same run, a bare PyVista scene with the same number of box glyphs and line segments (built
   once, scalars changed in place each frame) is rendered; the ratio is the viewer's cost over
   a scene that does nothing but draw. Samples alternate between the two, so machine noise hits
   both alike.
2. Memory. A fresh process opens the viewer (2x2 views, a focused layer, a traced token) on a
   0.1 GB and on a >= 4 GB trace and scrubs random steps; the ratio of their RSS shows whether
   memory follows the trace size (it should not).

    python benchmarks/bench_viewer.py                # the README table (writes ~4.2 GB to /tmp)
    python benchmarks/bench_viewer.py --big-gb 0     # frame timings and the small trace only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if sys.platform == "linux" and not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from tracekit_viewer.synthetic import write_synthetic_trace  # noqa: E402

import tracekit  # noqa: E402

SIZE = (1024, 768)


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_trace(path: Path, **kwargs) -> Path:
    """Write the synthetic trace unless an identical one is already there."""
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == kwargs:
        return path
    t0 = time.perf_counter()
    write_synthetic_trace(path, values="random", overwrite=True, **kwargs)
    stamp.write_text(json.dumps(kwargs))
    print(f"  wrote {path} ({disk_bytes(path) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return path


# -- frame timings ----------------------------------------------------------------------------
class BareScene:
    """The same number of boxes and line segments as a viewer frame, and nothing else."""

    def __init__(self, n_boxes: int, n_line_points: int, n_lines: int, panels: bool) -> None:
        import pyvista as pv

        theme = pv.themes.DarkTheme()
        theme.multi_samples = 0
        shape = (2, 2) if panels else (1, 1)
        self.plotter = pv.Plotter(off_screen=True, window_size=SIZE, theme=theme, shape=shape)
        rng = np.random.default_rng(0)
        side = int(np.ceil(np.sqrt(n_boxes)))
        centres = np.stack([np.arange(n_boxes) % side, np.zeros(n_boxes),
                            3.0 * (np.arange(n_boxes) // side)], axis=1).astype(float)
        cloud = pv.PolyData(centres)
        cloud["h"] = rng.random(n_boxes)
        self.boxes = cloud.glyph(geom=pv.Cube(x_length=0.7, y_length=0.7, z_length=1.0),
                                 scale=False, orient=False)
        self.box_values = self.boxes["h"]
        self.plotter.add_mesh(self.boxes, scalars="h", cmap="viridis", show_scalar_bar=False)
        per = max(2, n_line_points // max(1, n_lines))
        pts = rng.random((n_lines * per, 3)) * [side, 2.0, 3.0 * (n_boxes // side)]
        lines = np.concatenate([np.full((n_lines, 1), per),
                                np.arange(n_lines * per).reshape(n_lines, per)], axis=1)
        self.lines = pv.PolyData(pts, lines=lines.ravel())
        self.lines.cell_data["w"] = rng.random(n_lines)
        self.plotter.add_mesh(self.lines, scalars="w", cmap="plasma", show_scalar_bar=False)
        if panels:  # three heatmaps, as the viewer's linked views
            for r, c in ((0, 1), (1, 0), (1, 1)):
                self.plotter.subplot(r, c)
                img = pv.ImageData(dimensions=(49, 49, 1))
                img.cell_data["v"] = rng.random(48 * 48)
                self.plotter.add_mesh(img, scalars="v", show_scalar_bar=False)
            self.plotter.subplot(0, 0)
        self.plotter.screenshot(return_img=True)
        self.rng = rng

    def frame(self) -> None:
        self.box_values[:] = self.rng.random(len(self.box_values))
        self.boxes.GetPointData().GetArray("h").Modified()
        self.plotter.render()

    def close(self) -> None:
        self.plotter.close()


def scene_counts(viewer) -> tuple[int, int, int]:
    """(boxes, line points, line cells) the viewer drew in its last frame."""
    return viewer.scene_size()


def bench_frames(trace: Path, frames: int, panels: bool) -> dict:
    from tracekit_viewer.app import CityViewer
    from tracekit_viewer.state import ViewState

    viewer = CityViewer(str(trace), state=ViewState(focus=12 if panels else None),
                        off_screen=True, window_size=SIZE, panels=panels, widgets=panels,
                        prefetch=False)
    viewer.screenshot()
    rng = np.random.default_rng(1)
    n = viewer.source.n_steps
    counts = []
    for s in rng.integers(0, n, 5):  # warm caches and GL buffers, measure the scene size
        viewer.set_step(int(s))
        viewer.plotter.render()
        counts.append(scene_counts(viewer))
    boxes, pts, cells = (int(np.mean(c)) for c in zip(*counts, strict=True))
    bare = BareScene(boxes, pts, cells, panels)
    for _ in range(3):
        bare.frame()
    v_times, b_times = [], []
    for s in rng.integers(0, n, frames):
        t0 = time.perf_counter()
        viewer.set_step(int(s))
        viewer.plotter.render()
        v_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare.frame()
        b_times.append(time.perf_counter() - t0)
    viewer.close()
    bare.close()
    return {"viewer": percentiles(v_times), "bare": percentiles(b_times), "boxes": boxes,
            "line_points": pts, "lines": cells}


# -- memory -----------------------------------------------------------------------------------
def rss_child(trace: str, frames: int) -> None:
    """Run in a fresh process: open the full viewer, scrub, print the RSS in bytes."""
    import psutil
    from tracekit_viewer.app import CityViewer
    from tracekit_viewer.state import ViewState

    viewer = CityViewer(trace, state=ViewState(focus=12, traced=3), off_screen=True,
                        window_size=SIZE, prefetch=True)
    rng = np.random.default_rng(2)
    n = viewer.source.n_steps
    t0 = time.perf_counter()
    for s in rng.integers(0, n, frames):
        step = int(s)
        end = viewer.source.step_range(step).stop
        viewer.set_state(step=step, traced=int(rng.integers(0, end)),
                         focus=int(rng.integers(0, viewer.source.n_floors)))
        viewer.screenshot()
    elapsed = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss
    print(json.dumps({"rss": rss, "seconds_per_frame": elapsed / frames,
                      "cache": viewer.source.cache.nbytes}))
    viewer.close()


def measure_rss(trace: Path, frames: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(trace), "--frames",
                          str(frames)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tracekit-bench"))
    ap.add_argument("--frames", type=int, default=60, help="timed frames per configuration")
    ap.add_argument("--big-gb", type=float, default=4.0,
                    help="size of the big trace for the memory test (0: skip it)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.frames)
        return
    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    args.dir.mkdir(parents=True, exist_ok=True)
    print("traces", flush=True)
    # 24 layers x 512 positions, d_model 768, 4 heads: ~0.1 GB
    small = ensure_trace(args.dir / "small-24x512.zarr", n_layers=24, n_positions=512,
                         d_model=768, n_heads=4, prompt_length=16)
    rows = []
    print("frame updates", flush=True)
    for panels in (False, True):
        r = bench_frames(small, args.frames, panels)
        label = "2x2 views" if panels else "3D city"
        (v50, v95), (b50, b95) = r["viewer"], r["bare"]
        rows.append(f"| {label}: {r['boxes']} boxes, {r['lines']} lines | "
                    f"{v50:.0f} / {v95:.0f} ms | {b50:.0f} / {b95:.0f} ms | "
                    f"{v50 / b50:.2f}x / {v95 / b95:.2f}x |")
    print("memory", flush=True)
    mem = {"small": (small, measure_rss(small, args.frames))}
    if args.big_gb > 0:
        # 24 layers, d_model 4096, 4 heads: bytes(P) ~ 598016 P (residual, attn_out, mlp_out)
        # + 101 P^2 (causal attention, float16, zero key blocks not stored)
        a, b, c = 101.0, 598016.0, -args.big_gb * 1e9
        positions = int((-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)) + 1
        big = ensure_trace(args.dir / f"big-{args.big_gb:g}gb.zarr", n_layers=24,
                           n_positions=positions, d_model=4096, n_heads=4, prompt_length=16)
        mem["big"] = (big, measure_rss(big, args.frames))
    base = mem["small"][1]["rss"]
    mem_rows = []
    for path, m in mem.values():
        with tracekit.open(path) as t:
            desc = f"{t.n_positions} positions x 24 layers x d_model {t.model['d_model']}"
        mem_rows.append(f"| {disk_bytes(path) / 1e9:.2f} GB ({desc}) | "
                        f"{m['rss'] / 2**20:.0f} MiB | {m['cache'] / 2**20:.0f} MiB | "
                        f"{m['seconds_per_frame'] * 1e3:.0f} ms | {m['rss'] / base:.2f}x |")
    print()
    print(f"| frame update ({SIZE[0]}x{SIZE[1]}, off-screen EGL, {args.frames} random steps) "
          "| viewer p50 / p95 | bare PyVista p50 / p95 | ratio p50 / p95 |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(f"| trace scrubbed ({args.frames} random steps, 2x2 views, focused layer, traced "
          "token) | viewer RSS | cache | time per frame | RSS ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(mem_rows))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmachine: {os.cpu_count()} cores, load average {load} (at the start: {load0}); "
          "targets: frame update <= 1.5x the bare scene, RSS ratio <= 1.2")


if __name__ == "__main__":
    main()
