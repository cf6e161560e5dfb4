"""Taps that gather each step's activations, on whatever device each module runs.

A tap wraps a module's forward (see :meth:`Capture._tap`) and only keeps a reference to the
tensor it sees; :meth:`Capture.take` hands a forward pass's references over. Then
:meth:`Capture.collect_groups` stacks each group over layers (and over a batch of steps) on the
device, computes the summaries (L2 norms, top-k attention), casts to the stored dtype there (a
torch cast is much faster than numpy's) and copies each array to the host once: a few batched
operations for several steps instead of several per layer and step. The caller holds a bounded
number of steps, so memory does not grow with the sequence."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import RecorderError
from .structure import ModelStructure, first_tensor, input_tensor

__all__ = ["Capture", "StepTaps", "TORCH_DTYPES", "eager_attention"]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}

#: Largest logits block the logit lens materialises at once (positions x vocab x 4 bytes).
_LENS_BLOCK_BYTES = 64 << 20


def _stacked_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of [1, n, d] (or [n, d], as OPT's MLP flattens) -> one [n, k, d]: the batch
    holds one sequence. One stack and one reshape, whatever k is."""
    d = parts[0].shape[-1]
    try:
        stacked = torch.stack(parts, dim=-2)
    except RuntimeError:  # shapes differ
        stacked = torch.stack([p.reshape(-1, d) for p in parts], dim=-2)
    return stacked.reshape(-1, len(parts), d)


def _attention_weights(output: Any) -> torch.Tensor | None:
    """The attention pattern in an attention module's output: its 4-d tensor."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            return item
    return None


class Capture:
    """Hooks for one recording. Use as a context manager around the forward passes; call
    :meth:`collect` after each forward to get that step's arrays (torch, on the CPU)."""

    def __init__(self, structure: ModelStructure, *, layers: Iterable[int],
                 points: Iterable[int], groups: Iterable[str], store_dtype: str = "float16",
                 top_k: int = 10, attention_top_k: int = 8,
                 keep_raw_residual: bool = False) -> None:
        self.structure = structure
        self.layers = tuple(layers)
        self.points = tuple(points)
        self.groups = frozenset(groups)
        self.dtype = TORCH_DTYPES[store_dtype]
        self.top_k = top_k
        self.attention_top_k = attention_top_k
        self.keep_raw = keep_raw_residual or "logit_lens" in self.groups
        self._wrapped: list[tuple[torch.nn.Module, Any]] = []  # (module, its own forward)
        self._buf: dict[tuple[str, int], Any] = {}
        self._raw: dict[int, torch.Tensor] = {}  # residual points, model dtype, for the lens
        self._calls: dict[tuple[int, int], int] = {}
        self.total_keys = 0  # keys the current step's queries can see (set by the caller)

    # -- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        try:
            self._attach()
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def detach(self) -> None:
        for module, own in reversed(self._wrapped):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._wrapped.clear()

    def _tap(self, module: torch.nn.Module, before=None, after=None) -> None:
        """Call ``before(args, kwargs)`` and/or ``after(output)`` around ``module``'s forward.

        The forward is wrapped on the instance (as accelerate does for device maps) rather
        than hooked: a module with a torch hook takes nn.Module's slow call path, at every
        hooked module of every step (on the demo model a decode step cost 0.25 ms more with
        hooks, 0.17 ms with these taps). ``detach`` restores what was there (accelerate's own
        wrapper included)."""
        own = module.__dict__.get("forward")
        inner = module.forward

        if before is None:
            def forward(*args, **kwargs):
                out = inner(*args, **kwargs)
                after(out)
                return out
        elif after is None:
            def forward(*args, **kwargs):
                before(args, kwargs)
                return inner(*args, **kwargs)
        else:
            def forward(*args, **kwargs):
                before(args, kwargs)
                out = inner(*args, **kwargs)
                after(out)
                return out
        module.forward = forward
        self._wrapped.append((module, own))

    def _attach(self) -> None:
        s, groups = self.structure, self.groups
        n_layers = s.n_layers
        want_residual = "residual" in groups or self.keep_raw
        layer_set = set(self.layers)
        point_set = set(self.points) if want_residual else set()
        for part in s.blocks:
            i = part.index
            last = i == n_layers - 1 and n_layers in point_set
            self._tap(part.block, self._block_in(i, i in point_set),
                      self._block_out(n_layers) if last else None)
            if i not in layer_set:
                continue
            # attn_out / mlp_out may be one module called twice (Phi): one tap, by call index.
            roles: dict[int, list[tuple[int, str]]] = defaultdict(list)
            modules: dict[int, torch.nn.Module] = {}
            if "attn_out" in groups:
                roles[id(part.attn_out)].append((part.attn_out_call, "attn_out"))
                modules[id(part.attn_out)] = part.attn_out
            if "mlp_out" in groups:
                roles[id(part.mlp_out)].append((part.mlp_out_call, "mlp_out"))
                modules[id(part.mlp_out)] = part.mlp_out
            if "attention" in groups:
                roles[id(part.attention)].append((0, "attention"))
                modules[id(part.attention)] = part.attention
            for key, module in modules.items():
                self._tap(module, after=self._outputs(i, key, roles[key]))
            if "neurons" in groups:
                if part.mlp_down is None:
                    raise RecorderError(f"block {i}: neurons cannot be captured for this model")
                self._tap(part.mlp_down, before=self._neuron_input(i))

    def _block_in(self, layer: int, capture_input: bool):
        def before(args, kwargs):
            if self._calls:
                for key in [k for k in self._calls if k[0] == layer]:
                    del self._calls[key]
            if capture_input:
                self._keep("residual", layer, input_tensor(args, kwargs))
        return before

    def _block_out(self, point: int):
        def after(output):
            self._keep("residual", point, first_tensor(output))
        return after

    def _outputs(self, layer: int, module_id: int, roles: list[tuple[int, str]]):
        key = (layer, module_id)

        def after(output):
            call = self._calls.get(key, 0)
            self._calls[key] = call + 1
            for want, role in roles:
                if want != call:
                    continue
                if role == "attention":
                    w = _attention_weights(output)
                    if w is None:
                        self._no_attention(layer)
                    self._buf[("attention", layer)] = w  # [1, head, query, key]
                else:
                    self._keep(role, layer, first_tensor(output))
        return after

    def _neuron_input(self, layer: int):
        def before(args, kwargs):
            self._keep("neurons", layer, input_tensor(args, kwargs))
        return before

    def _keep(self, role: str, index: int, t: torch.Tensor | None) -> None:
        # Only a reference (not even a view: every torch call costs microseconds, at every
        # hook of every step): all the work happens in collect_groups(), batched over layers
        # and steps. transformers does not modify activations in place (autograd would refuse it
        # in training), and the architecture tests compare every family with a fresh forward.
        if t is not None:
            self._buf[(role, index)] = t

    def _no_attention(self, layer: int) -> None:
        impl = getattr(getattr(self.structure.model, "config", None), "_attn_implementation",
                       None)
        raise RecorderError(
            f"block {layer}: the attention module returned no attention pattern with "
            f"attn_implementation={impl!r}; attention capture needs 'eager'")

    # -- per step -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._buf.clear()
        self._raw.clear()
        self._calls.clear()

    def take(self) -> StepTaps:
        """Hand over what the taps kept in the forward pass just run (references, nothing
        copied) and start a fresh buffer for the next one."""
        taps = StepTaps(self._buf, self.total_keys)
        self._buf = {}
        self._calls.clear()
        return taps

    def collect(self, logits: torch.Tensor | None) -> dict[str, np.ndarray]:
        """This step's arrays on the host (numpy; bfloat16 as its uint16 bits, the stored
        form), keyed like ``write_step``'s arrays, from what the taps hold now."""
        return self.collect_groups([(StepTaps(self._buf, self.total_keys), logits)])[0][1]

    def collect_groups(self, steps: Sequence[tuple[StepTaps, torch.Tensor | None]]
                       ) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The arrays of several steps (see :meth:`take`), as ``(count, arrays)`` for runs of
        ``count`` consecutive steps, keyed like ``write_steps``' arrays (every step's rows,
        attention over the last step's keys, 0 after a row's own).

        Consecutive steps of the same shapes (the decode steps of a preallocated cache) are
        one run: each stack, norm, top-k, cast and copy to the host runs once for all of
        them. On a CPU a step of a small model is a few milliseconds and every torch call
        costs microseconds (tens, just after a forward pass has run); on a GPU each copy to
        the host is a synchronisation. The values equal step-by-step collection."""
        groups: list[tuple[int, dict[str, np.ndarray]]] = []
        keys = [_batch_key(taps, logits) for taps, logits in steps]
        i = 0
        while i < len(steps):
            j = i + 1
            if keys[i] is not None:
                while j < len(steps) and keys[j] == keys[i]:
                    j += 1
            groups.append((j - i, self._collect_group(steps[i:j])))
            i = j
        return groups

    def _collect_group(self, steps: Sequence[tuple[StepTaps, torch.Tensor | None]]
                       ) -> dict[str, np.ndarray]:
        bufs = [taps.buf for taps, _ in steps]
        totals = [taps.total_keys for taps, _ in steps]
        groups = self.groups
        out: dict[str, np.ndarray] = {}
        residual = self._stream_vectors(bufs, out)
        if residual is None and self.keep_raw:
            residual = self._rows(bufs, [("residual", p) for p in self.points])
        if self.keep_raw and residual is not None:
            self._raw = {p: residual[:, j] for j, p in enumerate(self.points)}
        if "attention" in groups:
            self._attention_arrays(bufs, totals, out)
        if "neurons" in groups:
            out["neurons"] = _host(self._rows(bufs, [("neurons", k) for k in self.layers])
                                   .to(self.dtype))
        top = None
        logits = [lg for _, lg in steps]
        if logits[0] is not None and ("predictions" in groups or "logit_lens" in groups):
            rows = logits[0][0] if len(logits) == 1 else torch.stack(logits).flatten(0, 2)
            lp = torch.log_softmax(_float(rows), dim=-1)
            vals, ids = torch.topk(lp, self.top_k, dim=-1)
            top = (ids.to(torch.int32).cpu(), vals.cpu())
        if "predictions" in groups:
            if top is None:
                raise RecorderError("the model returned no logits to record predictions from")
            out["top_ids"], out["top_logprobs"] = top[0].numpy(), top[1].numpy()
        if "logit_lens" in groups:
            lens_ids, lens_lp = self._lens(residual, top)
            out["lens_ids"], out["lens_logprobs"] = lens_ids.numpy(), lens_lp.numpy()
        return out

    def _rows(self, bufs: list[dict], wanted: list[tuple[str, int]]) -> torch.Tensor:
        """The captured tensors ``wanted`` of every step in ``bufs`` as [position, key, d]:
        the steps' positions one after another. One stack, on the device of the first (a
        model spread over devices moves the others there)."""
        try:
            parts = [buf[key] for buf in bufs for key in wanted]
        except KeyError as exc:
            raise RecorderError(
                f"no {exc.args[0][0]} was captured for layer/point {exc.args[0][1]} in this "
                f"step (the module's hook did not run)") from exc
        device = parts[0].device
        if any(p.device != device for p in parts):
            parts = [p.to(device) for p in parts]
        x = _stacked_rows(parts)  # [n, steps * k, d]
        if len(bufs) > 1:
            n, _, d = x.shape
            x = x.reshape(n, len(bufs), len(wanted), d).transpose(0, 1).reshape(-1, len(wanted), d)
        return x

    def _stream_vectors(self, bufs: list[dict], out: dict[str, np.ndarray]
                        ) -> torch.Tensor | None:
        """Residual stream, attention out and MLP out (all d_model wide) stacked together, so
        norms, the cast and the copy to the host are one operation each, not three (then
        split on the host, where slicing costs nothing).
        Returns the residual part (model dtype, on the device) for the logit lens."""
        groups = [(name, keys) for name, keys in (
            ("residual", self.points), ("attn_out", self.layers), ("mlp_out", self.layers))
            if name in self.groups]
        if not groups:
            return None
        x = self._rows(bufs, [(name, k) for name, keys in groups for k in keys])
        norms = _host(torch.linalg.vector_norm(_float(x), dim=-1))
        stored = _host(x.to(self.dtype))  # x is a fresh stack, not the model's memory
        at = 0
        residual = None
        for name, keys in groups:
            width = len(keys)
            out[name] = stored[:, at: at + width]
            out[f"{name}_norm"] = norms[:, at: at + width]
            if name == "residual" and self.keep_raw:
                residual = x[:, at: at + width]
            at += width
        return residual

    def _attention_arrays(self, bufs: list[dict], totals: list[int],
                          out: dict[str, np.ndarray]) -> None:
        parts = []
        for buf in bufs:
            for layer in self.layers:
                w = buf.get(("attention", layer))
                if w is None:
                    raise RecorderError(
                        f"no attention was captured for layer {layer} in this step")
                parts.append(w)
        total = max(totals)
        device = parts[0].device
        if any(p.device != device or p.shape != parts[0].shape for p in parts):
            # layers of different caches (sliding windows) or devices: one step at a time
            parts = [_keys_to(p, total).to(device) for p in parts]
        # [step * layer, batch, head, query, key] -> [step * query, layer, head, key], batch
        # 0; the keys fitted to the sequence once (the usual case: layers share one cache)
        w = _keys_to(torch.stack(parts)[:, 0], total)
        if len(bufs) == 1:
            w = w.permute(2, 0, 1, 3)
        else:
            w = w.unflatten(0, (len(bufs), -1)).permute(0, 3, 1, 2, 4).flatten(0, 1)
        kk = min(self.attention_top_k, w.shape[-1])
        vals, idx = torch.topk(_float(w), kk, dim=-1)
        out["attention"] = _host(w.to(self.dtype).contiguous())
        # Small: finished on the host, where each operation costs less than a torch call.
        vals, idx = _host(vals), _host(idx).astype(np.int32)
        if kk < self.attention_top_k or vals.min() <= 0:  # fewer keys than k, or masked ones
            empty = vals <= 0
            keys_out = np.full((*vals.shape[:-1], self.attention_top_k), -1, dtype=np.int32)
            weights_out = np.zeros(keys_out.shape, dtype=np.float32)
            keys_out[..., :kk] = np.where(empty, -1, idx)
            weights_out[..., :kk] = np.where(empty, 0.0, vals)
            idx, vals = keys_out, weights_out
        out["attention_top_keys"] = idx
        out["attention_top_weights"] = vals

    def _lens(self, residual: torch.Tensor, top: tuple | None) -> tuple[torch.Tensor, ...]:
        """Top-k of the logit lens at every point. All points of all new positions go through
        one batched matmul (on a CPU it reads the large unembedding once, not once per point).
        The last point is the model's own output: when the lens reproduces the logits exactly,
        its row is the predictions' top-k, saving one more row of the matmul."""
        n, n_points = residual.shape[:2]
        last = self.structure.n_layers
        reuse = (top is not None and self.structure.lens_exact and self.points[-1] == last
                 and top[0].shape[0] == n)
        decode = residual[:, :-1] if reuse else residual
        parts_ids, parts_lp = [], []
        if decode.shape[1]:
            ids, lps = self.lens_top_k(decode.reshape(n * decode.shape[1], -1))
            parts_ids.append(ids.reshape(n, decode.shape[1], -1))
            parts_lp.append(lps.reshape(n, decode.shape[1], -1))
        if reuse:
            parts_ids.append(top[0][:, None])
            parts_lp.append(top[1][:, None])
        return torch.cat(parts_ids, dim=1), torch.cat(parts_lp, dim=1)

    def lens_log_softmax_blocks(self, x: torch.Tensor):
        """Yield ``(start, log_softmax(lens logits))`` over blocks of positions of ``x``."""
        s = self.structure
        device = self._lens_device(x.device)
        block = max(1, _LENS_BLOCK_BYTES // (4 * s.vocab_size))
        for start in range(0, x.shape[0], block):
            chunk = x[start:start + block].to(device)
            yield start, torch.log_softmax(s.lens_logits(chunk).float(), dim=-1)

    def _lens_device(self, default: torch.device | None = None) -> torch.device:
        weight = getattr(self.structure.unembedding, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
        return default or torch.device("cpu")

    def lens_top_k(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_parts, lp_parts = [], []
        for _, lp in self.lens_log_softmax_blocks(x):
            vals, ids = torch.topk(lp, self.top_k, dim=-1)
            ids_parts.append(ids.to(torch.int32).cpu())
            lp_parts.append(vals.cpu())
        return torch.cat(ids_parts), torch.cat(lp_parts)

    @property
    def raw_residual(self) -> dict[int, torch.Tensor]:
        """This step's residual stream per point, in the model's dtype (for the logit lens)."""
        return self._raw


@dataclass(frozen=True)
class StepTaps:
    """What the taps kept in one forward pass (references to the model's tensors, by role
    and layer) and the number of keys its queries could see."""

    buf: dict[tuple[str, int], Any]
    total_keys: int


def _batch_key(taps: StepTaps, logits: torch.Tensor | None) -> tuple | None:
    """Steps with equal keys are collected together: the same tensors of the same shapes,
    every layer's attention over one cache that holds at least the step's keys (so no step
    needs its own padding). None: the step is collected alone."""
    shapes = tuple(t.shape for t in taps.buf.values())
    shapes += (None if logits is None else logits.shape,)
    keys = {t.shape[-1] for (role, _), t in taps.buf.items() if role == "attention"}
    if len(keys) > 1 or (keys and keys.pop() < taps.total_keys):
        return None  # layers with caches of their own, or a sliding window
    return shapes


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32, without a torch call when it already is (each call costs
    microseconds, at every step)."""
    return t if t.dtype == torch.float32 else t.float()


def _keys_to(w: torch.Tensor, total: int) -> torch.Tensor:
    """Attention weights over exactly ``total`` keys: a preallocated cache has spare slots
    past the sequence (weight 0: dropped); a sliding-window cache keeps only the latest keys
    (the earlier ones get weight 0)."""
    keys = w.shape[-1]
    if not total or keys == total:
        return w
    if keys > total:
        return w[..., :total]
    return torch.nn.functional.pad(w, (total - keys, 0))


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy (copied there if on a device); bfloat16 travels as its
    uint16 bits (the stored form)."""
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, needed: bool):
    """Switch to eager attention while attention patterns are recorded (sdpa and flash return
    none), restore afterwards; yields the implementation that runs."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = needed and before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except Exception as exc:
            raise RecorderError(f"cannot switch the model to eager attention, which recording "
                                f"attention patterns needs: {exc}") from exc
    try:
        yield getattr(config, "_attn_implementation", None)
    finally:
        if switch:
            with contextlib.suppress(Exception):
                model.set_attn_implementation(before)
