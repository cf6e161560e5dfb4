"""Replay: re-run the recorded model teacher-forced on the recorded tokens and compare.

One full forward pass over the trace's tokens (no KV cache) recomputes every captured array;
each is compared with the trace. Activations are compared row by row, relative to the row's
largest magnitude (the residual stream grows with depth and has outlier dimensions, so one
global scale would hide errors in small rows); attention weights are already in [0, 1] and are
compared absolutely; predictions and the logit lens are compared in log-probability: the replay's
top-k log-probabilities, and the replay's log-probability of every recorded id (so a tie that
orders two ids differently is not an error, a wrong id is).

Tolerances depend on the coarser of the stored dtype and the dtype the model ran in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..reader import Trace
from .capture import Capture, eager_attention
from .errors import RecorderError
from .structure import ModelStructure, discover_structure, input_device

__all__ = ["TOLERANCES", "ArrayCheck", "VerifyReport", "tolerances_for", "verify_trace"]

#: dtype -> (activation tolerance relative to each row's largest |value|,
#:           attention-weight tolerance (absolute), log-probability tolerance (absolute)).
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float32": (1e-4, 1e-5, 1e-3),
    "float16": (1e-2, 2e-3, 5e-2),
    "bfloat16": (5e-2, 1e-2, 2.5e-1),
}
_COARSENESS = ("float32", "float16", "bfloat16")


def tolerances_for(stored_dtype: str, model_dtype: str | None = None) -> tuple[str, tuple]:
    """The effective dtype (coarser of stored and model dtype) and its tolerances."""
    candidates = [d for d in (stored_dtype, model_dtype) if d in _COARSENESS]
    effective = max(candidates, key=_COARSENESS.index) if candidates else "float32"
    return effective, TOLERANCES[effective]


@dataclass(frozen=True)
class ArrayCheck:
    """One array's comparison: raw deviations, the normalised one tested, and the limit."""

    name: str
    max_abs: float  #: largest |replay - trace|
    mean_abs: float  #: mean |replay - trace|
    measure: float  #: the tested deviation (relative for activations, absolute otherwise)
    tolerance: float
    kind: str  #: "relative", "absolute" or "logprob"

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.measure)) and self.measure <= self.tolerance


@dataclass
class VerifyReport:
    """Result of :func:`verify_trace`."""

    checks: list[ArrayCheck]
    positions: int
    effective_dtype: str
    attn_implementation: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


def _float(a: np.ndarray) -> np.ndarray:
    if a.dtype == ml_dtypes.bfloat16:
        return a.astype(np.float32)
    return np.asarray(a, dtype=np.float32)


def _relative(name: str, replay: np.ndarray, recorded: np.ndarray, rtol: float) -> ArrayCheck:
    diff = np.abs(replay - recorded)
    scale = np.maximum(np.abs(recorded).max(axis=-1, keepdims=True), 1e-6)
    rel = float((diff / scale).max()) if diff.size else 0.0
    return ArrayCheck(name, float(diff.max()) if diff.size else 0.0,
                      float(diff.mean()) if diff.size else 0.0, rel, rtol, "relative")


def _absolute(name: str, replay: np.ndarray, recorded: np.ndarray, tol: float,
              kind: str = "absolute") -> ArrayCheck:
    diff = np.abs(replay - recorded)
    worst = float(diff.max()) if diff.size else 0.0
    return ArrayCheck(name, worst, float(diff.mean()) if diff.size else 0.0, worst, tol, kind)


def _check_model(trace: Trace, s: ModelStructure) -> None:
    m = trace.model
    mine = {"architecture": type(s.model).__name__, "n_layers": s.n_layers,
            "d_model": s.d_model, "n_heads": s.n_heads, "vocab_size": s.vocab_size,
            "kind": s.kind}
    if not m.get("architecture"):
        del mine["architecture"]
    wrong = [f"{k} {v} (trace: {m.get(k)})" for k, v in mine.items() if m.get(k) != v]
    if wrong:
        raise RecorderError(f"the model does not match the trace: {', '.join(wrong)}")


def verify_trace(trace: Trace, model: torch.nn.Module, *, tolerance: float | None = None,
                 structure: ModelStructure | None = None) -> VerifyReport:
    """Re-run ``model`` on ``trace``'s tokens in one forward pass and compare every captured
    array. ``tolerance`` overrides the activation tolerance (relative)."""
    s = structure or discover_structure(model)
    _check_model(trace, s)
    plan = trace.plan
    n = trace.n_positions
    if n == 0:
        raise RecorderError("the trace has no committed positions to verify")
    ids = np.asarray(trace.tokens.ids, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= s.vocab_size:
        raise RecorderError("the trace's token ids are outside the model's vocabulary")
    run = trace.metadata.get("run") or {}
    effective, (rtol, attn_tol, lp_tol) = tolerances_for(plan.stored_dtype,
                                                         run.get("model_dtype"))
    if tolerance is not None:
        scale = tolerance / rtol
        rtol, attn_tol, lp_tol = tolerance, attn_tol * scale, lp_tol * scale
    groups = set(plan.captured)
    hooked = groups - {"predictions", "logit_lens"}
    capture = Capture(s, layers=plan.layers, points=plan.points, groups=hooked,
                      store_dtype="float32", top_k=plan.top_k,
                      attention_top_k=plan.attention_top_k,
                      keep_raw_residual="logit_lens" in groups)
    device = input_device(model)
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model, "attention" in groups) as impl, torch.inference_mode(), \
                capture:
            capture.reset()
            capture.total_keys = n
            kwargs: dict[str, Any] = {}
            if s.kind == "causal" and "use_cache" in inspect.signature(model.forward).parameters:
                kwargs["use_cache"] = False
            output = model(input_ids=torch.as_tensor(ids[None], device=device), **kwargs)
            arrays = capture.collect(None)
            logits = output.get("logits") if hasattr(output, "get") else None
            checks = []
            for name in ("residual", "attn_out", "mlp_out", "attention", "neurons"):
                if name not in arrays:
                    continue
                recorded = _float(trace[name][:n])
                replay = np.asarray(arrays.pop(name), dtype=np.float32)
                if name == "attention":
                    checks.append(_absolute(name, replay, recorded, attn_tol))
                else:
                    checks.append(_relative(name, replay, recorded, rtol))
                del recorded, replay
            if "predictions" in groups:
                if logits is None:
                    raise RecorderError("the model returned no logits; cannot verify predictions")
                lp = torch.log_softmax(logits.detach()[0].float(), dim=-1).cpu()
                checks += _logprob_checks("top", lp, trace["top_ids"][:n],
                                          trace["top_logprobs"][:n], lp_tol)
            if "logit_lens" in groups:
                checks += _lens_checks(trace, capture, n, lp_tol)
    finally:
        model.train(was_training)
    return VerifyReport(checks, n, effective, impl)


def _logprob_checks(prefix: str, lp: torch.Tensor, rec_ids: np.ndarray, rec_lp: np.ndarray,
                    tol: float) -> list[ArrayCheck]:
    k = rec_ids.shape[-1]
    rec_lp = np.asarray(rec_lp, dtype=np.float32)
    top = torch.topk(lp, k, dim=-1).values.numpy()
    idx = torch.as_tensor(np.clip(rec_ids.astype(np.int64), 0, lp.shape[-1] - 1))
    gathered = torch.gather(lp, -1, idx).numpy()
    gathered = np.where((rec_ids >= 0) & (rec_ids < lp.shape[-1]), gathered, -np.inf)
    return [_absolute(f"{prefix}_ids", gathered, rec_lp, tol, "logprob"),
            _absolute(f"{prefix}_logprobs", top, rec_lp, tol, "logprob")]


def _lens_checks(trace: Trace, capture: Capture, n: int, tol: float) -> list[ArrayCheck]:
    rec_ids = trace["lens_ids"][:n]
    rec_lp = np.asarray(trace["lens_logprobs"][:n], dtype=np.float32)
    k = rec_ids.shape[-1]
    gathered = np.empty_like(rec_lp)
    top = np.empty_like(rec_lp)
    for j, point in enumerate(capture.points):
        raw = capture.raw_residual.get(point)
        if raw is None:
            raise RecorderError(f"replay captured no residual stream at point {point}")
        for start, lp in capture.lens_log_softmax_blocks(raw):
            lp = lp.cpu()
            stop = start + lp.shape[0]
            ids = rec_ids[start:stop, j]
            top[start:stop, j] = torch.topk(lp, k, dim=-1).values.numpy()
            got = torch.gather(lp, -1, torch.as_tensor(
                np.clip(ids.astype(np.int64), 0, lp.shape[-1] - 1))).numpy()
            gathered[start:stop, j] = np.where((ids >= 0) & (ids < lp.shape[-1]), got, -np.inf)
    return [_absolute("lens_ids", gathered, rec_lp, tol, "logprob"),
            _absolute("lens_logprobs", top, rec_lp, tol, "logprob")]

