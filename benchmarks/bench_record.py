"""Benchmark of ``tracekit record`` on the CPU: overhead, memory, and a peer.

For each model and sequence length, every measurement runs in a fresh subprocess (so peak RSS is
its own), on the same tokens, with the same (eager) attention:

* plain     - the same KV-cache generation loop without recording (the baseline);
* record    - ``tracekit record`` with the default capture (all but neurons), to zarr;
* rec. all  - every capture group (neurons too);
* no lens   - the default capture without the logit lens (which costs one extra unembedding
              matmul per token: large on a CPU with a 50k vocabulary, negligible on a GPU);
* TL        - TransformerLens 4.x ``TransformerBridge.boot_transformers`` on the same local model:
              ``run_with_cache`` over the final tokens (one full forward, no generation) plus
              saving the same content (residual, attn/MLP out, patterns; float16 ``np.savez``).

Ratios are against the plain loop measured in the same run; "growth" is peak RSS minus RSS after
the model was loaded and warmed up. Usage::

    python benchmarks/bench_record.py                      # demo model + 12L d768 GPT-2
    python benchmarks/bench_record.py --lengths 256 --models gpt2-768 --tl-python /path/python

Timings on a shared 2-core machine are noisy; run twice and look at the ratios. Each run uses
``--threads`` torch threads (default 1: on a loaded 2-core machine two OpenMP threads spin on a
descheduled sibling and run ~9x slower than one).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROMPT_LEN = 16


# -- workers (run in subprocesses) ------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


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


def _load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model


def _plain_loop(model, ids: list[int]) -> None:
    """Greedy KV-cache generation, teacher-forced on ``ids`` (same forwards as a recording)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids[:PROMPT_LEN]]), use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        int(out.logits[0, -1].argmax())
        for tok in ids[PROMPT_LEN:]:
            out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache = out.cache
            int(out.logits[0, -1].argmax())


def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    model = _load(job["model_dir"])
    n = job["length"]
    prompt = job["prompt"]
    if job["kind"] == "plain":
        ids = job["ids"]
        _plain_loop(model, ids[: PROMPT_LEN + 4])  # warm up
        base = _rss_mb()
        _reset_peak()
        t0 = time.perf_counter()
        _plain_loop(model, ids)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "base_mb": base, "peak_mb": _peak_mb()}
    if job["kind"] == "record":
        from tracekit.recorder import Recording, discover_structure

        structure = discover_structure(model)
        out = Path(job["out"])
        warm = Recording(model, None, input_ids=prompt, max_new_tokens=4, stop_at_eos=False,
                         capture=job["capture"], structure=structure)
        warm.run(out, overwrite=True)
        shutil.rmtree(out, ignore_errors=True)
        base = _rss_mb()
        _reset_peak()
        rec = Recording(model, None, input_ids=prompt, max_new_tokens=n - len(prompt),
                        stop_at_eos=False, capture=job["capture"], structure=structure)
        t0 = time.perf_counter()
        result = rec.run(out, overwrite=True)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": seconds, "base_mb": base, "peak_mb": _peak_mb(),
                "ids": result.token_ids, "disk_mb": size / 1e6}
    raise ValueError(job["kind"])


TL_WORKER = r'''
import json, os, sys, time
import numpy as np
import torch
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from transformer_lens.model_bridge import TransformerBridge
bridge = TransformerBridge.boot_transformers(job["model_dir"], device="cpu",
                                             dtype=torch.float32)
tokens = torch.tensor([job["ids"]])
n_layers = bridge.cfg.n_layers
names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
names += [f"blocks.{n_layers - 1}.hook_resid_post"]
names += [f"blocks.{i}.{h}" for i in range(n_layers)
          for h in ("hook_attn_out", "hook_mlp_out", "attn.hook_pattern")]
with torch.inference_mode():
    bridge.run_with_cache(tokens[:, :8], names_filter=lambda n: n in names)  # warm up
base = rss()
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
t0 = time.perf_counter()
with torch.inference_mode():
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
arrays = {k.replace(".", "_"): v[0].to(torch.float16).numpy() for k, v in cache.items()}
missing = [n for n in names if n not in cache]
np.savez(job["out"], **arrays)
seconds = time.perf_counter() - t0
size = os.path.getsize(job["out"])
os.remove(job["out"])
print(json.dumps({"seconds": seconds, "base_mb": base, "disk_mb": size / 1e6,
                  "peak_mb": [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                              if l.startswith("VmHWM:")][0],
                  "missing": missing}))
'''


# -- orchestration ----------------------------------------------------------------------------
def run_worker(job: dict, python: str = sys.executable) -> dict:
    if job["kind"] == "tl":
        cmd = [python, "-c", TL_WORKER, json.dumps(job)]
    else:
        cmd = [python, str(HERE), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_gpt2_768(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                        bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(folder)
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
    ap.add_argument("--variants", default="record,all,nolens")
    ap.add_argument("--tl-python", help="A Python with transformer-lens 4.x installed.")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: on a shared machine, OpenMP threads that "
                         "wait for a descheduled sibling make 2 threads ~9x slower than 1)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import numpy as np

    from tracekit.demo import demo_model_path
    from tracekit.format import CAPTURE_GROUPS

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tracekit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tl_python = find_tl_python(args.tl_python)
    default = [g for g in CAPTURE_GROUPS if g != "neurons"]
    captures = {"record": default, "all": list(CAPTURE_GROUPS),
                "nolens": [g for g in default if g != "logit_lens"]}
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for name in args.models.split(","):
        if name == "demo":
            folder = demo_model_path()
            if not (folder / "config.json").is_file():
                print("demo model not built yet: skipped", file=sys.stderr)
                continue
            context = 512
        else:
            folder = make_gpt2_768(work / "gpt2-768")
            context = 1024
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        prompt = np.random.default_rng(0).integers(100, vocab, PROMPT_LEN).tolist()
        for length in (int(x) for x in args.lengths.split(",")):
            n = min(length, context)
            base_job = {"model_dir": str(folder), "length": n, "prompt": prompt,
                        "threads": args.threads,
                        "out": str(work / "trace.zarr")}
            row = {"model": name, "tokens": n}
            print(f"{name} {n}: record", file=sys.stderr, flush=True)
            row["record"] = run_worker({**base_job, "kind": "record",
                                        "capture": captures["record"]})
            if "error" in row["record"]:
                print(f"  record failed: {row['record']['error']}", file=sys.stderr)
                continue
            ids = row["record"]["ids"]
            print(f"{name} {n}: plain", file=sys.stderr, flush=True)
            row["plain"] = run_worker({**base_job, "kind": "plain", "ids": ids})
            for v in variants:
                if v != "record":
                    print(f"{name} {n}: {v}", file=sys.stderr, flush=True)
                    row[v] = run_worker({**base_job, "kind": "record", "capture": captures[v]})
            if tl_python:
                print(f"{name} {n}: TransformerLens", file=sys.stderr, flush=True)
                row["tl"] = run_worker({**base_job, "kind": "tl", "ids": ids,
                                        "out": str(work / "tl_cache.npz")}, tl_python)
            rows.append(row)
    print_table(rows, variants, tl_python)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], variants: list[str], tl_python: str | None) -> None:
    labels = {"record": "record", "all": "rec. all", "nolens": "no lens"}
    head = ["model", "tokens", "plain s"]
    for v in variants:
        head += [f"{labels[v]} s", "x plain"]
    head += ["TL s", "TL / record", "RSS growth MB plain / record / TL", "trace MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        plain = r["plain"].get("seconds")
        cells = [r["model"], str(r["tokens"]), _fmt(plain)]
        for v in variants:
            s = r.get(v, {}).get("seconds")
            cells += [_fmt(s), _fmt(s / plain if s and plain else None, ".2f") + "x"]
        tl = r.get("tl", {})
        tl_s = tl.get("seconds")
        rec_s = r["record"].get("seconds")
        cells += [_fmt(tl_s) if tl_s else ("n/a" if not tl_python else "error"),
                  _fmt(tl_s / rec_s if tl_s and rec_s else None) + ("x" if tl_s else "")]
        growth = [d.get("peak_mb", 0) - d.get("base_mb", 0) if "peak_mb" in d else None
                  for d in (r["plain"], r["record"], tl)]
        cells.append(" / ".join(_fmt(g, ".0f") for g in growth))
        cells.append(_fmt(r["record"].get("disk_mb"), ".1f"))
        print("| " + " | ".join(cells) + " |")
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
