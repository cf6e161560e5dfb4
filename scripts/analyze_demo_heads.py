"""Measure what each attention head of a causal LM does; prints a per-head table.

Scores, for every layer L and head H (eager attention, ``output_attentions=True``):

- ``prev(text)``: mean attention from position t to t-1 on windows of real Python text
  (stdlib modules, positions t >= 1). A previous-token head scores near 1.
- ``prev(rand)``: the same on the first copy of a random token sequence (no structure to use).
- ``induction``: on ``<|endoftext|> + r + r`` (r = random tokens), mean attention from the second
  copy of token i to the token just after the first copy of i. An induction head scores high.
- ``dup``: mean attention from the second copy of token i to the first copy of i (duplicate-token).
- ``first``: mean attention to position 0 on the text windows (an "attention sink").

Usage::

    python scripts/analyze_demo_heads.py                 # the embedded demo model
    python scripts/analyze_demo_heads.py path/to/model --seed 0
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TEXT_MODULES = ("argparse.py", "contextlib.py", "shutil.py")  # held out from demo-model training
TEXT_LEN = 128
TEXT_WINDOWS = 12
TEXT_OFFSET = 256  # skip module docstrings/imports
IND_LEN = 50
IND_BATCH = 16
COLUMNS = ("prev_token", "prev_random", "induction", "duplicate", "first")
HEADERS = ("prev(text)", "prev(rand)", "induction", "dup", "first")


def uniform_baseline(n: int) -> float:
    """Mean of 1/(t+1) over t = 1..n-1: what uniform causal attention gives for one key."""
    return sum(1.0 / (t + 1) for t in range(1, n)) / (n - 1)


def text_windows(tokenizer) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    per = -(-TEXT_WINDOWS // len(TEXT_MODULES))
    rows = []
    for name in TEXT_MODULES:
        text = (stdlib / name).read_text(encoding="utf-8")
        ids = tokenizer(text, verbose=False)["input_ids"]
        for k in range(per):
            s = TEXT_OFFSET + k * TEXT_LEN
            if s + TEXT_LEN <= len(ids) and len(rows) < TEXT_WINDOWS:
                rows.append(ids[s : s + TEXT_LEN])
    return torch.tensor(rows, dtype=torch.long)


def repeated_random(tokenizer, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    r = allowed[torch.randint(0, len(allowed), (IND_BATCH, IND_LEN), generator=gen)]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    first = torch.full((IND_BATCH, 1), bos, dtype=torch.long)
    return torch.cat([first, r, r], dim=1)


@torch.no_grad()
def attentions(model, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities stacked as [layer, batch, head, query, key]."""
    out = model(input_ids=ids, output_attentions=True)
    return torch.stack([a.float() for a in out.attentions])


def head_scores(model, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-head scores, each a [n_layer, n_head] tensor, keyed by COLUMNS."""
    model.eval()
    a = attentions(model, text_windows(tokenizer))
    t = torch.arange(1, a.shape[-1])
    prev_token = a[..., t, t - 1].mean(dim=(1, 3))
    first = a[..., 1:, 0].mean(dim=(1, 3))

    a = attentions(model, repeated_random(tokenizer, model.config.vocab_size, seed))
    n = IND_LEN
    i = torch.arange(n)
    q2 = 1 + n + i  # second copy of token i
    induction = a[..., q2, 2 + i].mean(dim=(1, 3))
    duplicate = a[..., q2, 1 + i].mean(dim=(1, 3))
    t = torch.arange(2, 1 + n)
    prev_random = a[..., t, t - 1].mean(dim=(1, 3))
    return {"prev_token": prev_token, "prev_random": prev_random, "induction": induction,
            "duplicate": duplicate, "first": first}


def top_heads(scores: dict[str, torch.Tensor], key: str, k: int) -> list[tuple[int, int, float]]:
    s = scores[key]
    flat = s.flatten()
    order = torch.argsort(flat, descending=True)[:k]
    n_head = s.shape[1]
    return [(int(j) // n_head, int(j) % n_head, float(flat[j])) for j in order]


def format_table(scores: dict[str, torch.Tensor]) -> str:
    n_layer, n_head = scores["prev_token"].shape
    lines = ["head   " + "  ".join(f"{h:>10}" for h in HEADERS)]
    for la in range(n_layer):
        for h in range(n_head):
            vals = "  ".join(f"{float(scores[c][la, h]):10.3f}" for c in COLUMNS)
            lines.append(f"L{la}H{h}   {vals}")
    return "\n".join(lines)


def interpretation(scores: dict[str, torch.Tensor]) -> str:
    """A few sentences naming the heads that clearly do something, from the numbers."""

    def names(key: str, threshold: float) -> list[str]:
        return [f"L{la}H{h} ({v:.2f})" for la, h, v in top_heads(scores, key, 10**6)
                if v >= threshold]

    base = uniform_baseline(TEXT_LEN)
    out = []
    prev = names("prev_token", 0.5)
    out.append("Previous-token heads (prev(text) >= 0.5): " + (", ".join(prev) or "none") + ".")
    ind = names("induction", 0.2)
    out.append("Induction heads (induction >= 0.2; uniform over the second copy would be about "
               f"{1 / (1.5 * IND_LEN):.3f}): " + (", ".join(ind) or "none") + ".")
    dup = names("duplicate", 0.2)
    out.append("Duplicate-token heads (dup >= 0.2): " + (", ".join(dup) or "none") + ".")
    sink = names("first", 0.5)
    out.append("Heads that mostly attend to the first position (first >= 0.5; uniform would be "
               f"about {base:.2f}): " + (", ".join(sink) or "none") + ".")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=REPO / "tracekit" / "demo_model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation="eager", dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    scores = head_scores(model, tokenizer, seed=args.seed)
    print(format_table(scores))
    print()
    print(interpretation(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
