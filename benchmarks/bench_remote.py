"""Remote scrub benchmark: a >= 1 GB trace read where it lies, the way the viewer reads it.

A synthetic trace (24 layers, d_model 4096, 4 heads, float16, random values; sized to
``--gb``) is written once, then served on loopback, every request delayed by ``--latency``
(20 ms) on the way:

* ``s3 zarr``: the zarr folder in a bucket of moto's S3 server, uploaded with ``tracekit
  push``, read through a latency proxy;
* ``http zarr`` / ``http pack`` / ``http hdf5``: the folder, its pack and its HDF5
  conversion on a plain HTTP file server with the same latency. (moto reads a whole object
  for every ranged GET, so single-file traces of a GB are served over HTTP instead.)

Each target is opened and scrubbed over the same ``--steps`` random steps, each with a random
focused floor and traced token: per step the viewer's reads (``TraceSource`` +
``compute_frame``, no drawing). Printed per target: requests and seconds to open; bytes
fetched over bytes needed (what the same scrub reads from the local trace through the same
code, counted at the storage seam); p50/p95 step latency against the local trace (baseline,
same run) and against downloading the whole trace first; the process RSS after the scrub.

    python benchmarks/bench_remote.py                  # 1 GB, 50 steps, 20 ms per request
    python benchmarks/bench_remote.py --gb 0.2 --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import S3_ENV, FaultProxy, HTTPFileServer, s3_server  # noqa: E402
from tracekit_viewer.frame import compute_frame  # noqa: E402
from tracekit_viewer.scene import CityLayout, fit_layout  # noqa: E402
from tracekit_viewer.source import TraceSource  # noqa: E402
from tracekit_viewer.state import ViewState  # noqa: E402
from tracekit_viewer.synthetic import synthetic_plan, write_synthetic_trace  # noqa: E402

import tracekit  # noqa: E402
from tracekit.push import push  # noqa: E402
from tracekit.reader import Trace  # noqa: E402
from tracekit.storage import open_backend, open_source  # noqa: E402
from tracekit.storage._source import Source  # noqa: E402

SHAPE = {"n_layers": 24, "d_model": 4096, "n_heads": 4}


class CountingSource(Source):
    """A source that counts the bytes read through it (the scrub's needs, read locally)."""

    def __init__(self, inner: Source) -> None:
        self.inner, self.location, self.local_path = inner, inner.location, inner.local_path
        self.bytes = 0

    def get(self, key, cap):
        data = self.inner.get(key, cap)
        self.bytes += len(data or b"")
        return data

    def fetch(self, reads):
        self.inner.fetch(reads)
        self.bytes += sum(r.out.nbytes for r in reads if r.found)

    def size(self, key):
        return self.inner.size(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def close(self):
        self.inner.close()


def positions_for(gb: float) -> int:
    """Positions that make the trace about ``gb`` GB on disk (the plan's own estimate)."""
    lo, hi = 64, 1 << 16
    while lo < hi:
        mid = (lo + hi) // 2
        if synthetic_plan(n_positions=mid, **SHAPE).estimated_bytes("zarr") < gb * 1e9:
            lo = mid + 1
        else:
            hi = mid
    return lo


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_traces(folder: Path, gb: float) -> dict[str, Path]:
    """The zarr trace, its pack and its HDF5 copy (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    zarr_path = folder / "big.zarr"
    stamp = folder / "big.json"
    want = {"gb": gb, **SHAPE}
    if not (zarr_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == want):
        t0 = time.perf_counter()
        write_synthetic_trace(zarr_path, n_positions=positions_for(gb), prompt_length=16,
                              values="random", overwrite=True, vocab=True, **SHAPE)
        for old in (folder / "big.pack", folder / "big.h5"):
            old.unlink(missing_ok=True)
        stamp.write_text(json.dumps(want))
        print(f"wrote {zarr_path} ({disk_bytes(zarr_path) / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    paths = {"zarr": zarr_path, "pack": folder / "big.pack", "hdf5": folder / "big.h5"}
    if not paths["pack"].exists():
        from tracekit.pack import pack

        pack(zarr_path, paths["pack"])
    if not paths["hdf5"].exists():
        from tracekit.convert import convert

        convert(zarr_path, paths["hdf5"])
    return paths


def plan_steps(trace: tracekit.Trace, count: int, seed: int = 3) -> list[ViewState]:
    """Random steps, each with a random focused floor and a traced token it shows."""
    rng = np.random.default_rng(seed)
    source = TraceSource(trace)
    states = []
    for s in rng.integers(0, source.n_steps, count):
        end = source.step_range(int(s)).stop
        states.append(ViewState(step=int(s), focus=int(rng.integers(0, source.n_floors)),
                                traced=int(rng.integers(0, end))))
    source.close()
    return states


def scrub(trace: tracekit.Trace, states: list[ViewState]) -> list[float]:
    """Seconds per step, each the viewer's reads for that frame (cache as the viewer's)."""
    source = TraceSource(trace)
    layout = fit_layout(min(CityLayout().window, source.n_positions), source.n_floors)
    times = []
    for state in states:
        t0 = time.perf_counter()
        compute_frame(source, state, layout, panels=True)
        times.append(time.perf_counter() - t0)
    source.close()
    return times


def rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 1e6


def ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q))


def measure_remote(label: str, url: str, server, states, options: dict) -> dict:
    server.reset_stats()
    t0 = time.perf_counter()
    trace = tracekit.open(url, storage_options=options)
    opened = time.perf_counter() - t0
    open_stats = server.reset_stats()
    times = scrub(trace, states)
    stats = server.reset_stats()
    trace.close()
    return {"label": label, "open_requests": open_stats.count, "open_s": opened,
            "fetched": stats.bytes_sent, "requests": stats.count, "times": times,
            "rss_mb": rss_mb()}


def measure_local(path: Path, states) -> dict:
    counting = CountingSource(open_source(path))
    t0 = time.perf_counter()
    trace = Trace(open_backend(counting), path)
    opened = time.perf_counter() - t0
    counting.bytes = 0
    times = scrub(trace, states)
    needed = counting.bytes
    trace.close()
    return {"open_s": opened, "times": times, "needed": needed}


def download(url: str, to: Path, options: dict) -> float:
    """Seconds to copy the whole trace from ``url`` to ``to`` (fsspec, concurrently)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    t0 = time.perf_counter()
    fs.get(path, str(to), recursive=fs.isdir(path))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="trace size on disk")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added per request")
    ap.add_argument("--dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "tracekit-bench-remote")
    args = ap.parse_args()

    paths = ensure_traces(args.dir, args.gb)
    with tracekit.open(paths["zarr"]) as t:
        states = plan_steps(t, args.steps)
        desc = (f"{t.n_positions} positions x {len(t.layers)} layers x d_model "
                f"{t.model['d_model']}, {disk_bytes(paths['zarr']) / 1e9:.2f} GB")
    print(f"trace: {desc}; {args.steps} random steps; {args.latency * 1e3:g} ms per request",
          flush=True)
    rows, local = [], {}
    for kind in ("zarr", "pack", "hdf5"):
        local[kind] = measure_local(paths[kind], states)

    os.environ.update(S3_ENV)
    with s3_server() as s3, FaultProxy(s3.endpoint, latency=args.latency) as proxy:
        s3.client().create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        push(paths["zarr"], "s3://bench/big.zarr",
                      storage_options={"endpoint_url": s3.endpoint}, verify=False)
        print(f"pushed to moto in {time.perf_counter() - t0:.0f} s", flush=True)
        options = {"endpoint_url": proxy.url}
        rows.append(("s3 zarr", "zarr", measure_remote("s3 zarr", "s3://bench/big.zarr",
                                                       proxy, states, options)))
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            proxy.reset_stats()
            whole_s3 = download("s3://bench/big.zarr", Path(tmp) / "copy.zarr", options)
    with HTTPFileServer(args.dir, latency=args.latency) as http:
        for kind, name in (("zarr", "big.zarr"), ("pack", "big.pack"), ("hdf5", "big.h5")):
            rows.append((f"http {kind}", kind, measure_remote(
                f"http {kind}", f"{http.url}/{name}", http, states, {})))
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            whole_http = download(f"{http.url}/big.h5", Path(tmp) / "copy.h5", {})

    print()
    print("| target | open: requests, time | fetched / needed | step p50 / p95 | local step "
          "p50 / p95 (ratio) | first frame: remote / download whole first | 50 steps: remote / "
          "download first | RSS after |")
    print("|---|---|---|---|---|---|---|---|")
    for label, kind, r in rows:
        base = local[kind]
        whole = whole_s3 if label.startswith("s3") else whole_http
        p50, p95 = ms(r["times"], 50), ms(r["times"], 95)
        l50, l95 = ms(base["times"], 50), ms(base["times"], 95)
        scrubbed = r["open_s"] + sum(r["times"])
        downloaded = whole + base["open_s"] + sum(base["times"])
        first = r["open_s"] + r["times"][0]
        first_after = whole + base["open_s"] + base["times"][0]
        print(f"| {label} | {r['open_requests']}, {r['open_s']:.2f} s | "
              f"{r['fetched'] / 1e6:.1f} / {base['needed'] / 1e6:.1f} MB = "
              f"{r['fetched'] / max(1, base['needed']):.2f}x | {p50:.0f} / {p95:.0f} ms | "
              f"{l50:.1f} / {l95:.1f} ms ({p50 / l50:.0f}x / {p95 / l95:.0f}x) | "
              f"{first:.1f} s / {first_after:.1f} s (download {whole:.1f} s) | "
              f"{scrubbed:.1f} s / {downloaded:.1f} s | {r['rss_mb']:.0f} MB |")
    print(f"\nsteps scrubbed: {args.steps}; local open {local['zarr']['open_s'] * 1e3:.0f} ms "
          f"(zarr)")


if __name__ == "__main__":
    main()
