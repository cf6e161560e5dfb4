"""Forward hooks that gather one step's activations, on whatever device each module runs.

Each hook slices batch 0, computes its summaries (L2 norms, top-k attention) and casts to the
stored dtype *on the module's device* (a torch cast is much faster than numpy's), then starts
the copy to the host. After the forward pass :meth:`Capture.collect` waits for the copies and
stacks the pieces into the per-step arrays :meth:`tracekit.TraceWriter.write_step` takes.
Nothing is kept between steps, so memory does not grow with the sequence.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import RecorderError
from .structure import ModelStructure, first_tensor, input_tensor

__all__ = ["Capture", "TORCH_DTYPES", "eager_attention", "to_numpy"]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}

#: Largest logits block the logit lens materialises at once (positions x vocab x 4 bytes).
_LENS_BLOCK_BYTES = 64 << 20


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[1, n, d] (or [n, d], as OPT's MLP flattens) -> [n, d]: the batch holds one sequence."""
    return t.detach().reshape(-1, t.shape[-1])


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
        self._handles: list[Any] = []
        self._buf: dict[tuple[str, int], Any] = {}
        self._raw: dict[int, torch.Tensor] = {}  # residual points, model dtype, for the lens
        self._calls: dict[tuple[int, int], int] = defaultdict(int)
        self._devices: set[torch.device] = set()
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
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _attach(self) -> None:
        s, groups = self.structure, self.groups
        n_layers = s.n_layers
        want_residual = "residual" in groups or self.keep_raw
        layer_set = set(self.layers)
        point_set = set(self.points) if want_residual else set()
        for part in s.blocks:
            i = part.index
            capture_input = i in point_set
            self._handles.append(part.block.register_forward_pre_hook(
                self._block_pre(i, capture_input), with_kwargs=True))
            if i == n_layers - 1 and n_layers in point_set:
                self._handles.append(part.block.register_forward_hook(self._block_out(n_layers)))
            if i not in layer_set:
                continue
            # attn_out / mlp_out may be one module called twice (Phi): one hook, by call index.
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
                self._handles.append(module.register_forward_hook(
                    self._output_hook(i, roles[key])))
            if "neurons" in groups:
                if part.mlp_down is None:
                    raise RecorderError(f"block {i}: neurons cannot be captured for this model")
                self._handles.append(part.mlp_down.register_forward_pre_hook(
                    self._neuron_hook(i), with_kwargs=True))

    def _block_pre(self, layer: int, capture_input: bool):
        def hook(module, args, kwargs):
            for key in [k for k in self._calls if k[0] == layer]:
                del self._calls[key]
            if capture_input:
                self._residual(layer, input_tensor(args, kwargs))
        return hook

    def _block_out(self, point: int):
        def hook(module, args, output):
            self._residual(point, first_tensor(output))
        return hook

    def _output_hook(self, layer: int, roles: list[tuple[int, str]]):
        def hook(module, args, output):
            key = (layer, id(module))
            call = self._calls[key]
            self._calls[key] = call + 1
            for want, role in roles:
                if want != call:
                    continue
                if role == "attention":
                    self._attention(layer, _attention_weights(output))
                else:
                    self._vector(role, layer, first_tensor(output))
        return hook

    def _neuron_hook(self, layer: int):
        def hook(module, args, kwargs):
            x = input_tensor(args, kwargs)
            if x is not None:
                self._buf[("neurons", layer)] = self._host(_rows(x), x)
        return hook

    # -- per-tensor processing (on the module's device) ---------------------------------------
    def _host(self, t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Cast to the stored dtype and start the copy to the host. A CPU tensor that still
        shares memory with the model's own tensor is cloned: the model may reuse it."""
        t = t.to(self.dtype)
        if t.device.type == "cpu":
            if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                t = t.clone()
            return t
        self._devices.add(t.device)
        return t.to("cpu", non_blocking=True)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(x.float(), dim=-1)
        if n.device.type != "cpu":
            self._devices.add(n.device)
            return n.to("cpu", non_blocking=True)
        return n

    def _residual(self, point: int, t: torch.Tensor | None) -> None:
        if t is None:
            return
        x = _rows(t)
        if self.keep_raw:
            self._raw[point] = x
        if "residual" in self.groups:
            self._buf[("residual", point)] = self._host(x, t)
            self._buf[("residual_norm", point)] = self._norm(x)

    def _vector(self, role: str, layer: int, t: torch.Tensor | None) -> None:
        if t is None:
            return
        x = _rows(t)
        self._buf[(role, layer)] = self._host(x, t)
        self._buf[(f"{role}_norm", layer)] = self._norm(x)

    def _attention(self, layer: int, w: torch.Tensor | None) -> None:
        if w is None:
            impl = getattr(getattr(self.structure.model, "config", None),
                           "_attn_implementation", None)
            raise RecorderError(
                f"block {layer}: the attention module returned no attention pattern with "
                f"attn_implementation={impl!r}; attention capture needs 'eager'")
        w = w.detach()[0].transpose(0, 1)  # [query, head, key]
        keys = w.shape[-1]
        total = self.total_keys or keys
        if keys < total:  # a sliding-window cache keeps only the most recent keys
            w = torch.nn.functional.pad(w, (total - keys, 0))
        elif keys > total:  # a cache with room to spare: keys past the sequence are empty
            w = w[..., :total]
        kk = min(self.attention_top_k, w.shape[-1])
        vals, idx = torch.topk(w.float(), kk, dim=-1)
        idx = torch.where(vals > 0, idx, torch.full_like(idx, -1)).to(torch.int32)
        vals = torch.where(vals > 0, vals, torch.zeros_like(vals))
        if kk < self.attention_top_k:
            pad = self.attention_top_k - kk
            idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
            vals = torch.nn.functional.pad(vals, (0, pad))
        self._buf[("attention", layer)] = self._host(w, w)
        self._buf[("attention_top_keys", layer)] = self._to_cpu(idx)
        self._buf[("attention_top_weights", layer)] = self._to_cpu(vals)

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        self._devices.add(t.device)
        return t.to("cpu", non_blocking=True)

    # -- per step -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._buf.clear()
        self._raw.clear()
        self._calls.clear()

    def _stack(self, name: str, keys: Iterable[int]) -> torch.Tensor:
        try:
            return torch.stack([self._buf[(name, k)] for k in keys], dim=1)
        except KeyError as exc:
            raise RecorderError(
                f"no {name} was captured for layer/point {exc.args[0][1]} in this step "
                f"(the module's hook did not run)") from exc

    def collect(self, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This step's arrays as CPU tensors, keyed like ``write_step``'s arrays."""
        for device in self._devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        groups = self.groups
        out: dict[str, torch.Tensor] = {}
        if "residual" in groups:
            out["residual"] = self._stack("residual", self.points)
            out["residual_norm"] = self._stack("residual_norm", self.points)
        for role in ("attn_out", "mlp_out"):
            if role in groups:
                out[role] = self._stack(role, self.layers)
                out[f"{role}_norm"] = self._stack(f"{role}_norm", self.layers)
        if "attention" in groups:
            out["attention"] = self._stack("attention", self.layers)
            out["attention_top_keys"] = self._stack("attention_top_keys", self.layers)
            out["attention_top_weights"] = self._stack("attention_top_weights", self.layers)
        if "neurons" in groups:
            out["neurons"] = self._stack("neurons", self.layers)
        if "predictions" in groups:
            if logits is None:
                raise RecorderError("the model returned no logits to record predictions from")
            lp = torch.log_softmax(logits.detach()[0].float(), dim=-1)
            vals, ids = torch.topk(lp, self.top_k, dim=-1)
            out["top_ids"] = ids.to(torch.int32).cpu()
            out["top_logprobs"] = vals.cpu()
        if "logit_lens" in groups:
            # All points of all new positions in one batch: a CPU matmul against the
            # unembedding reads its (large) weight once per block instead of once per point.
            missing = [p for p in self.points if p not in self._raw]
            if missing:
                raise RecorderError(f"no residual stream was captured at point {missing[0]}")
            device = self._lens_device()
            stacked = torch.stack([self._raw[p].to(device) for p in self.points], dim=1)
            n, n_points = stacked.shape[:2]
            ids, lps = self.lens_top_k(stacked.reshape(n * n_points, -1))
            out["lens_ids"] = ids.reshape(n, n_points, -1)
            out["lens_logprobs"] = lps.reshape(n, n_points, -1)
        return out

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


def to_numpy(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU tensors -> numpy; bfloat16 travels as its uint16 bits (the stored form)."""
    out = {}
    for name, t in arrays.items():
        if t.dtype == torch.bfloat16:
            out[name] = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            out[name] = t.numpy()
    return out


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
