"""Level-of-detail summaries the writer derives from each step's arrays: L2 norms, value
ranges and top-k attention (small arrays, so an overview reads kilobytes)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

#: Summary arrays derived from each input array.
_NORMS = {"residual": "residual_norm", "attn_out": "attn_out_norm", "mlp_out": "mlp_out_norm"}
_RANGES = {"residual": "residual_range", "attn_out": "attn_out_range",
           "mlp_out": "mlp_out_range", "neurons": "neurons_range"}


def _as_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint16:  # bfloat16 bits
        x = x.view(ml_dtypes.bfloat16)
    return x.astype(np.float32, copy=False)


def _summaries(name: str, steps: list[Any], blocks: list[np.ndarray],
               logical: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Norms (given by the producer, or computed) and value ranges of one array's rows."""
    norms = rng = None
    if name in _NORMS:
        norm_name = _NORMS[name]
        if all(norm_name in s.arrays for s in steps):
            norms = np.asarray(np.concatenate([s.arrays[norm_name] for s in steps]),
                               dtype=np.float32)
        else:
            norms = np.concatenate([_norms(b) for b in blocks])
    if name in _RANGES:
        rng = np.concatenate([row_min_max(b, logical) for b in blocks])
    return norms, rng


def _norms(stored: np.ndarray) -> np.ndarray:
    """L2 norm over the last axis, accumulated in float32."""
    values = _as_float32(stored)
    return np.sqrt(np.einsum("...i,...i->...", values, values))


def row_min_max(stored: np.ndarray, logical: str) -> np.ndarray:
    """[n, 2] min and max of each row of stored activations.

    16-bit floats are reduced as integers (numpy vectorises integer min/max, not float16's):
    as int16, the largest value is the largest float whenever the row has a non-negative
    value; as uint16, the largest value is the most negative float whenever the row has a
    negative one. Rows of a single sign (rare) take one more reduction."""
    n = stored.shape[0]
    if logical not in ("float16", "bfloat16"):
        values = stored.reshape(n, -1)
        return np.stack([values.min(axis=1), values.max(axis=1)], axis=1).astype(np.float32)
    signed = stored.view(np.int16).reshape(n, -1)
    unsigned = signed.view(np.uint16)
    hi = signed.max(axis=1)
    lo = unsigned.max(axis=1).view(np.int16)
    all_negative = hi < 0  # then the max is the negative value nearest zero
    if all_negative.any():
        hi[all_negative] = unsigned[all_negative].min(axis=1).view(np.int16)
    no_negative = lo >= 0  # then the min is the smallest non-negative value
    if no_negative.any():
        lo[no_negative] = signed[no_negative].min(axis=1)
    ftype = np.float16 if logical == "float16" else ml_dtypes.bfloat16
    return np.stack([lo, hi], axis=1).view(ftype).astype(np.float32)


def attention_top_k(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` keys per row of ``weights[..., key]``, by weight, descending; -1 where the
    weight is 0 (no key there)."""
    keys = weights.shape[-1]
    kk = min(k, keys)
    idx = np.argpartition(-weights, kk - 1, axis=-1)[..., :kk]
    w = np.take_along_axis(weights, idx, axis=-1)
    order = np.argsort(-w, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=-1)
    w = np.take_along_axis(w, order, axis=-1)
    out_i = np.full((*weights.shape[:-1], k), -1, dtype=np.int32)
    out_w = np.zeros((*weights.shape[:-1], k), dtype=np.float32)
    out_i[..., :kk] = np.where(w > 0, idx, -1)
    out_w[..., :kk] = np.where(w > 0, w, 0)
    return out_i, out_w
