"""How far a recording (prompt in one pass, then one token a step with the KV cache) is from one
teacher-forced full forward pass over the same tokens, in float32, per model family.

Each tiny random model of ``tracekit.recorder.testing`` generates ``--positions`` positions
(greedy, past the end-of-text token) into a float32 trace; ``verify_trace`` (what ``tracekit
replay`` runs) recomputes every array in one forward pass without a cache and prints the largest
deviation of each: activations relative to each row's largest magnitude, attention weights
absolute. Prompt positions are the model's own prompt pass, so the deviation is that of the
KV-cache positions.

    python scripts/measure_kv_deviation.py --positions 318
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tracekit import open as open_trace
from tracekit.recorder import record, verify_trace
from tracekit.recorder.testing import FAMILIES, tiny_model

ARRAYS = ("residual", "attn_out", "mlp_out", "attention")


def measure(family: str, positions: int, prompt: int, seed: int, folder: Path) -> dict:
    room = {"n_positions": positions + 8} if family == "gpt2" else {
        "max_position_embeddings": positions + 8}
    model = tiny_model(family, seed=seed, **room)
    torch.manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (prompt,)).tolist()
    out = folder / f"{family}-{seed}.zarr"
    record(model, input_ids=ids, out=out, max_new_tokens=positions - prompt,
           stop_at_eos=False, store_dtype="float32", capture=["residual", "attn_out",
                                                              "mlp_out", "attention"])
    with open_trace(out) as t:
        report = verify_trace(t, model)
    return {c.name: c.measure for c in report.checks} | {"positions": report.positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=318)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1, help="Models per family (seeds 0..N-1).")
    parser.add_argument("--families", default=",".join(f for f in FAMILIES if f != "bert"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'family':<9} {'seed':>4} {'positions':>9} " + " ".join(f"{a:>10}" for a in ARRAYS))
    worst = dict.fromkeys(ARRAYS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for seed in range(args.seeds):
                got = measure(family, args.positions, args.prompt, seed, Path(tmp))
                worst = {a: max(worst[a], got[a]) for a in ARRAYS}
                print(f"{family:<9} {seed:>4} {got['positions']:>9} "
                      + " ".join(f"{got[a]:>10.2e}" for a in ARRAYS), flush=True)
    print(f"{'max':<9} {'':>4} {'':>9} " + " ".join(f"{worst[a]:>10.2e}" for a in ARRAYS))


if __name__ == "__main__":
    main()
