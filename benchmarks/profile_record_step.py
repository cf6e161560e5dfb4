"""Where a recording's time per step goes, on the CPU, against the plain generation loop.

Runs, alternately in one process, the plain KV-cache loop of ``bench_record.py`` and a
recording of the same tokens (residual, attention and MLP out, attention patterns, top-k
predictions, to zarr), and prints per step: the main thread's CPU time of each, and of the
recording's parts (the forward with its taps, ``collect_groups`` and its parts, the token
bytes, ``write_steps``), plus the CPU time of the writer's threads. Steps are collected in
batches (``collect_groups``): its time is spread over the steps. Usage::

    python benchmarks/profile_record_step.py                 # demo model, 512 tokens, 3 rounds
    python benchmarks/profile_record_step.py --tokens 256 --rounds 5 --model /path/to/model

The parts are timed with ``time.thread_time`` wrappers, which cost about a microsecond each.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model folder (default: the demo model)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from bench_record import PROMPT_LEN, _load, _plain_loop

    import tracekit.writer as writer_module
    from tracekit.recorder import Recording, capture, discover_structure, recording
    from tracekit.recorder.loading import resolve_model_path

    recording.limit_heap_fragmentation()
    model = _load(str(resolve_model_path(args.model)))
    structure = discover_structure(model)
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        @functools.wraps(fn)  # keeps the signature the recorder inspects
        def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.thread_time() - t
        return wrapper

    capture.Capture.collect_groups = timed("collect", capture.Capture.collect_groups)
    capture.Capture._stream_vectors = timed("  stream vectors", capture.Capture._stream_vectors)
    capture.Capture._attention_arrays = timed("  attention", capture.Capture._attention_arrays)
    recording.token_bytes = timed("token bytes", recording.token_bytes)
    writer_module.TraceWriter.write_steps = timed("write_steps",
                                                  writer_module.TraceWriter.write_steps)
    model.forward = timed("forward + taps", model.forward)

    prompt = list(range(5, 5 + PROMPT_LEN))
    groups = ("residual", "attn_out", "mlp_out", "attention", "predictions")
    n = args.tokens
    scratch = Path(tempfile.mkdtemp(prefix="tracekit-profile-"))
    out = scratch / "t.zarr"

    def record() -> tuple[float, float, list[int]]:
        rec = Recording(model, None, input_ids=prompt, max_new_tokens=n - PROMPT_LEN,
                        stop_at_eos=False, capture=groups, structure=structure)
        os.sync()
        r0, m0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
        result = rec.run(out, overwrite=True)
        main_cpu = time.thread_time() - m0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        process = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        shutil.rmtree(out)
        return main_cpu, process - main_cpu, result.token_ids

    try:
        _, _, ids = record()  # warm up; the plain loop replays these tokens
        _plain_loop(model, ids)
        for r in range(args.rounds):
            os.sync()
            t = time.thread_time()
            _plain_loop(model, ids)
            plain = time.thread_time() - t
            spent.clear()
            main_cpu, others, _ = record()
            ms = 1e3 / n
            print(f"round {r}: main-thread CPU per step: plain {plain * ms:.3f} ms, "
                  f"record {main_cpu * ms:.3f} ms ({main_cpu / plain:.2f}x); "
                  f"writer threads {others:.3f} s in all; load {os.getloadavg()[0]:.1f}")
            for name, s in spent.items():
                print(f"    {name:<18} {s * ms:.3f} ms")
            parts = sum(v for k, v in spent.items() if not k.startswith(" "))
            print(f"    {'rest of the loop':<18} {(main_cpu - parts) * ms:.3f} ms "
                  f"(trace creation and close included)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
