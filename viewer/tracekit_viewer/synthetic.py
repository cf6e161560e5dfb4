"""Synthetic traces for tests, benchmarks and pictures, written through tracekit's own writer.

Two kinds of content:

* ``values="exact"``: every stored number is exactly representable in float16 and given by the
  small functions below (:func:`exact_residual_norm`, :func:`exact_attention`), so tests can
  predict norms, colours, heights and arcs exactly.
* ``values="random"``: plausible-looking activations (norms growing with depth, a few heavy
  tokens) and attention heads with recognisable roles (first token, previous token, self,
  spread out), drawn from a small pool of precomputed rows so that multi-gigabyte traces are
  written at disk speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

import tracekit
from tracekit.format import CAPTURE_GROUPS, ModelInfo, TracePlan

__all__ = [
    "WORDS",
    "exact_attention",
    "exact_residual_norm",
    "synthetic_plan",
    "write_synthetic_trace",
]

#: The synthetic sequence cycles through these words (prompt first, then "generated").
WORDS = ("The", " cat", " sat", " on", " the", " mat", " because", " it", " was", " tired",
         ".", " Then", " a", " dog", " came", " in", " and", " they", " played", " together")

DEFAULT_CAPTURED = tuple(g for g in CAPTURE_GROUPS if g != "neurons")


def synthetic_plan(n_layers: int = 4, n_positions: int = 24, d_model: int = 32,
                   n_heads: int = 4, *, captured: Iterable[str] = DEFAULT_CAPTURED,
                   stored_dtype: str = "float16", top_k: int = 5, attention_top_k: int = 8,
                   chunk_bytes: int | None = None) -> TracePlan:
    """A plan for a synthetic causal model of the given size."""
    model = ModelInfo(name="synthetic/city", n_layers=n_layers, d_model=d_model,
                      n_heads=n_heads, vocab_size=len(WORDS) + 100, d_mlp=4 * d_model,
                      architecture="SyntheticForCausalLM", model_type="synthetic")
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    return TracePlan(model=model, max_positions=n_positions, captured=frozenset(captured),
                     stored_dtype=stored_dtype, top_k=top_k, attention_top_k=attention_top_k,
                     **kwargs)


# -- exact content ----------------------------------------------------------------------------
def exact_residual_norm(position: int, point: int) -> float:
    """Norm of the residual at (position, point) in an ``exact`` trace (one-hot vectors)."""
    return 1.0 + point + 0.5 * (position % 4)


def exact_attn_out_norm(position: int, layer: int) -> float:
    return 0.5 * (layer + 1)


def exact_mlp_out_norm(position: int, layer: int) -> float:
    return 0.25 * (layer + 1) + (position % 2)


def exact_attention(query: int, layer: int, head: int) -> dict[int, float]:
    """Attention weights {key: weight} of an ``exact`` trace; all other keys get 0.

    Even heads: half on the first token, a quarter on the previous token and on itself.
    Odd heads: three quarters on itself, a quarter on the first token. Layers do not matter
    (so every floor shows the same arcs), which keeps expectations readable.
    """
    del layer
    out: dict[int, float] = {}
    parts = ([(0, 0.5), (query - 1, 0.25), (query, 0.25)] if head % 2 == 0
             else [(query, 0.75), (0, 0.25)])
    for key, w in parts:
        key = max(0, key)
        out[key] = out.get(key, 0.0) + w
    return out


def _exact_rows(plan: TracePlan, start: int, n: int) -> dict[str, np.ndarray]:
    sizes = plan.dim_sizes()
    P, L, H, D = sizes["point"], sizes["layer"], sizes["head"], sizes["hidden"]
    R = sizes["rank"]
    rows: dict[str, np.ndarray] = {}
    pos = np.arange(start, start + n)
    if "residual" in plan.captured:
        r = np.zeros((n, P, D), np.float32)
        for i, p in enumerate(pos):
            for j, point in enumerate(plan.points):
                r[i, j, (p + j) % D] = exact_residual_norm(int(p), point)
        rows["residual"] = r
    for name, fn in (("attn_out", exact_attn_out_norm), ("mlp_out", exact_mlp_out_norm)):
        if name in plan.captured:
            a = np.zeros((n, L, D), np.float32)
            for i, p in enumerate(pos):
                for j, layer in enumerate(plan.layers):
                    a[i, j, (2 * p + j) % D] = fn(int(p), layer)
            rows[name] = a
    if "attention" in plan.captured:
        att = np.zeros((n, L, H, start + n), np.float32)
        for i, q in enumerate(pos):
            for j, layer in enumerate(plan.layers):
                for h in range(H):
                    for k, w in exact_attention(int(q), layer, h).items():
                        att[i, j, h, k] = w
        rows["attention"] = att
    if "predictions" in plan.captured:
        ids = (pos[:, None] + 1 + np.arange(R)[None, :]) % len(WORDS)
        rows["top_ids"] = ids.astype(np.int32)
        rows["top_logprobs"] = np.broadcast_to(-np.arange(1, R + 1, dtype=np.float32),
                                               (n, R)).copy()
    if "logit_lens" in plan.captured:
        ids = (pos[:, None, None] + np.arange(P)[None, :, None] + np.arange(R)[None, None, :])
        rows["lens_ids"] = (ids % len(WORDS)).astype(np.int32)
        rows["lens_logprobs"] = np.broadcast_to(
            -np.arange(1, R + 1, dtype=np.float32), (n, P, R)).copy()
    if "neurons" in plan.captured:
        rows["neurons"] = np.zeros((n, L, sizes["neuron"]), np.float32)
    return rows


# -- random content -----------------------------------------------------------------------
class _RandomRows:
    """A pool of precomputed random rows, cycled, so big traces are cheap to generate."""

    POOL = 64

    def __init__(self, plan: TracePlan, seed: int) -> None:
        self.plan = plan
        sizes = plan.dim_sizes()
        self.sizes = sizes
        rng = np.random.default_rng(seed)
        P, L, D = sizes["point"], sizes["layer"], sizes["hidden"]
        depth = np.linspace(1.0, 3.0, P, dtype=np.float32)[None, :, None]
        self.residual = (rng.standard_normal((self.POOL, P, D), np.float32) * depth)
        # a few "outlier" dimensions, as real residual streams have
        self.residual[:, :, : max(1, D // 64)] *= 4.0
        scale = np.linspace(0.3, 1.2, L, dtype=np.float32)[None, :, None]
        self.attn_out = rng.standard_normal((self.POOL, L, D), np.float32) * scale
        self.mlp_out = rng.standard_normal((self.POOL, L, D), np.float32) * scale * 1.5
        if "neurons" in plan.captured:
            self.neurons = rng.standard_normal((self.POOL, L, sizes["neuron"]), np.float32)
        self.rng = rng
        # Head roles: 0 first token, 1 previous token, 2 self, 3+ spread (fixed random keys).
        H = sizes["head"]
        self.roles = np.array([h % 4 for h in range(H)])
        self.roles = np.where(rng.random((L, H)) < 0.2, 3, self.roles[None, :])

    def rows(self, start: int, n: int, heavy: np.ndarray) -> dict[str, np.ndarray]:
        plan, sizes = self.plan, self.sizes
        idx = (np.arange(start, start + n) * 7919) % self.POOL
        out: dict[str, np.ndarray] = {}
        if "residual" in plan.captured:
            r = self.residual[idx].copy()
            r[heavy] *= 3.0  # heavy tokens (first token, punctuation) stand out
            out["residual"] = r
        if "attn_out" in plan.captured:
            out["attn_out"] = self.attn_out[idx]
        if "mlp_out" in plan.captured:
            out["mlp_out"] = self.mlp_out[idx]
        if "neurons" in plan.captured:
            out["neurons"] = self.neurons[idx]
        if "attention" in plan.captured:
            out.update(self._attention(start, n))
        R = sizes["rank"]
        if "predictions" in plan.captured:
            out["top_ids"] = ((np.arange(start, start + n)[:, None] + 1 + 3 * np.arange(R))
                              % len(WORDS)).astype(np.int32)
            lp = np.sort(-self.rng.exponential(1.5, (n, R)).astype(np.float32), axis=1)
            out["top_logprobs"] = lp[:, ::-1].copy()
        if "logit_lens" in plan.captured:
            P = sizes["point"]
            ids = (np.arange(start, start + n)[:, None, None] + np.arange(P)[None, :, None]
                   + 2 * np.arange(R)[None, None, :]) % len(WORDS)
            out["lens_ids"] = ids.astype(np.int32)
            lp = np.sort(-self.rng.exponential(1.5, (n, P, R)).astype(np.float32), axis=2)
            out["lens_logprobs"] = lp[:, :, ::-1].copy()
        return out

    def _attention(self, start: int, n: int) -> dict[str, np.ndarray]:
        sizes = self.sizes
        L, H, K = sizes["layer"], sizes["head"], sizes["attn_rank"]
        keys_total = start + n
        att = np.zeros((n, L, H, keys_total), np.float32)
        top_k = np.full((n, L, H, K), -1, np.int32)
        top_w = np.zeros((n, L, H, K), np.float32)
        for i in range(n):
            q = start + i
            # Every (layer, head) puts its weight on at most 4 keys: cheap to write and to rank.
            first = np.zeros((L, H), np.int64)
            prev = np.full((L, H), max(0, q - 1))
            self_k = np.full((L, H), q)
            spread = (q * 31 + np.arange(L)[:, None] * 7 + np.arange(H)[None, :] * 13) % (q + 1)
            main = np.choose(self.roles, [first, prev, self_k, spread])
            cand = np.stack([main, first, prev, spread], axis=-1)
            w = np.array([0.55, 0.2, 0.15, 0.1], np.float32)
            jitter = self.rng.random((L, H, 4), dtype=np.float32) * 0.05
            weights = np.broadcast_to(w, (L, H, 4)) + jitter
            weights = weights / weights.sum(axis=-1, keepdims=True)
            row = np.zeros((L, H, q + 1), np.float32)
            li, hi = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
            for c in range(4):
                np.add.at(row, (li, hi, cand[..., c]), weights[..., c])
            if self.plan.stored_dtype == "float16":  # rank the values as stored
                row = row.astype(np.float16).astype(np.float32)
            att[i, :, :, : q + 1] = row
            # Rank exactly what was written (ties broken by key). Only the <= 4 candidate keys
            # carry weight, so rank those instead of sorting whole rows.
            ck = np.sort(cand, axis=-1)
            cw = np.take_along_axis(row, ck, axis=-1)
            cw[..., 1:][ck[..., 1:] == ck[..., :-1]] = -1.0  # a key counted once
            order = np.argsort(-cw, axis=-1, kind="stable")
            ck = np.take_along_axis(ck, order, axis=-1)
            cw = np.take_along_axis(cw, order, axis=-1)
            kk = min(K, 4)
            top_k[i, :, :, :kk] = np.where(cw[..., :kk] > 0, ck[..., :kk], -1)
            top_w[i, :, :, :kk] = np.where(cw[..., :kk] > 0, cw[..., :kk], 0)
        return {"attention": att, "attention_top_keys": top_k, "attention_top_weights": top_w}


def _step_sizes(n_positions: int, prompt_length: int) -> list[int]:
    first = max(1, min(prompt_length, n_positions))
    return [first] + [1] * (n_positions - first)


def write_synthetic_trace(path: str | os.PathLike[str], *, n_layers: int = 4,
                          n_positions: int = 24, d_model: int = 32, n_heads: int = 4,
                          prompt_length: int = 4, values: str = "exact", seed: int = 0,
                          captured: Iterable[str] = DEFAULT_CAPTURED,
                          stored_dtype: str = "float16", attention_top_k: int = 8,
                          top_k: int = 5, chunk_bytes: int | None = None,
                          format: str | None = None, overwrite: bool = True,
                          step_sizes: list[int] | None = None, vocab: bool = False) -> Path:
    """Write a synthetic trace through :func:`tracekit.create` and return its path.

    The first step computes the ``prompt_length`` prompt positions at once; every later step
    computes one position (unless ``step_sizes`` says otherwise). ``vocab``: store the
    vocabulary (id ``i`` is ``WORDS[i]``, ids past them `` w<i>``), as format 1.1 allows.
    """
    if values not in ("exact", "random"):
        raise ValueError(f"values must be 'exact' or 'random', not {values!r}")
    plan = synthetic_plan(n_layers, n_positions, d_model, n_heads, captured=captured,
                          stored_dtype=stored_dtype, top_k=top_k,
                          attention_top_k=attention_top_k, chunk_bytes=chunk_bytes)
    sizes = step_sizes or _step_sizes(n_positions, prompt_length)
    if sum(sizes) != n_positions:
        raise ValueError(f"step sizes add up to {sum(sizes)}, not {n_positions}")
    gen = _RandomRows(plan, seed) if values == "random" else None
    writer = tracekit.create(path, plan, format=format, overwrite=overwrite,
                             prompt_length=min(prompt_length, n_positions),
                             run={"prompt": "".join(WORDS[:prompt_length]), "seed": seed},
                             tags={"generator": "tracekit_viewer.synthetic", "values": values},
                             vocab=[*WORDS, *(f" w{i}" for i in range(
                                 len(WORDS), plan.model.vocab_size))] if vocab else None)
    with writer:
        start = 0
        for n in sizes:
            pos = np.arange(start, start + n)
            words = [WORDS[p % len(WORDS)] for p in pos]
            ids = [WORDS.index(w) for w in words]
            if gen is None:
                arrays = _exact_rows(plan, start, n)
            else:
                heavy = np.array([p == 0 or w in (".", " and") for p, w in zip(pos, words,
                                                                             strict=True)])
                arrays = gen.rows(start, n, heavy)
            writer.write_step(ids, words, arrays)
            start += n
    return Path(path)
