"""Benchmark of ``tracekit record``: overhead, memory, and a peer (CPU by default, or a GPU).

For each model and sequence length, every measurement runs in a fresh subprocess (so peak RSS is
its own), on the same tokens, with the same (eager) attention:

* plain  - the same KV-cache generation loop without recording (the baseline);
* core   - recording residual, attn_out, mlp_out, attention and predictions to zarr (what
           ``tracekit record`` captures by default on a CPU when the logit lens is costly);
* + lens - core + the logit lens (one (points x vocab) matmul per token: large on a CPU with a
           50k vocabulary, negligible on a GPU);
* all    - every capture group (neurons too);
* TL     - TransformerLens 4.x ``TransformerBridge.boot_transformers`` on the same local model:
           greedy ``generate`` with its KV cache, then ``run_with_cache`` over the final tokens
           and saving the same content as core (residual, attn/MLP out, patterns) with float16
           ``np.savez``.

Ratios are against the plain loop measured in the same run: each round runs every measurement
once, and a ratio is the median over rounds of a run's time over the baseline's of the same round
(with 4 rounds or more, the quartiles of those ratios follow in brackets); seconds are the
fastest run's; "growth" is peak RSS minus RSS after the model was loaded and warmed up (on a
GPU, also peak GPU memory allocated minus what the loaded model held). Usage::

    python benchmarks/bench_record.py                      # demo model + 12L d768 GPT-2
    python benchmarks/bench_record.py --lengths 256 --models gpt2-768 --tl-python /path/python
    python benchmarks/bench_record.py --models demo --repeat 5 --alternate 9   # small models
    python benchmarks/bench_record.py --device cuda --dtype bfloat16 --models gpt2-48x1600 \
        --variants core,lens --repeat 3                    # a GPT-2 XL-shaped model on a GPU

Models: ``demo`` (the embedded model), ``gpt2-768`` (GPT-2 small's shape) or ``gpt2-LxD``
(L layers of width D, heads of 64), random-initialised and saved once under ``--workdir``.

Timings on a shared 2-core machine are noisy; run twice and look at the ratios. Each run uses
``--threads`` torch threads (default 1: on a loaded 2-core machine two OpenMP threads spin on a
descheduled sibling and run ~9x slower than one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PROMPT_LEN = 16


# -- workers (run in subprocesses) ------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu() -> float:
    """CPU seconds of this process, all threads (the writer's included): less sensitive than
    wall time to other tenants of a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _gpu_reset_peak(model) -> float | None:
    """On a GPU: reset its peak-memory counter and return the memory allocated now (MB)."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def _gpu_growth(model, base: float | None) -> dict:
    """On a GPU: peak GPU memory allocated since :func:`_gpu_reset_peak`, minus ``base``."""
    import torch

    if base is None:
        return {}
    device = next(model.parameters()).device
    return {"gpu_growth_mb": torch.cuda.max_memory_allocated(device) / 2**20 - base}


def _reset_peak() -> None:
    """Reset the kernel's RSS high-water mark, so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation="eager")
    return model.to(device).eval()


def _sync(model) -> None:
    """Wait for the GPU's queued work, so a timer read after it counts all of it."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_loop(model, ids: list[int]) -> None:
    """Greedy KV-cache generation, teacher-forced on ``ids``: the same forwards as a
    recording, with the same cache (the model's own for the prompt, then preallocated)."""
    import torch

    from tracekit.recorder.recording import preallocated_cache

    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids[:PROMPT_LEN]], device=dev), use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        int(out.logits[0, -1].argmax())
        static = preallocated_cache(model, cache, len(ids))
        cache = static if static is not None else cache
        for i, tok in enumerate(ids[PROMPT_LEN:]):
            extra = {} if static is None else {
                "cache_position": torch.tensor([PROMPT_LEN + i], device=dev)}
            out = model(input_ids=torch.tensor([[tok]], device=dev), cache=cache,
                        use_cache=True, **extra)
            cache = out.cache
            int(out.logits[0, -1].argmax())


def worker(job: dict) -> dict:
    import torch

    from tracekit.recorder.recording import limit_heap_fragmentation

    torch.set_num_threads(job["threads"])
    limit_heap_fragmentation()  # as ``tracekit record`` does; for plain runs too, to be fair
    model = _load(job["model_dir"], job.get("device", "cpu"), job.get("dtype", "float32"))
    n = job["length"]
    store = job.get("store_dtype", "float16")
    prompt = job["prompt"]
    if job["kind"] == "plain":
        ids = job["ids"]
        _plain_loop(model, ids[: PROMPT_LEN + 4])  # warm up
        base, gpu_base = _rss_mb(), _gpu_reset_peak(model)
        _reset_peak()
        t0, c0 = time.perf_counter(), _cpu()
        _plain_loop(model, ids)
        _sync(model)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        return {"seconds": seconds, "cpu": cpu, "base_mb": base, "peak_mb": _peak_mb(),
                **_gpu_growth(model, gpu_base)}
    if job["kind"] == "record":
        from tracekit.recorder import Recording, discover_structure

        structure = discover_structure(model)
        out = Path(job["out"])
        warm = Recording(model, None, input_ids=prompt, max_new_tokens=4, stop_at_eos=False,
                         capture=job["capture"], structure=structure, store_dtype=store)
        warm.run(out, overwrite=True)
        shutil.rmtree(out, ignore_errors=True)
        base, gpu_base = _rss_mb(), _gpu_reset_peak(model)
        _reset_peak()
        rec = Recording(model, None, input_ids=prompt, max_new_tokens=n - len(prompt),
                        stop_at_eos=False, capture=job["capture"], structure=structure,
                        store_dtype=store)
        t0, c0 = time.perf_counter(), _cpu()
        result = rec.run(out, overwrite=True)
        _sync(model)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": seconds, "cpu": cpu, "base_mb": base, "peak_mb": _peak_mb(),
                "ids": result.token_ids, "disk_mb": size / 1e6,
                **_gpu_growth(model, gpu_base)}
    if job["kind"] == "alternate":
        return alternate(model, job)
    raise ValueError(job["kind"])


def alternate(model, job: dict) -> dict:
    """The plain loop and each recording variant in turn, ``rounds`` times, in this one
    process: the median of each round's variant / plain, in wall time. Separate processes
    (the other columns) also differ by where each lands in memory and on the machine; on a
    small model that noise is as large as the overhead itself."""
    import statistics

    from tracekit.recorder import Recording, discover_structure

    structure = discover_structure(model)
    out = Path(job["out"])
    ids, prompt = job["ids"], job["prompt"]

    def record(capture: list[str], n: int) -> float:
        rec = Recording(model, None, input_ids=prompt, max_new_tokens=n - len(prompt),
                        stop_at_eos=False, capture=capture, structure=structure,
                        store_dtype=job.get("store_dtype", "float16"))
        t0 = time.perf_counter()
        rec.run(out, overwrite=True)
        _sync(model)
        seconds = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    _plain_loop(model, ids[: PROMPT_LEN + 4])
    for variant in job["variants"]:
        record(CAPTURES[variant], len(prompt) + 4)
    ratios: dict[str, list[float]] = {v: [] for v in job["variants"]}
    for _ in range(job["rounds"]):
        os.sync()
        t0 = time.perf_counter()
        _plain_loop(model, ids)
        _sync(model)
        plain = time.perf_counter() - t0
        for variant in job["variants"]:
            os.sync()
            ratios[variant].append(record(CAPTURES[variant], len(ids)) / plain)
    out: dict[str, Any] = {v: statistics.median(r) for v, r in ratios.items()}
    if job["rounds"] >= 4:
        out["spread"] = {v: statistics.quantiles(r, n=4)[::2] for v, r in ratios.items()}
    return out


TL_WORKER = r'''
import json, os, resource, sys, time
import numpy as np
import torch
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
import ctypes
ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # as the tracekit runs, to be fair
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
from transformer_lens.model_bridge import TransformerBridge
device = job.get("device", "cpu")
bridge = TransformerBridge.boot_transformers(job["model_dir"], device=device,
                                             dtype=getattr(torch, job.get("dtype", "float32")))
def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
tokens = torch.tensor([job["ids"]], device=device)
prompt = tokens[:, :job["prompt_len"]]
n_layers = bridge.cfg.n_layers
names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
names += [f"blocks.{n_layers - 1}.hook_resid_post"]
names += [f"blocks.{i}.{h}" for i in range(n_layers)
          for h in ("hook_attn_out", "hook_mlp_out", "attn.hook_pattern")]
with torch.inference_mode():
    bridge.run_with_cache(tokens[:, :8], names_filter=lambda n: n in names)  # warm up
    bridge.generate(prompt, max_new_tokens=2, do_sample=False, verbose=False)
base = rss()
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
t0, c0 = time.perf_counter(), cpu()
with torch.inference_mode():
    bridge.generate(prompt, max_new_tokens=tokens.shape[1] - prompt.shape[1], do_sample=False,
                    stop_at_eos=False, use_past_kv_cache=True, verbose=False)
sync()
t1, c1 = time.perf_counter(), cpu()
with torch.inference_mode():
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
arrays = {k.replace(".", "_"): v[0].to(torch.float16).cpu().numpy() for k, v in cache.items()}
missing = [n for n in names if n not in cache]
np.savez(job["out"], **arrays)
t2, c2 = time.perf_counter(), cpu()
size = os.path.getsize(job["out"])
os.remove(job["out"])
print(json.dumps({"gen_seconds": t1 - t0, "cache_seconds": t2 - t1, "seconds": t2 - t0,
                  "cpu": c2 - c0, "base_mb": base, "disk_mb": size / 1e6,
                  "peak_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                              if l.startswith("VmHWM:")][0],
                  "missing": missing}))
'''


# -- orchestration ----------------------------------------------------------------------------
def fastest(runs: list[dict]) -> dict:
    """The fastest of several runs of one measurement (wall and CPU separately); memory from
    the first."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(ok[0])
    for key in ("seconds", "cpu", "gen_seconds", "cache_seconds"):
        if key in best:
            best[key] = min(r[key] for r in ok)
    return best


def paired_ratios(runs: list[dict], base: list[dict]) -> dict[str, Any]:
    """Median over rounds of run / baseline of the same round, for wall and CPU time, and the
    quartiles of the wall-time ratios (``spread``) when there are 4 rounds or more."""
    import statistics

    out: dict[str, Any] = {}
    for key in ("seconds", "cpu"):
        ratios = [r[key] / b[key] for r, b in zip(runs, base, strict=False)
                  if r.get(key) and b.get(key)]
        if ratios:
            out[key] = statistics.median(ratios)
        if key == "seconds" and len(ratios) >= 4:
            q = statistics.quantiles(ratios, n=4)
            out["spread"] = (q[0], q[2])
    return out


def run_worker(job: dict, python: str = sys.executable) -> dict:
    if job["kind"] == "tl":
        cmd = [python, "-c", TL_WORKER, json.dumps(job)]
    else:
        cmd = [python, str(HERE), "--worker", json.dumps(job)]
    os.sync()  # the previous run's trace is not written back during this one
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpt2_shape(name: str) -> tuple[int, int] | None:
    """(layers, width) of a random GPT-2 model name: ``gpt2-768`` is GPT-2 small's shape
    (12 layers, d_model 768), ``gpt2-LxD`` any other (``gpt2-48x1600``: GPT-2 XL's)."""
    if name == "gpt2-768":
        return 12, 768
    m = re.fullmatch(r"gpt2-(\d+)x(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def make_gpt2(folder: Path, layers: int, width: int, dtype: str = "float32",
              device: str = "cpu") -> Path:
    """A random-initialised GPT-2-shaped model (50257-token vocabulary, heads of 64), saved
    once in ``dtype`` (initialised on ``device``: a GPU draws a billion weights in seconds)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                        n_positions=1024, vocab_size=50257, bos_token_id=50256,
                        eos_token_id=50256)
    with torch.device(device):
        model = GPT2LMHeadModel(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def find_tl_python(given: str | None) -> str | None:
    for python in [given, sys.executable, "/tmp/tlvenv/bin/python"]:
        if not python or not Path(python).exists():
            continue
        ok = subprocess.run([python, "-c", "import transformer_lens.model_bridge"],
                            capture_output=True).returncode == 0
        if ok:
            return python
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker")
    ap.add_argument("--models", default="demo,gpt2-768")
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--variants", default="core,lens,all")
    ap.add_argument("--tl-python", help="A Python with transformer-lens 4.x installed.")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds: each runs every measurement once, interleaved; ratios are "
                         "the median of the rounds' ratios, seconds the fastest run's")
    ap.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                    help="also alternate the plain loop and each variant ROUNDS times in one "
                         "process, and print those medians (less noisy on small models)")
    ap.add_argument("--device", default="cpu",
                    help="where the model runs: cpu or cuda (on a GPU, GPU memory growth is "
                         "reported too)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="the model's dtype; the trace stores float16, or bfloat16 for a "
                         "bfloat16 model (as tracekit record does)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: on a shared machine, OpenMP threads that "
                         "wait for a descheduled sibling make 2 threads ~9x slower than 1)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import numpy as np

    from tracekit.demo import demo_model_path

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: torch sees no CUDA device here")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tracekit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tl_python = find_tl_python(args.tl_python)
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for name in args.models.split(","):
        if name == "demo":
            folder = demo_model_path()
            if not (folder / "config.json").is_file():
                print("demo model not built yet: skipped", file=sys.stderr)
                continue
        elif (shape := gpt2_shape(name)) is not None:
            folder = make_gpt2(work / f"{name}-{args.dtype}", *shape, dtype=args.dtype,
                               device=args.device)
        else:
            sys.exit(f"unknown model {name!r}: demo, gpt2-768 or gpt2-LAYERSxWIDTH")
        config = json.loads((folder / "config.json").read_text())
        context = config.get("n_positions") or config.get("max_position_embeddings") or 1024
        prompt = np.random.default_rng(0).integers(100, config["vocab_size"],
                                                   PROMPT_LEN).tolist()
        for length in (int(x) for x in args.lengths.split(",")):
            n = min(length, context)
            job = {"model_dir": str(folder), "length": n, "prompt": prompt,
                   "threads": args.threads, "out": str(work / "trace.zarr"),
                   "device": args.device, "dtype": args.dtype,
                   "store_dtype": "bfloat16" if args.dtype == "bfloat16" else "float16"}
            row: dict = {"model": name, "tokens": n}
            # The first recording gives the tokens every other run is fed. Then the runs are
            # interleaved (plain, recordings, TL; again), so that a machine that drifts
            # during the benchmark slows every measurement alike.
            print(f"{name} {n}: {variants[0]}", file=sys.stderr, flush=True)
            first = run_worker({**job, "kind": "record", "capture": CAPTURES[variants[0]]})
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            runs[variants[0]].append(first)
            if "ids" not in first:
                row[variants[0]] = first
                rows.append(row)
                continue
            kinds = ["plain", *variants] + (["tl"] if tl_python else [])
            runs["plain"], runs["tl"] = [], []
            for rep in range(max(1, args.repeat)):
                for kind in kinds:
                    if rep == 0 and kind == variants[0]:
                        continue  # the first recording
                    print(f"{name} {n}: {kind} ({rep + 1}/{args.repeat})", file=sys.stderr,
                          flush=True)
                    if kind == "plain":
                        spec = {**job, "kind": "plain", "ids": first["ids"]}
                    elif kind == "tl":
                        spec = {**job, "kind": "tl", "ids": first["ids"],
                                "prompt_len": PROMPT_LEN, "out": str(work / "tl_cache.npz")}
                    else:
                        spec = {**job, "kind": "record", "capture": CAPTURES[kind]}
                    runs[kind].append(run_worker(spec, tl_python if kind == "tl" else
                                                 sys.executable))
            for kind, done in runs.items():
                if done:
                    row[kind] = fastest(done)
            if args.alternate:
                print(f"{name} {n}: alternating in one process ({args.alternate} rounds)",
                      file=sys.stderr, flush=True)
                row["alternate"] = run_worker({**job, "kind": "alternate", "ids": first["ids"],
                                               "variants": variants,
                                               "rounds": args.alternate})
            # Ratios pair each run with the baseline of the same round (adjacent in time, so
            # a machine whose speed drifts between rounds slows both alike), median of rounds.
            for kind in (k for k in runs if k != "plain"):
                base = "plain" if kind != "tl" else variants[0]
                if kind in row and base in row:
                    row[kind]["paired"] = paired_ratios(runs[kind], runs[base])
            rows.append(row)
    print_table(rows, variants, tl_python)
    print(f"model dtype {args.dtype} on {args.device}, {args.threads} torch thread(s)")


#: residual, attn_out, mlp_out, attention, predictions: what ``tracekit record`` captures by
#: default on a CPU for a large vocabulary; + logit lens: its default elsewhere; all: + neurons.
CAPTURES = {
    "core": ["residual", "attn_out", "mlp_out", "attention", "predictions"],
    "lens": ["residual", "attn_out", "mlp_out", "attention", "predictions", "logit_lens"],
    "all": ["residual", "attn_out", "mlp_out", "attention", "neurons", "predictions",
            "logit_lens"],
}


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: dict, b: dict) -> str:
    """``wall (cpu)`` ratio of a over b: the median of the rounds' paired ratios where there
    are some, else of the fastest runs."""
    paired = a.get("paired") or {}
    spread = ""
    if paired.get("seconds"):
        wall, cpu = paired["seconds"], paired.get("cpu")
        if paired.get("spread"):
            spread = " [{:.2f}-{:.2f}]".format(*paired["spread"])
    elif a.get("seconds") and b.get("seconds"):
        wall = a["seconds"] / b["seconds"]
        cpu = a["cpu"] / b["cpu"] if a.get("cpu") and b.get("cpu") else None
    else:
        return "-"
    return f"{wall:.2f}x" + (f" ({cpu:.2f})" if cpu else "") + spread


def print_table(rows: list[dict], variants: list[str], tl_python: str | None) -> None:
    labels = {"core": "core", "lens": "+ lens", "all": "all"}
    head = ["model", "tokens", "plain s"] + [f"{labels[v]} / plain" for v in variants]
    alternated = any("alternate" in r for r in rows)
    if alternated:
        head += [f"{labels[v]} / plain, one process" for v in variants]
    head += ["TL s (gen + cache&save)", "TL / core", "RSS growth MB plain / core / TL",
             "core trace MB"]
    on_gpu = any("gpu_growth_mb" in r.get("plain", {}) for r in rows)
    if on_gpu:
        head.append("GPU memory growth MB plain / core")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        plain, core, tl = r.get("plain", {}), r.get(variants[0], {}), r.get("tl", {})
        cells = [r["model"], str(r["tokens"]), _fmt(plain.get("seconds"))]
        cells += [_ratio(r.get(v, {}), plain) for v in variants]
        if alternated:
            alt = r.get("alternate", {})
            spread = alt.get("spread", {})
            cells += ["-" if alt.get(v) is None else f"{alt[v]:.2f}x" + (
                " [{:.2f}-{:.2f}]".format(*spread[v]) if v in spread else "")
                for v in variants]
        if tl.get("seconds"):
            cells.append(f"{tl['seconds']:.2f} ({tl['gen_seconds']:.2f} + "
                         f"{tl['cache_seconds']:.2f})")
        else:
            cells.append("n/a" if not tl_python else "error")
        cells.append(_ratio(tl, core))
        growth = [d["peak_mb"] - d["base_mb"] if "peak_mb" in d else None
                  for d in (plain, core, tl)]
        cells.append(" / ".join(_fmt(g, ".0f") for g in growth))
        cells.append(_fmt(core.get("disk_mb"), ".1f"))
        if on_gpu:
            cells.append(" / ".join(_fmt(d.get("gpu_growth_mb"), ".0f") for d in (plain, core)))
        print("| " + " | ".join(cells) + " |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"ratios: wall time (CPU time of all threads in parentheses); {os.cpu_count()} cores, "
          f"load average at the end {load}")
    for r in rows:
        for key, d in r.items():
            if isinstance(d, dict) and d.get("error"):
                print(f"note: {r['model']} {r['tokens']} {key} failed: {d['error']}")
            if isinstance(d, dict) and d.get("missing"):
                print(f"note: TransformerLens lacked hooks {d['missing'][:3]}...")
    if not tl_python:
        print("note: TransformerLens 4.x not importable here (pass --tl-python); column n/a")


if __name__ == "__main__":
    main()
