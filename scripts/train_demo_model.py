"""Train tracekit's embedded demo model: a tiny GPT-2 trained on Python's own stdlib source.

The result is written in Hugging Face format (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) plus MODEL_CARD.md, so that

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    AutoTokenizer.from_pretrained(path)

work offline. Everything is seeded and the data order is deterministic; the training corpus is
the sorted top-level ``*.py`` modules of the running interpreter's standard library (no test
packages), so the same Python version, torch version and thread count reproduce the same model.

Some rows of every batch hold a repeated span (of training text, or of random tokens: see
``--repeat-fraction`` and ``--repeat-random``), so that the model learns in-context copying
and grows induction heads within the default 3000 steps; without them it did not.

Usage::

    python scripts/train_demo_model.py                 # writes tracekit/demo_model
    python scripts/train_demo_model.py --out /tmp/m --steps 200 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import platform
import random
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
HELDOUT_EVERY = 20  # every 20th file (sorted order, starting at index 0) is held out
# What the plain-window recipe (--repeat-fraction 0 --position-init normal, 3000 steps, seed 0,
# 1 thread) gave, from that model's card, for comparison in this one's.
PLAIN_RECIPE = {"steps": 3000, "held_out": 3.224, "prev": 0.33, "induction": 0.03}
COPY_EVAL_ROWS = 256  # held-out rows with a repeated span, for the card's copying losses


def corpus_files() -> list[Path]:
    """Sorted top-level stdlib modules; no test modules, no packages, no site-packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(stdlib.glob("*.py")):
        name = f.name.lower()
        if name.startswith("test") or name.startswith("_test") or "test_" in name:
            continue
        files.append(f)
    return files


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == 0]
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != 0]
    return train, held


def read_text(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_corpus(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def copy_rows(train_ids: torch.Tensor, n: int, seq_len: int, min_len: int, max_len: int,
              gen: torch.Generator, spans: list | None = None, n_random: int = 0,
              vocab_size: int = 0, eot_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training rows (inputs, targets) of real training text in which one span is
    repeated: a window w of the corpus, a span w[p : p+k] with k uniform in [min_len, max_len]
    and p uniform, and the row is w[:p+k] + w[p:p+k] + w[p+k:], cut to seq_len + 1 tokens.

    The second copy of the span is predictable from the first by looking back to the token
    after the current token's earlier occurrence, which is what induction heads do. Span length
    and position vary so that no fixed position offset does the job.

    In the first ``n_random`` rows the span is instead k random tokens r (uniform over the
    vocabulary but ``eot_id``), inserted twice into the text: w[:p] + r + r + w[p:]. Nothing
    but the first copy predicts the second, so these rows train copying alone; the targets
    that are random (the first copy, and the first token of the second) are -100 (no loss).

    ``spans``, when given, gets (p, k) of each row appended."""
    xs, ys = [], []
    max_start = len(train_ids) - seq_len - 1
    for i in range(n):
        k = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        p = int(torch.randint(0, seq_len + 1 - 2 * k + 1, (1,), generator=gen))
        s = int(torch.randint(0, max_start + 1, (1,), generator=gen))
        w = train_ids[s : s + seq_len + 1]
        if i < n_random:
            r = torch.randint(0, vocab_size - 1, (k,), generator=gen)
            r = r + (r >= eot_id).long()
            row = torch.cat([w[:p], r, r, w[p:]])[: seq_len + 1]
            y = row[1:].clone()
            y[max(p - 1, 0) : p + k] = -100
        else:
            row = torch.cat([w[: p + k], w[p : p + k], w[p + k :]])[: seq_len + 1]
            y = row[1:]
        if spans is not None:
            spans.append((p, k))
        xs.append(row[:-1])
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def probe_heads(model, text: torch.Tensor, repeated: torch.Tensor, half: int):
    """Best previous-token score on ``text`` rows and best induction score on ``repeated`` rows
    (``<|endoftext|>`` + r + r, len(r) == half), as (score, layer, head) each; the same measures
    as scripts/analyze_demo_heads.py (its functions), for the training log."""
    analysis = load_analysis()
    was = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.eval()
    prev = analysis.prev_token_scores(analysis.attentions(model, text))
    ind = analysis.induction_scores(analysis.attentions(model, repeated), half)
    model.set_attn_implementation(was)
    model.train()
    n_head = prev.shape[1]
    best = []
    for s in (prev, ind):
        j = int(s.flatten().argmax())
        best.append((float(s.flatten()[j]), j // n_head, j % n_head))
    return best[0], best[1]


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """The Transformer paper's sin/cos position table, [n, d]: each pair of dimensions is a
    rotation by a fixed angle per position, so "the position before mine" is a linear map."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, seq_len: int, batch: int, max_windows: int) -> float:
    """Mean next-token loss over non-overlapping windows of ``data`` (deterministic)."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    starts = torch.arange(n) * seq_len
    total, count = 0.0, 0
    for i in range(0, n, batch):
        s = starts[i : i + batch]
        x = torch.stack([data[j : j + seq_len] for j in s])
        y = torch.stack([data[j + 1 : j + 1 + seq_len] for j in s])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += y.numel()
    model.train()
    return total / count


@torch.no_grad()
def eval_copy_loss(model, data: torch.Tensor, seq_len: int, min_len: int, max_len: int,
                   rows: int, seed: int) -> tuple[float, float]:
    """Mean loss on the tokens of a repeated span (all but its first token), in its first and
    in its second copy, over ``rows`` rows of ``data`` made as in training (own generator)."""
    model.eval()
    spans: list[tuple[int, int]] = []
    x, y = copy_rows(data, rows, seq_len, min_len, max_len,
                     torch.Generator().manual_seed(seed), spans)
    losses = torch.nn.functional.cross_entropy(
        model(input_ids=x).logits.transpose(1, 2), y, reduction="none")
    first = torch.cat([losses[r, p : p + k - 1] for r, (p, k) in enumerate(spans)])
    second = torch.cat([losses[r, p + k : p + 2 * k - 1] for r, (p, k) in enumerate(spans)])
    model.train()
    return float(first.mean()), float(second.mean())


def make_optimizers(model: GPT2LMHeadModel, args) -> list[torch.optim.Optimizer]:
    """Embeddings get a high AdamW lr (so the learned positions form fast); block matrices get
    Muon (or AdamW); biases and LayerNorm parameters AdamW. No weight decay (a short run)."""
    embed = [model.transformer.wte.weight, model.transformer.wpe.weight]
    embed_ids = {id(p) for p in embed}
    rest = [p for p in model.parameters() if id(p) not in embed_ids]
    mats = [p for p in rest if p.dim() == 2]
    vecs = [p for p in rest if p.dim() < 2]
    adam_groups = [{"params": embed, "lr": args.embed_lr}, {"params": vecs, "lr": args.lr}]
    opts: list[torch.optim.Optimizer] = []
    if args.optimizer == "muon":
        opts.append(torch.optim.Muon(mats, lr=args.muon_lr, weight_decay=0.0))
    else:
        adam_groups.append({"params": mats, "lr": args.lr})
    opts.append(torch.optim.AdamW(adam_groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0))
    for opt in opts:
        for g in opt.param_groups:
            g["peak_lr"] = g["lr"]
    return opts


def load_analysis():
    path = Path(__file__).resolve().parent / "analyze_demo_heads.py"
    spec = importlib.util.spec_from_file_location("analyze_demo_heads", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "tracekit" / "demo_model")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="adamw: AdamW on all; muon: torch.optim.Muon on the blocks' matrices, "
                   "AdamW on the rest (better per step, but its bfloat16 Newton-Schulz is slow "
                   "on CPUs without native bf16)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW peak lr (biases, LayerNorms; with --optimizer adamw also matrices)")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon peak lr")
    p.add_argument("--embed-lr", type=float, default=0.1,
                   help="AdamW peak lr of the (tied) token and the position embeddings")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--position-init", choices=["normal", "sinusoidal"], default="sinusoidal",
                   help="initial value of the learned position embeddings: GPT-2's normal(0, "
                   "0.02), or the sin/cos table (still trained), from which previous-token "
                   "heads form much sooner")
    p.add_argument("--repeat-fraction", type=float, default=0.3,
                   help="fraction of each batch's rows that hold a repeated span of training "
                   "text (in-context copying, so induction heads form); 0: plain windows only")
    p.add_argument("--repeat-random", type=float, default=0.5,
                   help="fraction of those rows whose repeated span is random tokens (inserted "
                   "twice into the text; loss on the second copy only) instead of text")
    p.add_argument("--repeat-min", type=int, default=16,
                   help="shortest repeated span, tokens")
    p.add_argument("--repeat-max", type=int, default=None,
                   help="longest repeated span, tokens (default: half the sequence length)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the exact weights depend on it (2 is faster on an "
                   "idle 2-core machine, 1 is the reference and kinder to a shared one)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="dtype the weights are stored in")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--probe-every", type=int, default=100,
                   help="log the best previous-token and induction scores every N steps "
                   "(at log steps; 0: never); does not change the training")
    p.add_argument("--no-card", action="store_true", help="skip head analysis and MODEL_CARD.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat_max is None:
        args.repeat_max = args.seq_len // 2
    if not 0.0 <= args.repeat_fraction <= 1.0:
        raise SystemExit("--repeat-fraction must be in [0, 1]")
    if not 0.0 <= args.repeat_random <= 1.0:
        raise SystemExit("--repeat-random must be in [0, 1]")
    if not 1 <= args.repeat_min <= args.repeat_max <= args.seq_len // 2:
        raise SystemExit("need 1 <= --repeat-min <= --repeat-max <= seq-len / 2")

    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    # ---- data -------------------------------------------------------------------------------
    files = corpus_files()
    train_files, held_files = split_files(files)
    train_texts = [read_text(f) for f in train_files]
    held_texts = [read_text(f) for f in held_files]
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    held_bytes = sum(len(t.encode("utf-8")) for t in held_texts)
    digest = hashlib.sha256()
    for f, t in zip(train_files + held_files, train_texts + held_texts, strict=True):
        digest.update(f.name.encode() + b"\0" + t.encode("utf-8") + b"\0")
    print(f"corpus: {len(train_files)} train files ({train_bytes:,} bytes), "
          f"{len(held_files)} held-out files ({held_bytes:,} bytes), "
          f"sha256 {digest.hexdigest()[:16]}")

    tok = train_tokenizer(train_texts, args.vocab_size)
    eot_id = tok.token_to_id(EOT)
    train_ids = torch.from_numpy(encode_corpus(tok, train_texts))
    held_ids = torch.from_numpy(encode_corpus(tok, held_texts))
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train tokens {len(train_ids):,}, "
          f"held-out tokens {len(held_ids):,} ({train_bytes / len(train_ids):.2f} bytes/token)")

    # ---- model ------------------------------------------------------------------------------
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    if args.position_init == "sinusoidal":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(
                sinusoidal_positions(args.n_positions, args.n_embd))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {args.n_layer}L/{args.n_head}H/{args.n_embd}d, {n_params:,} parameters")

    opts = make_optimizers(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    # The copying rows draw from their own generator, so --repeat-fraction 0 gives exactly the
    # plain-window data order of the original recipe.
    copy_gen = torch.Generator().manual_seed(args.seed + 1)
    n_copy = round(args.repeat_fraction * args.batch)
    n_random = round(args.repeat_random * n_copy)
    max_start = len(train_ids) - args.seq_len - 1
    print(f"data: {args.batch - n_copy} plain windows + {n_copy} rows with a repeated span of "
          f"{args.repeat_min}-{args.repeat_max} tokens ({n_random} of random tokens) per batch")

    # probe rows for the log: held-out text windows, and <|endoftext|> + r + r with random r
    probe_text = torch.stack([held_ids[j * args.seq_len : (j + 1) * args.seq_len]
                              for j in range(8)])
    pgen = torch.Generator().manual_seed(12345)
    r = torch.randint(1, tok.get_vocab_size(), (16, 50), generator=pgen)
    r[r == eot_id] = 1
    probe_rep = torch.cat([torch.full((16, 1), eot_id), r, r], dim=1)

    # ---- train ------------------------------------------------------------------------------
    model.train()
    t_train = time.time()
    cpu_train = time.process_time()
    recent: list[float] = []
    for step in range(args.steps):
        factor = lr_at(step, args.steps, 1.0, args.warmup)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * factor
        starts = torch.randint(0, max_start + 1, (args.batch - n_copy,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts]
                        or [train_ids[:0]]).reshape(-1, args.seq_len)
        y = torch.stack([train_ids[s + 1 : s + 1 + args.seq_len] for s in starts]
                        or [train_ids[:0]]).reshape(-1, args.seq_len)
        if n_copy:
            cx, cy = copy_rows(train_ids, n_copy, args.seq_len, args.repeat_min,
                               args.repeat_max, copy_gen, n_random=n_random,
                               vocab_size=tok.get_vocab_size(), eot_id=eot_id)
            x, y = torch.cat([x, cx]), torch.cat([y, cy])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        recent.append(loss.item())
        recent = recent[-args.log_every:]
        if step % args.log_every == 0 or step == args.steps - 1:
            avg = sum(recent) / len(recent)
            probe = ""
            if args.probe_every and (step % args.probe_every == 0 or step == args.steps - 1):
                (pv, pl, ph), (iv, il, ih) = probe_heads(model, probe_text, probe_rep, 50)
                probe = f"  prev L{pl}H{ph} {pv:.2f}  ind L{il}H{ih} {iv:.2f}"
            print(f"step {step:5d}  loss {loss.item():.4f}  avg{len(recent)} {avg:.4f}  "
                  f"lr x{factor:.3f}  {time.time() - t_train:6.1f}s{probe}", flush=True)
    train_wall = time.time() - t_train
    train_cpu = time.process_time() - cpu_train
    final_train_avg = sum(recent) / len(recent)

    train_eval = eval_loss(model, train_ids, args.seq_len, 64, max_windows=256)
    held_eval = eval_loss(model, held_ids, args.seq_len, 64, max_windows=10**9)
    copy_first, copy_second = eval_copy_loss(model, held_ids, args.seq_len, args.repeat_min,
                                             args.repeat_max, COPY_EVAL_ROWS, args.seed + 2)
    print(f"train loss (256 windows of {args.seq_len}) {train_eval:.4f}; "
          f"held-out loss ({(len(held_ids) - 1) // args.seq_len} windows) {held_eval:.4f} "
          f"(ppl {math.exp(held_eval):.2f}); held-out repeated spans: first copy "
          f"{copy_first:.4f}, second copy {copy_second:.4f}; training wall time {train_wall:.1f}s")

    # ---- save -------------------------------------------------------------------------------
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "pytorch_model.bin", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "MODEL_CARD.md"):
        (out / name).unlink(missing_ok=True)
    model.eval()
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    model.generation_config.pad_token_id = eot_id
    save_model = model.to(torch.float16) if args.dtype == "float16" else model
    save_model.save_pretrained(out)
    model = model.float()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=args.n_positions,
    )
    hf_tok.save_pretrained(out)
    print(f"saved to {out} ({folder_bytes(out):,} bytes)")

    if args.no_card:
        return 0

    # ---- reload exactly as users will, analyse, write the card -------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(out)
    m.eval()
    prompt = "def fibonacci(n):"
    enc = t(prompt, return_tensors="pt")
    with torch.no_grad():
        gen_ids = m.generate(**enc, max_new_tokens=80, do_sample=False, pad_token_id=eot_id)
    sample = t.decode(gen_ids[0], skip_special_tokens=False)
    print("greedy sample:\n" + sample)

    analysis = load_analysis()
    scores = analysis.head_scores(m, t, seed=args.seed)
    table = analysis.format_table(scores)
    print(table)

    reload_held = eval_loss(m, held_ids, args.seq_len, 64, max_windows=10**9)
    total_wall = time.time() - t_start
    size = folder_bytes(out)  # without the card
    card = render_card(
        args=args, n_params=n_params, config=config, tok=tok, train_files=train_files,
        held_files=held_files, train_bytes=train_bytes, held_bytes=held_bytes,
        train_tokens=len(train_ids), held_tokens=len(held_ids), digest=digest.hexdigest(),
        train_wall=train_wall, train_cpu=train_cpu, total_wall=total_wall,
        final_train_avg=final_train_avg,
        train_eval=train_eval, held_eval=held_eval, reload_held=reload_held, sample=sample,
        copy_first=copy_first, copy_second=copy_second,
        scores=scores, table=table, analysis=analysis, size=size,
    )
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(f"wrote {out / 'MODEL_CARD.md'}; folder {folder_bytes(out):,} bytes; "
          f"total wall {total_wall:.1f}s")
    return 0


def render_card(*, args, n_params, config, tok, train_files, held_files, train_bytes,
                held_bytes, train_tokens, held_tokens, digest, train_wall, train_cpu,
                total_wall, final_train_avg, train_eval, held_eval, reload_held, sample, scores,
                table, analysis, size, copy_first, copy_second) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    fmt = ", ".join
    top = analysis.top_heads
    prev_line = fmt(f"L{la}H{h} {v:.2f}" for la, h, v in top(scores, "prev_token", 5))
    ind_line = fmt(f"L{la}H{h} {v:.2f}" for la, h, v in top(scores, "induction", 5))
    held_names = fmt(f"`{f.name}`" for f in held_files)
    text_modules = fmt(f"`{n}`" for n in analysis.TEXT_MODULES)
    n_files = len(train_files) + len(held_files)
    step_tokens = args.batch * args.seq_len
    all_tokens = args.steps * step_tokens
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"transformers {transformers.__version__}, "
                f"tokenizers {__import__('tokenizers').__version__}")
    if args.optimizer == "muon":
        optim = (f"`torch.optim.Muon` (lr {args.muon_lr:g}) on the blocks' weight matrices; "
                 f"AdamW (betas 0.9, 0.95) on embeddings (lr {args.embed_lr:g}) and on "
                 f"biases/LayerNorms (lr {args.lr:g})")
    else:
        optim = (f"AdamW (betas 0.9, 0.95): embeddings lr {args.embed_lr:g}, "
                 f"everything else lr {args.lr:g}")
    cmd = (f"python scripts/train_demo_model.py --steps {args.steps} --seed {args.seed} "
           f"--threads {args.threads}")
    defaults = main_defaults()
    for name in ("batch", "seq_len", "optimizer", "lr", "muon_lr", "embed_lr", "warmup",
                 "position_init", "repeat_fraction", "repeat_random", "repeat_min",
                 "repeat_max", "vocab_size", "n_layer", "n_head",
                 "n_embd", "n_positions", "dtype"):
        if getattr(args, name) != defaults[name]:
            cmd += f" --{name.replace('_', '-')} {getattr(args, name)}"
    if defaults["repeat_max"] is None and args.repeat_max == args.seq_len // 2:
        cmd = cmd.replace(f" --repeat-max {args.repeat_max}", "")
    last = min(args.log_every, args.steps)
    n_copy = round(args.repeat_fraction * args.batch)
    n_random = round(args.repeat_random * n_copy)
    if n_copy:
        data_order = (f"random windows from `torch.Generator().manual_seed({args.seed})`; "
                      f"the copying rows from `manual_seed({args.seed + 1})`")
        spans = f"{args.repeat_min}-{args.repeat_max} tokens, length and place uniform"
        kinds = []
        if n_copy - n_random:
            kinds.append(f"{n_copy - n_random} are a random window of training text in which a "
                         f"span ({spans}) is repeated right after itself")
        if n_random:
            kinds.append(f"{n_random} are a random window of training text with a span of "
                         f"random tokens ({spans}; uniform over the vocabulary but "
                         f"`<|endoftext|>`) inserted twice in a row; the random tokens' own "
                         f"targets (the first copy and the first token of the second) carry "
                         f"no loss")
        copy_row = (f"{n_copy} of the {args.batch} rows of every batch "
                    f"(`--repeat-fraction {args.repeat_fraction:g} --repeat-random "
                    f"{args.repeat_random:g}`): " + "; ".join(kinds) + ". The other "
                    f"{args.batch - n_copy} rows are plain windows")
        mean_k = (args.repeat_min + args.repeat_max) / 2
        second = n_copy * mean_k / (args.batch * args.seq_len)
        random_part = (n_random * mean_k * 2 / (args.batch * args.seq_len))
        share = (f"about {second:.0%} of the training tokens are second copies of a span"
                 + (f", and {random_part:.0%} are random tokens (both copies of the random "
                    f"spans)" if n_random else ""))
        if args.steps == PLAIN_RECIPE["steps"]:
            delta = held_eval - PLAIN_RECIPE["held_out"]
            cost = (f"The held-out loss on plain text is {held_eval:.3f}, {abs(delta):.3f} "
                    f"{'higher' if delta > 0 else 'lower'} than that model's "
                    f"{PLAIN_RECIPE['held_out']:.3f}, "
                    f"{'as' if delta > 0 else 'although'} {share}"
                    + ("; the position embeddings also started from the sin/cos table, and "
                       "which of the two changes moved the loss how much was not measured"
                       if args.position_init == "sinusoidal" else "") + ".")
        else:
            cost = f"In this recipe {share}."
        copy_text = f"""
The copying rows are there so that induction heads form within this small budget. In the second
copy of a span the next token can be read off the first copy (attend to the token after the
earlier occurrence of the current token, and copy it), which is the job of an induction head.
Plain source code rewards that too, but too rarely for a model this small to learn it in a few
thousand steps: trained on plain windows only (`--repeat-fraction 0 --position-init normal`,
otherwise the same recipe, {PLAIN_RECIPE["steps"]} steps), this model had previous-token-ish heads
in layer 0 (best prev(text) {PLAIN_RECIPE["prev"]:.2f}) but no induction head (best induction
score {PLAIN_RECIPE["induction"]:.2f}; held-out loss {PLAIN_RECIPE["held_out"]:.3f}). Text spans
keep the data stdlib source; random-token spans can be predicted by copying and nothing else, so
they give the copying circuit a clean signal. Length and place of the spans vary so that no fixed
position offset predicts the copy. {cost}
"""
        copy_text = "\n" + textwrap.fill(" ".join(copy_text.split()), width=98) + "\n"
        train_last = f"train batches (copying rows included), mean of the last {last} steps"
    else:
        data_order = f"random windows from `torch.Generator().manual_seed({args.seed})`"
        copy_row = "none (`--repeat-fraction 0`): plain windows only"
        copy_text = ""
        train_last = f"train, mean of the last {last} steps"
    embed_text = ("The high embedding learning rate is there so that the learned position "
                  "embeddings take shape within a few hundred steps: with one lr for everything "
                  "the heads stayed position-blind.")
    if args.position_init == "sinusoidal":
        pos_init = ("the sin/cos table of the Transformer paper (amplitude 1), then trained; "
                    "other weights GPT-2's normal(0, 0.02)")
        embed_text += (" The position embeddings start from the sin/cos table (they are "
                       "still learned), in which \"one position earlier\" is the same linear "
                       "map everywhere: that is what a previous-token head, the first half of "
                       "an induction circuit, needs.")
    else:
        pos_init = "GPT-2's normal(0, 0.02) for all weights"
    embed_text = textwrap.fill(embed_text, width=98)
    return f"""# tracekit demo model

A tiny GPT-2 (`GPT2LMHeadModel`) that tracekit trains itself, on the Python standard library's
own source, so every machine can rebuild it offline. It is package data
(`tracekit.demo.demo_model_path()`), for examples and tests of recording and viewing. It is a
toy: it writes Python-looking text, not working Python.

Load it with `AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")` and
`AutoTokenizer.from_pretrained(path)`.

## Architecture

| | |
|---|---|
| class | `GPT2LMHeadModel` (`model_type: gpt2`), pre-LayerNorm, GELU, learned positions |
| layers x heads | {config.n_layer} x {config.n_head} (head dim {config.n_embd // config.n_head}) |
| width | {config.n_embd} (MLP {4 * config.n_embd}) |
| context (`n_positions`) | {config.n_positions} |
| vocabulary | {config.vocab_size} |
| embeddings | input and output tied |
| parameters | {n_params:,} |
| stored dtype | {args.dtype} (`model.safetensors`) |
| folder size | {size / 1e6:.1f} MB |

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training files only: ByteLevel pre-tokenizer
(no prefix space) and decoder, {tok.get_vocab_size()} tokens including the one special token
`<|endoftext|>` (id {tok.token_to_id(EOT)}), which is bos, eos, pad and unk. The training files
average {train_bytes / train_tokens:.2f} bytes per token.

## Training data

The top-level `*.py` modules of the Python {platform.python_version()} standard library
(`sysconfig.get_paths()["stdlib"]`, i.e. `.../{stdlib.parent.name}/{stdlib.name}/*.py`),
sorted by name. Packages (subdirectories: `test/`, `idlelib/`, `site-packages/`, ...) are not
used, and names starting with `test` are skipped. Of the {n_files} files, every
{HELDOUT_EVERY}th (index 0, {HELDOUT_EVERY}, ...) is held out.

- train: {len(train_files)} files, {train_bytes:,} bytes, {train_tokens:,} tokens
- held out: {len(held_files)} files, {held_bytes:,} bytes, {held_tokens:,} tokens:
  {held_names}
- sha256 over (name, text) of all files in order: `{digest}`

Files are joined with `<|endoftext|>`.

## Training

| | |
|---|---|
| steps | {args.steps} |
| batch x sequence length | {args.batch} x {args.seq_len} ({step_tokens:,} tokens/step) |
| tokens seen | {all_tokens:,} ({all_tokens / train_tokens:.2f} epochs) |
| data order | {data_order} |
| copying rows | {copy_row} |
| optimizer | {optim}; no weight decay; grad-norm clip 1.0 |
| schedule | linear warmup {args.warmup} steps, cosine to 10% of peak |
| initialisation | {pos_init} |
| dropout | none |
| seed | {args.seed} (`random`, `numpy`, `torch.manual_seed`); deterministic algorithms on |
| hardware | CPU, {args.threads} torch thread(s) |
| time | {train_wall:.0f} s wall ({train_cpu:.0f} s CPU) training; {total_wall:.0f} s wall in all |
| versions | {versions} |

{embed_text}
{copy_text}
## Results

| | loss (nats/token) | perplexity |
|---|---|---|
| {train_last} | {final_train_avg:.3f} | {math.exp(final_train_avg):.1f} |
| train, 256 windows of {args.seq_len} | {train_eval:.3f} | {math.exp(train_eval):.1f} |
| held out, all windows of {args.seq_len} | {held_eval:.3f} | {math.exp(held_eval):.1f} |

Held-out loss after reloading the saved {args.dtype} weights: {reload_held:.3f}.

In-context copying, on {COPY_EVAL_ROWS} rows of held-out text with one span repeated (made as in
training): the span's tokens (all but its first) cost {copy_first:.3f} nats/token in the first
copy and {copy_second:.3f} in the second.

Greedy continuation of `def fibonacci(n):` (80 new tokens):

```python
{sample}
```

## What the heads do

Measured by `scripts/analyze_demo_heads.py` (eager attention, `output_attentions=True`):

- **prev(text)**: mean attention from position t to t-1 over {analysis.TEXT_WINDOWS} windows
  of {analysis.TEXT_LEN} tokens of held-out stdlib text ({text_modules}), t >= 1. Uniform
  causal attention would give {analysis.uniform_baseline(analysis.TEXT_LEN):.3f}.
- **prev(rand)**: the same on the first copy of the random sequence below.
- **induction**: on {analysis.IND_BATCH} sequences of `<|endoftext|>` + {analysis.IND_LEN}
  random tokens repeated twice, mean attention from the second copy of token i to the token
  just after the first copy of i.
- **dup**: from the second copy of token i to the first copy of i.
- **local{analysis.LOCAL}**: attention mass on the {analysis.LOCAL} preceding tokens, on the
  text windows (uniform: {analysis.uniform_baseline(analysis.TEXT_LEN, analysis.LOCAL):.3f}).
- **first**: mean attention to position 0 on the text windows.

Top previous-token heads: {prev_line}.
Top induction heads: {ind_line}.

{analysis.interpretation(scores)}

```
{table}
```

## Reproduce

```
{cmd}
```

The same Python version (so the same stdlib files), torch version and thread count give the
same weights; other versions give a similar model, not a bit-identical one.
"""


def main_defaults() -> dict:
    """Default values of main()'s options, for the reproduce command in the card."""
    return {a.dest: a.default for a in build_parser()._actions}


if __name__ == "__main__":
    sys.exit(main())
