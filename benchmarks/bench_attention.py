"""Attention benchmark: bytes on disk and read latency of a causal trace's attention array.

A synthetic causal trace (the embedded demo model's shape by default: 4 layers x 4 heads,
float16) is written one position per step, in each format. Reported per length and format:

* bytes  - the attention array's chunks on disk (HDF5: the whole pages it gives them), and that
           over the causal triangle the array holds (the floor: 1.00x);
* step   - one position, every layer, head and key (``trace["attention"][p]``, what a step of
           the timeline reads), p50/p95 over random positions, and its ratio to the same read
           from a dense raw file through ``np.memmap`` (the baseline, measured in the same run);
* block  - the viewer's attention-panel block (16 queries x one layer x every head x 256 keys).

Files are read warm (the page cache holds them): the cost measured is tracekit's, not the
disk's. Usage::

    python benchmarks/bench_attention.py                       # 500 and 4000 positions
    python benchmarks/bench_attention.py --lengths 500 --reads 200

Runs with whichever tracekit is importable, so a layout can be compared with an older one by
running the script with that version on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import tracekit
from tracekit import ModelInfo, TracePlan


def write_trace(path: Path, positions: int, layers: int, heads: int) -> np.memmap:
    """Write the trace and, beside it, the dense attention as a raw file (the baseline)."""
    model = ModelInfo("synthetic", layers, 64, heads, 1000, kind="causal")
    plan = TracePlan(model=model, max_positions=positions,
                     captured=frozenset({"residual", "attention"}))
    rng = np.random.default_rng(0)
    pool = (rng.random((1, layers, heads, positions), dtype=np.float32) + 0.01).astype(np.float16)
    residual = np.zeros((1, layers + 1, 64), np.float16)
    dense = np.memmap(path.with_suffix(".raw"), dtype=np.float16, mode="w+",
                      shape=(positions, layers, heads, positions))
    with tracekit.create(path, plan) as w:
        for p in range(positions):
            row = pool[..., : p + 1]
            dense[p, ..., : p + 1] = row[0]
            w.write_step([p % 1000], [b"t"], {"residual": residual, "attention": row})
    dense.flush()
    return np.memmap(path.with_suffix(".raw"), dtype=np.float16, mode="r",
                     shape=(positions, layers, heads, positions))


def attention_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in (path / "attention").iterdir()
                   if f.name != "zarr.json")
    import h5py

    with h5py.File(path, "r") as f:
        ds = f["attention"].id
        return sum(-(-ds.get_chunk_info(i).size // 4096) * 4096
                   for i in range(ds.get_num_chunks()))


def timed(read, keys) -> tuple[float, float]:
    times = []
    for k in keys:
        t0 = time.perf_counter()
        read(k)
        times.append(time.perf_counter() - t0)
    a = np.asarray(times) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="500,4000")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-attention-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tracekit {tracekit.__file__}")
    print("| positions | format | chunks | attention bytes | / triangle | step p50/p95 ms | "
          "x raw | block p50/p95 ms | x raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for positions in (int(x) for x in args.lengths.split(",")):
            rng = np.random.default_rng(1)
            steps = rng.integers(0, positions, args.reads)
            blocks = [(int(q), int(k)) for q, k in zip(
                rng.integers(0, max(1, positions - 16), args.reads),
                rng.integers(0, max(1, positions - 256), args.reads), strict=True)]
            tri = positions * (positions + 1) // 2 * args.layers * args.heads * 2
            for fmt, suffix in (("zarr", ".zarr"), ("hdf5", ".h5")):
                path = work / f"a{positions}{suffix}"
                dense = write_trace(path, positions, args.layers, args.heads)
                with tracekit.open(path) as t:
                    att = t["attention"]
                    for p in steps[:20]:  # warm the page cache and both code paths
                        att[int(p)]
                        np.array(dense[int(p)])
                    step = timed(lambda p, a=att: a[int(p)], steps)
                    step_raw = timed(lambda p, d=dense: np.array(d[int(p)]), steps)
                    block = timed(lambda qk, a=att: a[qk[0]:qk[0] + 16, 1, :,
                                                      qk[1]:qk[1] + 256], blocks)
                    block_raw = timed(lambda qk, d=dense: np.array(
                        d[qk[0]:qk[0] + 16, 1, :, qk[1]:qk[1] + 256]), blocks)
                    assert np.array_equal(att[int(steps[0])], dense[int(steps[0])])
                    chunks = "x".join(str(c) for c in att.chunks)
                size = attention_bytes(path)
                print(f"| {positions} | {fmt} | {chunks} | {size / 1e6:.2f} MB | "
                      f"{size / tri:.2f}x | {step[0]:.3f} / {step[1]:.3f} | "
                      f"{step[0] / step_raw[0]:.1f}x | {block[0]:.3f} / {block[1]:.3f} | "
                      f"{block[0] / block_raw[0]:.1f}x |", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                path.with_suffix(".raw").unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
