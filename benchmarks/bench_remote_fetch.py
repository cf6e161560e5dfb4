"""How long one step's ranged reads take from a remote trace when every request costs a fixed
latency: N random ranged reads in one ``fetch`` (issued concurrently) against the same reads
one ``fetch`` each (one after another, the baseline), alternated in the same run.

Servers are on loopback: moto's S3 server (``s3://``) and a plain HTTP file server, each
behind a latency of ``--latency`` seconds per request (the fault proxy / the server's own).
Printed: medians of each, their ratio, and the floor of the sequential way (N x latency); the
requests and bytes the server saw against the bytes asked for.

    python benchmarks/bench_remote_fetch.py                      # 32 reads of 64 KiB, 20 ms each
    python benchmarks/bench_remote_fetch.py --reads 40 --size 16384 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import FaultProxy, HTTPFileServer, S3Server  # noqa: E402

from tracekit.storage._remote import open_remote  # noqa: E402
from tracekit.storage._source import Read  # noqa: E402


def reads_for(rng: np.random.Generator, object_size: int, count: int, size: int) -> list[Read]:
    offsets = rng.integers(0, object_size - size, count)
    return [Read("data.bin", int(o), np.empty(size, np.uint8)) for o in offsets]


def run(src, server, label: str, args: argparse.Namespace, object_size: int) -> None:
    rng = np.random.default_rng(0)
    src.size("data.bin")  # connect first
    concurrent, sequential = [], []
    for _ in range(args.rounds):
        reads = reads_for(rng, object_size, args.reads, args.size)
        server.reset_stats()
        t = time.perf_counter()
        src.fetch(reads)
        concurrent.append(time.perf_counter() - t)
        stats = server.reset_stats()
        reads = reads_for(rng, object_size, args.reads, args.size)
        t = time.perf_counter()
        for r in reads:
            src.fetch([r])
        sequential.append(time.perf_counter() - t)
    c, s = statistics.median(concurrent), statistics.median(sequential)
    floor = args.reads * args.latency
    print(f"{label}: {args.reads} reads of {args.size} B, {args.latency * 1000:g} ms/request: "
          f"one fetch {c:.3f} s, one fetch per read {s:.3f} s (x{s / c:.1f}); "
          f"one fetch = {c / floor:.2f} x ({args.reads} x latency = {floor:.2f} s); "
          f"server saw {stats.count} requests, {stats.bytes_sent} B for "
          f"{args.reads * args.size} B asked, max {stats.max_in_flight} at once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=32)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--object-mb", type=int, default=64)
    args = parser.parse_args()
    data = np.random.default_rng(1).integers(0, 256, args.object_mb << 20, np.uint8).tobytes()

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t").mkdir()
        (Path(tmp) / "t" / "data.bin").write_bytes(data)
        with HTTPFileServer(tmp, latency=args.latency) as http, \
                open_remote(f"{http.url}/t") as src:
            run(src, http, "http", args, len(data))

    s3 = S3Server()
    try:
        os.environ.update(s3.env())
        s3.client().create_bucket(Bucket="bench")
        s3.client().put_object(Bucket="bench", Key="t.zarr/data.bin", Body=data)
        with FaultProxy(s3.endpoint, latency=args.latency) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            with open_remote("s3://bench/t.zarr") as src:
                run(src, proxy, "s3 (moto behind the proxy)", args, len(data))
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
