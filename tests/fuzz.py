"""A structure-aware fuzzer of everything that reads a trace: ``validate``, ``info`` and
``tracekit.open`` plus reads, on mutated copies of small valid zarr and HDF5 traces.

Mutations know the formats: a value anywhere in a ``zarr.json`` (array metadata, the group's
tracekit metadata, attributes) or in an HDF5 trace's metadata attribute replaced by a hostile
one (huge or negative numbers, wrong types, 100 kB strings, newlines, lone surrogates, Unicode
digits), keys deleted, JSON bytes cut or flipped, chunk files cut, extended, replaced by random
bytes or a decompression bomb, any file replaced by a link (to ``/etc/passwd``,
``/dev/urandom``, inside the trace), a FIFO or a folder, and HDF5 bytes flipped in the
superblock, object headers, heaps and anywhere else.

Each case is a function of ``(seed, index)`` alone, so ``--replay INDEX`` rebuilds it. Cases
run in worker processes under ``RLIMIT_AS`` (4 GiB) with a per-case timeout; a worker that
hangs is killed and one that dies is restarted. Outcomes:

* ``clean``: a TraceError, a one-line CLI error or a ``validate`` problem;
* ``accepted``: everything opened, read and validated (the mutation changed nothing that
  matters, or only values);
* ``traceback`` (another exception, or a CLI error of more than one line), ``hang`` (over the
  timeout), ``signal`` (the worker died) and ``memory`` (MemoryError under the limit): bad.

``python tests/fuzz.py --cases 3000`` runs the manual mode and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTCOMES = ("clean", "accepted", "traceback", "hang", "signal", "memory")
BAD = ("traceback", "hang", "signal", "memory")
MEMORY_LIMIT = 4 << 30
CASE_TIMEOUT_S = 30.0
SEEDS = ("zarr", "zarr-zstd", "hdf5")


# -- valid traces to start from ---------------------------------------------------------------
def make_seeds(root: Path) -> dict[str, Path]:
    """Small valid traces: zarr uncompressed, zarr with zstd chunks, HDF5."""
    sys.path.insert(0, str(HERE))
    import tracegen

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind, suffix, compression in (("zarr", ".zarr", None), ("zarr-zstd", ".zarr", "zstd"),
                                      ("hdf5", ".h5", None)):
        plan = tracegen.small_plan(max_positions=8, compression=compression,
                                   captured=["residual", "attention", "predictions"])
        out[kind] = root / kind / f"trace{suffix}"
        out[kind].parent.mkdir()
        tracegen.write_synthetic(out[kind], plan, seed=5)
    return out


# -- mutations --------------------------------------------------------------------------------
def hostile_values(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, -(2**62), 1.5, float("nan"),
        "", "x" * 100_000, "line\nbreak\r\x1b[2J", "\udc80", "\ud800x", "\u00b2", "\u00b2.0",
        "1.\u00b2", "1.0", "2.0", "int64", "float64", "object", "(100000000000,)i8", "|O",
        "v2", "/", ".", "../../../etc/passwd", "numcodecs.pickle", "zstd", "gzip", "blosc",
        "sharding_indexed", [], {}, [None], [1, 2, 3], [2**40, 4, 8], [0], [-1],
        {"name": "v2"}, {"name": "bytes", "configuration": "little"}, {"name": {"a": 1}},
        [[[[[]]]]], {"configuration": None}, ["position", "point", "hidden"],
    ])


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """One structural change at a random place of a JSON document."""
    paths = _paths(obj)
    if not paths:
        return hostile_values(rng)
    path = rng.choice(paths)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.random()
    if action < 0.2 and isinstance(parent, dict):
        del parent[last]
    elif action < 0.35 and isinstance(parent[last], (int, float)) and not isinstance(
            parent[last], bool):
        parent[last] = rng.choice([parent[last] * 2**20, -parent[last], parent[last] + 1, 0])
    else:
        parent[last] = hostile_values(rng)
    return obj


def _files(trace: Path) -> list[Path]:
    return sorted(p for p in trace.rglob("*") if p.is_file() and not p.is_symlink())


def _json_files(trace: Path) -> list[Path]:
    return [p for p in _files(trace) if p.name == "zarr.json"]


def _chunk_files(trace: Path) -> list[Path]:
    return [p for p in _files(trace) if p.name != "zarr.json"]


def _zstd_bomb(nbytes: int) -> bytes:
    sys.path.insert(0, str(HERE))
    from corruption import zstd_rle_bomb

    return zstd_rle_bomb(nbytes)


def m_zarr_json_value(t: Path, rng: random.Random) -> str:
    f = rng.choice(_json_files(t))
    obj = json.loads(f.read_text())
    if f.parent == t and rng.random() < 0.7:  # mostly the tracekit metadata
        mutate_json(obj["attributes"]["tracekit"], rng)
    else:
        mutate_json(obj, rng)
    f.write_text(json.dumps(obj))
    return f"json value in {f.relative_to(t)}"


def m_zarr_json_bytes(t: Path, rng: random.Random) -> str:
    f = rng.choice(_json_files(t))
    data = bytearray(f.read_bytes())
    if rng.random() < 0.5:
        del data[rng.randrange(len(data)):]
    else:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    f.write_bytes(bytes(data))
    return f"json bytes of {f.relative_to(t)}"


def m_chunk_bytes(t: Path, rng: random.Random) -> str:
    f = rng.choice(_chunk_files(t))
    data = f.read_bytes()
    choice = rng.randrange(5)
    if choice == 0:
        data = data[: rng.randrange(len(data) + 1)]
    elif choice == 1:
        data += os.urandom(rng.randint(1, 5000))
    elif choice == 2:
        data = os.urandom(rng.randint(0, 2 * len(data) + 8))
    elif choice == 3:
        data = _zstd_bomb(rng.choice([1 << 20, 1 << 28, 3 << 29]))
    else:
        b = bytearray(data or b"\0")
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        data = bytes(b)
    f.write_bytes(data)
    return f"chunk bytes of {f.relative_to(t)}"


def m_special_file(t: Path, rng: random.Random) -> str:
    f = rng.choice(_files(t))
    f.unlink()
    choice = rng.randrange(6)
    if choice == 0:
        f.symlink_to(rng.choice(["/etc/passwd", "/dev/urandom", "/dev/zero", "/proc/self/maps"]))
    elif choice == 1:
        f.symlink_to(rng.choice(_files(t)))
    elif choice == 2:
        os.mkfifo(f)
    elif choice == 3:
        f.mkdir()
    elif choice == 4:
        f.symlink_to(f.parent)
    return f"{f.relative_to(t)} made special ({choice})"


def m_zarr_array_folder(t: Path, rng: random.Random) -> str:
    folder = rng.choice([p for p in t.iterdir() if p.is_dir()])
    outside = t.parent / f"outside-{folder.name}"
    shutil.move(folder, outside)
    folder.symlink_to(outside)
    return f"{folder.name} folder linked outside"


def m_hdf5_meta(t: Path, rng: random.Random) -> str:
    import h5py

    with h5py.File(t, "r+") as f:
        meta = json.loads(f.attrs["tracekit"])
        mutate_json(meta, rng)
        text = json.dumps(meta).encode("utf-8", "surrogatepass")
        del f.attrs["tracekit"]
        f.attrs.create("tracekit", text, dtype=h5py.string_dtype("utf-8", max(1, len(text))))
    return "hdf5 metadata value"


def m_hdf5_bytes(t: Path, rng: random.Random) -> str:
    data = bytearray(t.read_bytes())
    sigs = [i for sig in (b"OHDR", b"GCOL", b"FRHP", b"BTHD", b"BTLF", b"FSHD", b"OCHK")
            for i in range(0, len(data), 8) if data[i:i + 4] == sig]
    region = rng.randrange(4)
    for _ in range(rng.randint(1, 6)):
        if region == 0:
            off = rng.randrange(8, 64)
        elif region == 1 and sigs:
            off = min(len(data) - 1, rng.choice(sigs) + rng.randrange(4, 200))
        else:
            off = rng.randrange(8, len(data))
        data[off] ^= 1 << rng.randrange(8)
    if region == 3 and rng.random() < 0.5:
        del data[rng.randrange(8, len(data)):]
    t.write_bytes(bytes(data))
    return f"hdf5 bytes (region {region})"


ZARR_MUTATIONS: list[Callable[[Path, random.Random], str]] = [
    m_zarr_json_value, m_zarr_json_value, m_zarr_json_value, m_zarr_json_bytes, m_chunk_bytes,
    m_chunk_bytes, m_special_file, m_zarr_array_folder]
HDF5_MUTATIONS: list[Callable[[Path, random.Random], str]] = [
    m_hdf5_meta, m_hdf5_meta, m_hdf5_bytes]


def build_case(seeds: dict[str, Path], work: Path, seed: int, index: int) -> tuple[Path, str]:
    """The damaged trace of case ``index`` (a fresh copy under ``work``) and what was done."""
    rng = random.Random(f"{seed}:{index}")
    kind = SEEDS[rng.randrange(len(SEEDS))]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = seeds[kind]
    dst = work / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    pool = HDF5_MUTATIONS if kind == "hdf5" else ZARR_MUTATIONS
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutation = rng.choice(pool)
        try:
            done.append(mutation(dst, rng))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            # An earlier mutation left nothing this one can work on (h5py cannot open the
            # file, no chunk file is left, ...): the case goes on without it.
            done.append(f"{mutation.__name__} skipped ({type(exc).__name__})")
    return dst, f"{kind}: " + "; ".join(done)


# -- one case, in a worker --------------------------------------------------------------------
def run_case(path: Path) -> tuple[str, str]:
    """What validate, info and reading make of ``path``: (outcome, detail)."""
    from click.testing import CliRunner

    import tracekit
    from tracekit.cli import main
    from tracekit.errors import TraceError

    clean = False
    runner = CliRunner()
    for args in (["validate", str(path)], ["info", str(path)], ["info", "--json", str(path)]):
        result = runner.invoke(main, args)
        exc = result.exception
        if isinstance(exc, MemoryError):
            return "memory", f"{args[0]}: MemoryError"
        if exc is not None and not isinstance(exc, SystemExit):
            return "traceback", f"{args[0]}: {type(exc).__name__}: {str(exc)[:200]}"
        if result.exit_code:
            lines = result.output.strip("\n").split("\n")
            if args[0] == "info" and len(lines) != 1:
                return "traceback", f"{args[0]}: {len(lines)}-line error"
            clean = True
    try:
        with tracekit.open(path) as trace:
            for name in [*trace.plan.used_dims(), *trace.array_names()]:
                arr = trace[name]
                arr[: min(2, arr.shape[0])]
            list(trace.tokens[:4])
    except TraceError:
        clean = True
    except MemoryError:
        return "memory", "read: MemoryError"
    except Exception as exc:  # judged here: anything but a TraceError is a bug
        return "traceback", f"read: {type(exc).__name__}: {str(exc)[:200]}"
    return ("clean" if clean else "accepted"), ""


def worker(seed_dir: Path, work: Path, seed: int) -> None:
    """Read case indices from stdin, answer one JSON line each on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import warnings

    warnings.simplefilter("ignore")
    seeds = {k: next((seed_dir / k).iterdir()) for k in SEEDS}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    for line in sys.stdin:
        index = int(line)
        start = time.monotonic()
        path, what = build_case(seeds, work / "case", seed, index)
        outcome, detail = run_case(path)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write(json.dumps({"index": index, "outcome": outcome, "detail": detail,
                              "what": what, "seconds": time.monotonic() - start,
                              "rss": rss}) + "\n")
        out.flush()


# -- the driver -------------------------------------------------------------------------------
class Worker:
    def __init__(self, seed_dir: Path, work: Path, seed: int) -> None:
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(seed_dir), str(work), "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, index: int, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return {"index": index, "outcome": "hang", "detail": f"over {timeout} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"index": index, "outcome": "signal" if code < 0 else "traceback",
                    "detail": f"worker exited with {code}"}
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def fuzz(cases: int, seed: int = 0, start: int = 0, timeout: float = CASE_TIMEOUT_S,
         jobs: int = 1, log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run cases ``start .. start + cases`` on ``jobs`` workers; returns the counts per
    outcome, the bad cases, the slowest case's seconds and the largest worker's peak RSS."""
    import threading

    with tempfile.TemporaryDirectory(prefix="tracekit-fuzz-") as tmp:
        root = Path(tmp)
        make_seeds(root / "seeds")
        results: list[dict[str, Any]] = []
        pending = iter(range(start, start + cases))
        lock = threading.Lock()
        began = time.monotonic()

        def drive(job: int) -> None:
            w = Worker(root / "seeds", root / f"work{job}", seed)
            try:
                while True:
                    with lock:
                        index = next(pending, None)
                    if index is None:
                        return
                    if not w.alive:
                        w = Worker(root / "seeds", root / f"work{job}", seed)
                    result = w.run(index, timeout)
                    with lock:
                        results.append(result)
                        if log:
                            log(result)
            finally:
                w.kill()

        threads = [threading.Thread(target=drive, args=(j,)) for j in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    counts = Counter(r["outcome"] for r in results)
    return {"cases": len(results), "counts": {k: counts[k] for k in OUTCOMES},
            "bad": [r for r in results if r["outcome"] in BAD],
            "seconds": round(time.monotonic() - began, 1),
            "slowest_case_s": round(max((r.get("seconds", 0.0) for r in results), default=0), 2),
            "peak_rss_mb": round(max((r.get("rss", 0) for r in results), default=0) / 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--replay", type=int, help="rebuild case N in ./fuzz-case and run it")
    parser.add_argument("--worker", nargs=2, metavar=("SEEDS", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.seed)
        return
    if args.replay is not None:
        seeds = make_seeds(Path(tempfile.mkdtemp(prefix="tracekit-fuzz-seeds-")))
        path, what = build_case(seeds, Path("fuzz-case"), args.seed, args.replay)
        print(path, what)
        print(*run_case(path))
        return

    def log(r: dict[str, Any]) -> None:
        if args.verbose or r["outcome"] in BAD:
            print(r["index"], r["outcome"], r.get("what", ""), r["detail"], flush=True)

    report = fuzz(args.cases, args.seed, args.start, jobs=args.jobs, log=log)
    print(json.dumps({k: v for k, v in report.items() if k != "bad"}, indent=1))
    sys.exit(1 if report["bad"] else 0)


if __name__ == "__main__":
    main()
