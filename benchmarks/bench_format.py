"""Format benchmark: streaming writes and random-position reads against raw baselines.

A synthetic trace (default 4096 positions x 25 residual points x d_model 10240, float16: 2 GiB)
is written one position at a time through tracekit's writer, for each backend with and without
compression. In the same run, the same bytes are appended to a plain file (write baseline) and
read back through np.memmap (read baseline). Prints throughput and latency with ratios.

    python benchmarks/bench_format.py --repeat 2      # the README table (2 GiB, ~5 min)
    python benchmarks/bench_format.py --positions 512 # quick look
    python benchmarks/bench_format.py --configs zarr,hdf5   # uncompressed, norms given only

Reads are timed twice over the same random positions in one open trace: the first pass
touches most chunks for the first time (tracekit then reads the whole chunk once to verify its
checksum), the second reads chunks already verified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import tracekit
from tracekit import ModelInfo, TracePlan


def make_rows(n_distinct: int, points: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_distinct, 1, points, d), dtype=np.float32).astype(np.float16)


def settle() -> None:
    """Start each timed write with no dirty pages left by the previous one (untimed)."""
    os.sync()


def bench_raw_write(path: Path, rows: np.ndarray, positions: int) -> float:
    settle()
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for p in range(positions):
            fh.write(memoryview(rows[p % len(rows)]))  # no copy: the best plain append
    return time.perf_counter() - t0


def bench_trace_write(path: Path, rows: np.ndarray, positions: int, compression: str | None,
                      precomputed: bool) -> float:
    _, _, points, d = rows.shape
    model = ModelInfo(name="synthetic", n_layers=points - 1, d_model=d, n_heads=1,
                      vocab_size=50000)
    plan = TracePlan(model=model, max_positions=positions, captured=frozenset({"residual"}),
                     compression=compression)
    norms = [np.linalg.norm(r.astype(np.float32), axis=-1) for r in rows]
    settle()
    t0 = time.perf_counter()
    with tracekit.create(path, plan) as w:
        for p in range(positions):
            arrays = {"residual": rows[p % len(rows)]}
            if precomputed:  # what the recorder does (computed in torch on the device)
                arrays["residual_norm"] = norms[p % len(rows)]
            w.write_step([p % 50000], [b"t"], arrays)
    return time.perf_counter() - t0


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def bench_raw_read(path: Path, positions: int, row_shape, order) -> tuple[float, float]:
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=(positions, *row_shape))
    times = []
    for p in order:
        t0 = time.perf_counter()
        np.array(mm[p])
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def bench_trace_read(path: Path, order) -> tuple[float, float, float]:
    """p50 and p95 of the first pass of reads, p95 of the second pass (same positions)."""
    first: list[float] = []
    again: list[float] = []
    with tracekit.open(path) as t:
        arr = t["residual"]
        arr[0]
        for times in (first, again):
            for p in order:
                t0 = time.perf_counter()
                arr[p]
                times.append(time.perf_counter() - t0)
    return (*percentiles(first), percentiles(again)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--points", type=int, default=25)
    ap.add_argument("--d-model", type=int, default=10240)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=1,
                    help="write each config (and its raw baseline) this many times; keep the "
                         "fastest of each")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--configs", default="zarr,zarr-zstd,hdf5,hdf5-gzip",
                    help="which of zarr, zarr-zstd, hdf5, hdf5-gzip to run (comma separated)")
    ap.add_argument("--norms", choices=("both", "given"), default="both",
                    help="uncompressed configs: with norms given and computed by the writer "
                         "(both), or given only")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tk-bench-", dir=args.dir))
    rows = make_rows(8, args.points, args.d_model)
    total = args.positions * rows[0].nbytes
    order = np.random.default_rng(1).integers(0, args.positions, args.reads)
    print(f"{args.positions} positions x {args.points} points x d {args.d_model} float16 = "
          f"{total / 2**30:.2f} GiB, one position per write; {args.reads} random reads")
    raw = root / "raw.bin"

    def raw_write() -> float:
        secs = bench_raw_write(raw, rows, args.positions)
        raw.unlink()
        return secs

    try:
        bench_raw_write(raw, rows, args.positions)
        r50, r95 = bench_raw_read(raw, args.positions, rows.shape[1:], order)
        raw.unlink()
        print("\n| config | write MB/s | raw append MB/s (just before) | write vs raw | "
              "read p50 ms | read p95 ms | p95 vs np.memmap | read again p95 ms | "
              "again vs np.memmap |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| raw append / np.memmap | | | 1.00x | {r50:.2f} | {r95:.2f} | 1.00x | "
              f"{r95:.2f} | 1.00x |")
        configs = [(c.split("-")[0], c.split("-")[1] if "-" in c else None)
                   for c in args.configs.split(",")]
        for fmt, comp in configs:
            # The writer's own norm computation is measured on the uncompressed configs.
            both = comp is None and args.norms == "both"
            for pre in ((True, False) if both else (True,)):
                path = root / ("t.zarr" if fmt == "zarr" else "t.h5")
                # The page cache and the disk behind it drift on a shared machine: each
                # config is compared with a raw append of the same bytes made just before it.
                raw_s = secs = float("inf")
                for _ in range(max(1, args.repeat)):
                    raw_s = min(raw_s, raw_write())
                    if path.exists():
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                    secs = min(secs, bench_trace_write(path, rows, args.positions, comp, pre))
                mbs, raw_mbs = total / secs / 1e6, total / raw_s / 1e6
                p50, p95, again = bench_trace_read(path, order)
                label = f"{fmt}, {comp or 'uncompressed'}, " + (
                    "norms given" if pre else "norms computed by writer")
                size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else (
                    path.stat().st_size)
                print(f"| {label} ({size / total:.2f}x size) | {mbs:.0f} | {raw_mbs:.0f} | "
                      f"{mbs / raw_mbs:.2f}x | {p50:.2f} | {p95:.2f} | {p95 / r95:.2f}x | "
                      f"{again:.2f} | {again / r95:.2f}x |", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmachine: {os.cpu_count()} cores, load average {load}; targets: write >= 0.5x raw, "
          f"read p95 <= 3x raw")


if __name__ == "__main__":
    main()
