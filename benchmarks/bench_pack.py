"""Pack benchmark: a trace folder vs the same trace packed into one stored zip.

For each trace (the demo sample, and a larger synthetic one), prints in one run:

* pack time, against copying the folder (``shutil.copytree``) as the baseline;
* pack size against the folder's (bytes of its files, and blocks on disk as ``du`` counts);
* open (root ``zarr.json`` read and parsed) + 50 random positions read, chunk by chunk as
  tracekit's reader fetches them, through ``ZipSource`` over the pack (unaligned, and every
  entry aligned to 4 KiB) against ``LocalDirSource`` over the folder: warm (page cache), and
  cold (each file's cached pages dropped with ``posix_fadvise`` before every trial);
* the same reads through zarr-python alone (``ZipStore`` vs ``LocalStore``), for reference.

Trials alternate folder and packs (order rotated each trial); medians of ``--repeat`` trials. ::

    python benchmarks/bench_pack.py                 # the README table
    python benchmarks/bench_pack.py --positions 500 --repeat 3   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tracegen  # noqa: E402

from tracekit.pack import pack  # noqa: E402
from tracekit.storage._source import LocalDirSource, LocalFileSource  # noqa: E402
from tracekit.storage._zip import ZipSource  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "sample_traces" / "demo_fibonacci.zarr"


def files_of(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names]


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def chunk_reads(meta: dict, position: int) -> list[str]:
    """Keys of every chunk holding ``position`` (some never written: the fill value), as a
    reader of that position's rows fetches them: the chunk along each position axis, every
    chunk along the others."""
    keys = []
    for name, arr in meta["consolidated_metadata"]["metadata"].items():
        if arr.get("node_type") != "array" or "position" not in (arr.get("dimension_names")
                                                                 or []):
            continue
        chunk = arr["chunk_grid"]["configuration"]["chunk_shape"]
        sep = arr["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        axes = []
        for dim, size, c in zip(arr["dimension_names"], arr["shape"], chunk, strict=True):
            if dim == "position":
                if position >= size:
                    break
                axes.append([position // c])
            else:
                axes.append(range(max(1, -(-size // c))))
        else:
            for index in np.ndindex(*[len(a) for a in axes]):
                parts = [str(a[i]) for a, i in zip(axes, index, strict=True)]
                keys.append(f"{name}/c{sep}{sep.join(parts)}")
    return keys


def open_and_read(make: callable, chunks: list[list[str]]) -> float:
    """Open the source, read and parse the root ``zarr.json``, then read every chunk of each
    position (keys worked out beforehand, untimed), each whole as the reader decodes it."""
    t0 = time.perf_counter()
    with make() as source:
        json.loads(source.get("zarr.json", 1 << 24))
        for keys in chunks:
            for key in keys:
                source.get(key, 1 << 30)
    return time.perf_counter() - t0


def zarr_read(store_factory: callable, positions: list[int]) -> float:
    import zarr

    t0 = time.perf_counter()
    group = zarr.open_group(store_factory(), mode="r", use_consolidated=True)
    arr = group["residual"]
    for p in positions:
        arr[p]
    return time.perf_counter() - t0


def du(paths: list[Path]) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def bench(label: str, trace: Path, work: Path, repeat: int, n_reads: int) -> None:
    import zarr

    folder_files = files_of(trace)
    folder_bytes = sum(p.stat().st_size for p in folder_files)
    copy_t, pack_t, packa_t = [], [], []
    plain, aligned = work / "plain.zip", work / "aligned.zip"
    for _ in range(repeat):
        shutil.rmtree(work / "copy.zarr", ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        shutil.copytree(trace, work / "copy.zarr")
        os.sync()
        copy_t.append(time.perf_counter() - t0)
        for out, align, times in ((plain, 0, pack_t), (aligned, 4096, packa_t)):
            t0 = time.perf_counter()
            pack(trace, out, overwrite=True, align=align)
            os.sync()
            times.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    with open(trace / "zarr.json") as f:
        meta = json.load(f)
    n_pos = meta["attributes"]["tracekit"]["length"]["positions"]
    makers = {
        "folder": (lambda: LocalDirSource(trace), folder_files),
        "pack": (lambda: ZipSource(LocalFileSource(plain)), [plain]),
        "pack aligned": (lambda: ZipSource(LocalFileSource(aligned)), [aligned]),
    }
    warm = {k: [] for k in makers}
    cold = {k: [] for k in makers}
    zwarm = {"LocalStore": [], "ZipStore": []}
    order = list(makers)
    for trial in range(repeat):
        positions = [int(p) for p in rng.integers(0, n_pos, n_reads)]
        chunks = [chunk_reads(meta, p) for p in positions]
        for name in order[trial % 3:] + order[:trial % 3]:  # rotated: drift hits all alike
            make, paths = makers[name]
            open_and_read(make, chunks)  # warm the cache
            warm[name].append(open_and_read(make, chunks))
            drop_cache(paths)
            cold[name].append(open_and_read(make, chunks))
        for name, factory in (("LocalStore", lambda: zarr.storage.LocalStore(trace,
                                                                            read_only=True)),
                              ("ZipStore", lambda: zarr.storage.ZipStore(plain, mode="r"))):
            zarr_read(factory, positions)
            zwarm[name].append(zarr_read(factory, positions))
    med = statistics.median
    print(f"\n## {label}: {trace.name}, {len(folder_files)} files, {n_pos} positions")
    print(f"pack time  {med(pack_t) * 1e3:8.1f} ms ({med(pack_t) / med(copy_t):.2f}x copytree "
          f"{med(copy_t) * 1e3:.1f} ms); aligned {med(packa_t) * 1e3:.1f} ms")
    print(f"size       folder {folder_bytes} B in files, {du(folder_files)} B du; pack "
          f"{plain.stat().st_size} B ({plain.stat().st_size / folder_bytes:.3f}x files, "
          f"{du([plain]) / du(folder_files):.3f}x du); aligned {aligned.stat().st_size} B "
          f"({aligned.stat().st_size / folder_bytes:.3f}x files)")
    base_w, base_c = med(warm["folder"]), med(cold["folder"])
    for name in makers:
        print(f"open + {n_reads} positions via {name:<13} warm {med(warm[name]) * 1e3:7.2f} ms "
              f"({med(warm[name]) / base_w:.2f}x)  cold {med(cold[name]) * 1e3:7.2f} ms "
              f"({med(cold[name]) / base_c:.2f}x)")
    zb = med(zwarm["LocalStore"])
    for name, times in zwarm.items():
        print(f"zarr-python {name:<10} open + {n_reads} residual rows warm "
              f"{med(times) * 1e3:7.2f} ms ({med(times) / zb:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2000, help="synthetic trace length")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--reads", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        bench("demo sample", DEMO, work, args.repeat, args.reads)
        syn = work / "synthetic.zarr"
        model = tracegen.small_model(n_layers=6, d_model=256, n_heads=4, d_mlp=1024,
                                     vocab_size=1000)
        plan = tracegen.small_plan(max_positions=args.positions, model=model,
                                   chunk_bytes=256 << 10, top_k=8, attention_top_k=8,
                                   token_bytes=16)
        tracegen.write_synthetic(syn, plan, seed=1)
        bench("synthetic", syn, work, args.repeat, args.reads)


if __name__ == "__main__":
    main()
