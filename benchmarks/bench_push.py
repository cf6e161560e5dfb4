"""What verification costs a push, and what memory a large single file takes while pushed.

Against moto's S3 server on loopback (tests/servers.py), so throughput is moto's, not a real
store's; the ratios are what to read. Printed:

* a many-file zarr trace (the demo sample, and a larger synthetic one) pushed with and without
  read-back verification, alternating, medians over ``--runs``: verify / no-verify; and the
  demo pushed with ``jobs`` 1 and 8;
* a large single file (a packed trace: a zip whose members are a trace's files, the large one
  random bytes) of ``--big-mib``, pushed once each way in a child process: time, and the
  child's peak RSS against the same child's peak after importing everything and pushing a tiny
  file (the baseline). Streaming keeps the difference near PARTS_IN_FLIGHT x PART_SIZE,
  whatever the file's size.

    python benchmarks/bench_push.py                 # 3 runs, 1024 MiB file
    python benchmarks/bench_push.py --big-mib 256 --runs 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tracegen  # noqa: E402
from servers import s3_server  # noqa: E402

from tracekit import push as push_module  # noqa: E402

BUCKET = "bench"


def make_pack(path: Path, nbytes: int) -> None:
    """A zip of a trace's root metadata and one large stored member of random bytes."""
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {"tracekit": {"status": "complete"}}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr("zarr.json", json.dumps(meta))
        with z.open("residual/c.0.0.0", "w", force_zip64=True) as member:
            block = os.urandom(16 * 2**20)
            for _ in range(nbytes // len(block)):
                member.write(block)


def _child(src: str, url: str, verify: bool, env: dict, out) -> None:
    import resource

    os.environ.update(env)
    t = time.perf_counter()
    push_module.push(src, url, verify=verify, force=True)
    out.put((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def in_child(src: Path, url: str, verify: bool, env: dict) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one push in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(src), url, verify, env, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"the push in a child process failed (exit {p.exitcode})")
    return q.get(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        tmp = Path(tmp)
        os.environ.update(s3.env())
        s3.client().create_bucket(Bucket=BUCKET)
        synthetic = tmp / "synthetic.zarr"
        plan = tracegen.small_plan(max_positions=256, chunk_bytes=64 * 1024,
                                   model=tracegen.small_model(n_layers=6, d_model=256,
                                                              n_heads=4, d_mlp=256))
        tracegen.write_synthetic(synthetic, plan, seed=1)
        print("many-file traces (moto on loopback; medians of alternating runs)")
        print(f"{'trace':<22} {'files':>6} {'MB':>7} {'no-verify s':>12} {'verify s':>9} "
              f"{'ratio':>6}")
        for name, src in (("demo_fibonacci.zarr", ROOT / "sample_traces/demo_fibonacci.zarr"),
                          ("synthetic.zarr", synthetic)):
            times: dict[bool, list[float]] = {False: [], True: []}
            for run in range(args.runs):
                for verify in (False, True):
                    url = f"s3://{BUCKET}/{name}-{run}-{verify}"
                    t = time.perf_counter()
                    done = push_module.push(src, url, verify=verify)
                    times[verify].append(time.perf_counter() - t)
            plain, checked = (statistics.median(times[v]) for v in (False, True))
            print(f"{name:<22} {done['objects']:>6} {done['bytes'] / 1e6:>7.1f} "
                  f"{plain:>12.2f} {checked:>9.2f} {checked / plain:>5.2f}x")

        demo = ROOT / "sample_traces/demo_fibonacci.zarr"
        by_jobs: dict[int, list[float]] = {1: [], 8: []}
        for run in range(args.runs):
            for jobs in by_jobs:
                t = time.perf_counter()
                push_module.push(demo, f"s3://{BUCKET}/jobs-{jobs}-{run}", jobs=jobs,
                                 verify=False)
                by_jobs[jobs].append(time.perf_counter() - t)
        one, eight = (statistics.median(by_jobs[j]) for j in (1, 8))
        print(f"demo, no verify: --jobs 1 {one:.2f} s, --jobs 8 {eight:.2f} s: "
              f"{one / eight:.2f}x faster")

        tiny, big = tmp / "tiny.zip", tmp / "big.zip"
        make_pack(tiny, 16 * 2**20)
        make_pack(big, args.big_mib * 2**20)
        env = s3.env()
        base_t, base_rss = in_child(tiny, f"s3://{BUCKET}/tiny.zip", True, env)
        print(f"\nsingle file of {big.stat().st_size / 2**20:.0f} MiB (part size "
              f"{push_module.PART_SIZE >> 20} MiB, {push_module.PARTS_IN_FLIGHT} in flight); "
              f"baseline: a 16 MiB file, peak RSS {base_rss / 1024:.0f} MiB")
        print(f"{'verify':<8} {'seconds':>8} {'MB/s':>7} {'peak RSS MiB':>13} "
              f"{'over baseline':>14} {'x file size':>12}")
        results = {}
        for verify in (False, True):
            secs, rss = in_child(big, f"s3://{BUCKET}/big.zip", verify, env)
            results[verify] = secs
            extra = (rss - base_rss) / 1024
            print(f"{verify!s:<8} {secs:>8.1f} {big.stat().st_size / 1e6 / secs:>7.0f} "
                  f"{rss / 1024:>13.0f} {extra:>14.0f} "
                  f"{extra * 2**20 / big.stat().st_size:>11.2f}x")
        print(f"verify / no-verify: {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
