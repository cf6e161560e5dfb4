"""Measure what each attention head of a causal LM does; prints a per-head table.

Scores, for every layer L and head H (eager attention, ``output_attentions=True``):

- ``prev(text)``: mean attention from position t to t-1 on windows of real Python text
  (stdlib modules, positions t >= 1). A previous-token head scores near 1.
- ``prev(rand)``: the same on the first copy of a random token sequence (no structure to use).
- ``induction``: on ``<|endoftext|> + r + r`` (r = random tokens), mean attention from the second
  copy of token i to the token just after the first copy of i. An induction head scores high.
- ``dup``: mean attention from the second copy of token i to the first copy of i (duplicate-token).
- ``local4``: mean attention mass on the 4 preceding tokens (t-1 .. t-4) on the text windows.
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
LOCAL = 4
COLUMNS = ("prev_token", "prev_random", "induction", "duplicate", "local", "first")
HEADERS = ("prev(text)", "prev(rand)", "induction", "dup", f"local{LOCAL}", "first")


def uniform_baseline(n: int, keys: int = 1) -> float:
    """What uniform causal attention gives to ``keys`` fixed earlier keys, averaged over the
    query positions that have them (t = keys .. n-1)."""
    return sum(keys / (t + 1) for t in range(keys, n)) / (n - keys)


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


def prev_token_scores(a: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position t >= 1 to t - 1, per [layer, head], of attentions
    ``a`` [layer, batch, head, query, key]."""
    t = torch.arange(1, a.shape[-1])
    return a[..., t, t - 1].mean(dim=(1, 3))


def induction_scores(a: torch.Tensor, n: int) -> torch.Tensor:
    """On rows of one start token + r + r (len(r) == n): mean attention from the second copy
    of token i to the token after its first copy, per [layer, head]."""
    i = torch.arange(n)
    return a[..., 1 + n + i, 2 + i].mean(dim=(1, 3))


def head_scores(model, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-head scores, each a [n_layer, n_head] tensor, keyed by COLUMNS."""
    model.eval()
    a = attentions(model, text_windows(tokenizer))
    prev_token = prev_token_scores(a)
    first = a[..., 1:, 0].mean(dim=(1, 3))
    t = torch.arange(LOCAL, a.shape[-1])
    local = sum(a[..., t, t - k] for k in range(1, LOCAL + 1)).mean(dim=(1, 3))

    a = attentions(model, repeated_random(tokenizer, model.config.vocab_size, seed))
    n = IND_LEN
    i = torch.arange(n)
    q2 = 1 + n + i  # second copy of token i
    induction = induction_scores(a, n)
    duplicate = a[..., q2, 1 + i].mean(dim=(1, 3))
    t = torch.arange(2, 1 + n)
    prev_random = a[..., t, t - 1].mean(dim=(1, 3))
    return {"prev_token": prev_token, "prev_random": prev_random, "induction": induction,
            "duplicate": duplicate, "local": local, "first": first}


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
    """A few sentences naming the heads that do something visible, from the numbers."""

    def names(key: str, threshold: float) -> list[str]:
        return [f"L{la}H{h} ({v:.2f})" for la, h, v in top_heads(scores, key, 10**6)
                if v >= threshold]

    def line(label: str, key: str, threshold: float) -> str:
        return f"{label}: " + (", ".join(names(key, threshold)) or "none") + "."

    prev_u = uniform_baseline(TEXT_LEN)
    local_u = uniform_baseline(TEXT_LEN, LOCAL)
    ind_u = 1 / (1.5 * IND_LEN)
    return "\n".join([
        line("- Sharp previous-token heads (prev(text) >= 0.5)", "prev_token", 0.5),
        line(f"- Heads leaning on the previous token (prev(text) >= 3x uniform, "
             f"{3 * prev_u:.2f})", "prev_token", 3 * prev_u),
        line(f"- Local heads (local{LOCAL} >= 3x uniform, {3 * local_u:.2f})", "local",
             3 * local_u),
        line(f"- Induction heads (induction >= 0.2; uniform is about {ind_u:.3f})",
             "induction", 0.2),
        line(f"- Induction-leaning heads (induction >= 3x uniform, {3 * ind_u:.2f})",
             "induction", 3 * ind_u),
        line("- Duplicate-token heads (dup >= 0.2)", "duplicate", 0.2),
        line("- Heads that mostly attend to position 0 (first >= 0.5)", "first", 0.5),
    ])


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
