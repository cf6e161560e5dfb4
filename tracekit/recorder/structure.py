"""Find, by structure, where a Hugging Face model keeps the parts a trace records.

No table of model names: one tiny probe forward pass with a hook on every module tells us the
execution order, the shapes, and which module's output flows unchanged into which module's
input. From that:

* **blocks**: the ``nn.ModuleList`` of identical modules holding most of the parameters;
* **attention**: the shallowest module in a block whose ``forward`` takes an ``attention_mask``
  (every attention implementation in transformers does; MLPs and norms do not);
* **attention output projection**: the last linear layer that ran inside the attention module and
  produced a ``d_model``-wide output; **what attention adds** is that output followed through any
  leaf modules that take it unchanged (dropout, Gemma-2's post-attention norm);
* **MLP output projection**: the last ``d_model``-wide linear layer of the block outside the
  attention; its *input* is the MLP's hidden activation after the nonlinearity (and after the
  gate product in gated MLPs): the **neurons**; **what the MLP adds** is found like attention's;
* **final norm chain** and **unembedding**: the leaf modules that take the last block's output
  unchanged up to ``get_output_embeddings()``; used by the logit lens and checked against the
  model's real logits on the probe.

The probe also checks the residual decomposition ``block_out - block_in == attn + mlp``, true for
pre-norm blocks (sequential or parallel) and false for post-norm encoders like BERT.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

__all__ = ["BlockParts", "ModelStructure", "discover_structure", "first_tensor", "input_device"]


@dataclass(frozen=True)
class BlockParts:
    """The modules of one transformer block that recording hooks."""

    index: int
    block: nn.Module
    attention: nn.Module  #: returns the attention pattern (eager attention) in its output tuple
    attn_out: nn.Module  #: its output is what attention adds to the residual stream
    mlp_out: nn.Module  #: its output is what the MLP adds to the residual stream
    mlp_down: nn.Module | None  #: its input is the MLP's hidden activation (the neurons)
    names: dict[str, str] = field(default_factory=dict)  #: role -> qualified module name
    #: Which call of ``attn_out`` / ``mlp_out`` within one run of the block: Phi passes both
    #: sublayers through one shared dropout module, so the module alone is ambiguous.
    attn_out_call: int = 0
    mlp_out_call: int = 0


@dataclass
class ModelStructure:
    """What :func:`discover_structure` found. ``kind`` is ``"causal"`` or ``"encoder"``."""

    model: nn.Module
    kind: str
    blocks: list[BlockParts]
    blocks_name: str
    embedding: nn.Module | None
    final: list[nn.Module]  #: modules between the last block's output and the unembedding
    unembedding: nn.Module | None
    d_model: int
    n_heads: int
    d_mlp: int | None
    vocab_size: int
    logit_softcap: float | None = None
    residual_additive: bool = True  #: block_out - block_in == attn_out + mlp_out (probe-checked)
    lens_exact: bool = False  #: final chain + unembedding reproduced the model's logits
    notes: list[str] = field(default_factory=list)
    names: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def lens_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits the model would produce if ``x`` (residual stream, [..., d_model]) were the
        last block's output: the final norm chain, the unembedding and any logit soft-cap."""
        if self.unembedding is None:
            raise UnsupportedArchitectureError("this model has no unembedding (no LM head)")
        for module in self.final:
            x = first_tensor(module(x))
        logits = first_tensor(self.unembedding(x))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def describe(self) -> dict[str, Any]:
        """Where each part was found, for the trace metadata (``run.structure``)."""
        return {
            **self.names,
            "residual_additive": self.residual_additive,
            "logit_lens": ("exact" if self.lens_exact else "approximate")
            if self.unembedding is not None else None,
        }


# -- small helpers ---------------------------------------------------------------------------
def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of a module's output (a tensor, a tuple/list, or a ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                return item
        return None
    if isinstance(obj, dict):
        for item in obj.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The main input of a module call: its first positional tensor, else ``hidden_states``."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


def _is_linear(module: nn.Module) -> bool:
    """A leaf with a 2-d weight that is not an embedding table: nn.Linear, GPT-2's Conv1D,
    quantised linear layers."""
    if isinstance(module, nn.Embedding) or any(True for _ in module.children()):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2


def _is_leaf(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _same(a: Any, b: Any) -> bool:
    """The same tensor, or one with identical values (a view, or moved to another device)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.numel() == 0:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    return bool(torch.equal(a, b))


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class _Call:
    order: int
    name: str
    module: nn.Module
    input: torch.Tensor | None
    output: torch.Tensor | None
    raw_output: Any


# -- discovery -------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList of same-class modules with the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params and (best is None or n_params > best[0]):
            best = (n_params, name, module)
    if best is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: could not find the transformer blocks (an nn.ModuleList "
            f"of identical modules with parameters)")
    return best[1], best[2]


def model_kind(model: nn.Module) -> str:
    """``causal`` for models that generate, ``encoder`` for the rest (one forward step)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is an encoder-decoder model; tracekit records decoder-only "
            f"causal LMs and encoders")
    can_generate = getattr(model, "can_generate", None)
    return "causal" if callable(can_generate) and can_generate() else "encoder"


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (first device of a spread model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _probe_ids(model: nn.Module, vocab_size: int, length: int = 5) -> torch.Tensor:
    device = input_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(4, vocab_size - 1), vocab_size, (1, length), generator=gen)
    return ids.to(device)


def run_probe(model: nn.Module, ids: torch.Tensor) -> tuple[list[_Call], Any]:
    """One forward pass with a hook on every module; returns the calls in completion order."""
    calls: list[_Call] = []
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def hook(module, args, kwargs, output):
        calls.append(_Call(len(calls), names.get(id(module), "?"), module,
                           input_tensor(args, kwargs), first_tensor(output), output))

    for m in model.modules():
        if m is not model:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            kwargs: dict[str, Any] = {}
            if "use_cache" in inspect.signature(model.forward).parameters:
                kwargs["use_cache"] = False
            output = model(input_ids=ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _follow(start: _Call, later: list[_Call]) -> _Call:
    """Follow ``start``'s output through leaf modules that take it unchanged (dropout, a
    post-norm) and return the last call of that chain."""
    current = start
    for call in later:
        if call.order <= current.order or not _is_leaf(call.module):
            continue
        out = call.output
        if (_same(call.input, current.output) and out is not None
                and out.shape == current.output.shape):
            current = call
    return current


def _rel(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else name


def _block_parts(index: int, block_name: str, block: nn.Module, calls: list[_Call],
                 d_model: int) -> tuple[BlockParts, dict[str, Any]]:
    prefix = block_name + "."
    inside = [c for c in calls if c.name.startswith(prefix)]
    where = f"block {index} ({block_name}, {type(block).__name__})"
    if not inside:
        raise UnsupportedArchitectureError(f"{where} did not run during the probe forward pass")

    # Attention: the shallowest module that takes an attention mask (name as a last resort).
    candidates = [c for c in inside if _takes_attention_mask(c.module)]
    if not candidates:
        candidates = [c for c in inside if "attn" in type(c.module).__name__.lower()
                      or "attention" in type(c.module).__name__.lower()]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{where}: could not find the attention module (no submodule whose forward takes "
            f"an attention_mask)")
    depth = min(c.name.count(".") for c in candidates)
    attention = min((c for c in candidates if c.name.count(".") == depth),
                    key=lambda c: c.order)
    att_prefix = attention.name + "."

    def width(c: _Call) -> int | None:
        return None if c.output is None else c.output.shape[-1]

    att_linears = [c for c in inside if c.name.startswith(att_prefix) and _is_linear(c.module)
                   and width(c) == d_model]
    if not att_linears:
        raise UnsupportedArchitectureError(
            f"{where}: could not find the attention output projection (a {d_model}-wide linear "
            f"layer inside {attention.name})")
    o_proj = att_linears[-1]
    attn_end = _follow(o_proj, inside)
    if (attn_end.output is not None and attention.output is not None
            and attn_end.output.shape == attention.output.shape
            and _same(attention.output, attn_end.output)):
        # The attention module returns what it adds (GPT-2, Llama, ...): one hook there then
        # gives both the pattern and attn_out, and every hook costs time at every step.
        attn_end = attention

    mlp_linears = [c for c in inside if _is_linear(c.module) and not c.name.startswith(att_prefix)]
    downs = [c for c in mlp_linears if width(c) == d_model]
    if not downs:
        raise UnsupportedArchitectureError(
            f"{where}: could not find the MLP output projection (a {d_model}-wide linear layer "
            f"outside the attention module {attention.name})")
    down = downs[-1]
    notes = {}
    if len({c.name for c in downs}) > 1:
        # Mixture of experts: several down projections. Take the module containing them all.
        common = _common_prefix([c.name for c in mlp_linears])
        container = next((c for c in inside if c.name == common), None)
        if container is None or container.output is None:
            raise UnsupportedArchitectureError(
                f"{where}: several MLP output projections and no module containing them")
        mlp_end = _follow(container, inside)
        mlp_down = None
        notes["neurons"] = "unavailable: several MLP output projections (mixture of experts?)"
    else:
        mlp_end = _follow(down, inside)
        mlp_down = down.module

    names = {
        "attention": attention.name,
        "attn_out": attn_end.name,
        "mlp_out": mlp_end.name,
        "neurons": f"{down.name} (input)" if mlp_down is not None else None,
    }
    def occurrence(c: _Call) -> int:
        return sum(1 for o in inside if o.module is c.module and o.order < c.order)

    attn_k, mlp_k = occurrence(attn_end), occurrence(mlp_end)
    if attn_k:
        names["attn_out"] += f" (call {attn_k + 1})"
    if mlp_k:
        names["mlp_out"] += f" (call {mlp_k + 1})"
    parts = BlockParts(index, block, attention.module, attn_end.module, mlp_end.module,
                       mlp_down, names, attn_k, mlp_k)
    facts = {
        "attn": attn_end.output, "mlp": mlp_end.output,
        "d_mlp": down.input.shape[-1] if mlp_down is not None and down.input is not None
        else None,
        **notes,
    }
    return parts, facts


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _pattern(names: list[str | None], blocks_name: str) -> str | list[str | None] | None:
    """``model.layers.{i}.mlp`` when every block uses the same relative name, else the list."""
    if any(n is None for n in names):
        return names[0] if len(set(names)) == 1 else names
    rel = []
    for i, n in enumerate(names):
        head = f"{blocks_name}.{i}."
        rel.append(n[len(head):] if n.startswith(head) else None)
    if all(r is not None for r in rel) and len(set(rel)) == 1:
        return f"{blocks_name}.{{i}}.{rel[0]}"
    return list(names)


def discover_structure(model: nn.Module) -> ModelStructure:
    """Map ``model``'s modules to the parts a trace records; raise
    :class:`UnsupportedArchitectureError` naming the first part it could not find."""
    config = getattr(model, "config", None)
    kind = model_kind(model)
    blocks_name, blocks = find_blocks(model)
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
        else None
    if kind == "encoder":
        unembedding = None
    vocab = _config_int(config, "vocab_size")
    if vocab is None and unembedding is not None and hasattr(unembedding, "weight"):
        vocab = int(unembedding.weight.shape[0])
    if vocab is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = int(emb.weight.shape[0]) if emb is not None else None
    if vocab is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: could not find the vocabulary size (config.vocab_size)")

    was_training = model.training
    model.eval()
    try:
        calls, output = run_probe(model, _probe_ids(model, vocab))
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: the probe forward pass failed ({type(exc).__name__}: "
            f"{exc})") from exc
    finally:
        model.train(was_training)

    block_calls = {id(b): next((c for c in calls if c.module is b), None) for b in blocks}
    first = block_calls[id(blocks[0])]
    if first is None or first.input is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: its blocks ({blocks_name}) did not run on input_ids")
    d_model = int(first.input.shape[-1])

    parts: list[BlockParts] = []
    additive = True
    d_mlps: set[int | None] = set()
    notes: list[str] = []
    for i, block in enumerate(blocks):
        bcall = block_calls[id(block)]
        if bcall is None:
            raise UnsupportedArchitectureError(
                f"block {i} ({blocks_name}.{i}) did not run during the probe forward pass")
        p, facts = _block_parts(i, f"{blocks_name}.{i}", block, calls, d_model)
        parts.append(p)
        d_mlps.add(facts["d_mlp"])
        if "neurons" in facts and facts["neurons"] not in notes:
            notes.append(facts["neurons"])
        if bcall.input is not None and bcall.output is not None:
            def flat(t: torch.Tensor) -> torch.Tensor:
                return t.detach().float().reshape(-1, d_model)

            delta = flat(bcall.output) - flat(bcall.input)
            added = flat(facts["attn"]) + flat(facts["mlp"])
            scale = max(1e-6, float(delta.abs().max()))
            if float((delta - added).abs().max()) > 1e-3 * scale:
                additive = False
    d_mlp = d_mlps.pop() if len(d_mlps) == 1 else None
    if d_mlp is None and not notes:
        notes.append("neurons unavailable: blocks have different MLP widths")
    if not additive:
        notes.append("residual stream is not additive (post-norm blocks): attn_out and mlp_out "
                     "are what each sublayer adds before its LayerNorm")

    # The final norm chain: leaf modules taking the last block's output unchanged.
    last = block_calls[id(blocks[-1])]
    final: list[nn.Module] = []
    final_names: list[str] = []
    current = last
    for call in calls:
        if call.order <= last.order:
            continue
        if unembedding is not None and call.module is unembedding:
            break
        if call.name.startswith(blocks_name + "."):
            continue
        if (_is_leaf(call.module) and call.output is not None
                and _same(call.input, current.output)):
            final.append(call.module)
            final_names.append(call.name)
            current = call

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names_of = {id(m): n for n, m in model.named_modules()}
    structure = ModelStructure(
        model=model, kind=kind, blocks=parts, blocks_name=blocks_name, embedding=embedding,
        final=final, unembedding=unembedding, d_model=d_model,
        n_heads=_config_int(config, "num_attention_heads", "n_head", "num_heads") or 0,
        d_mlp=d_mlp, vocab_size=vocab,
        logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
        residual_additive=additive, notes=notes,
    )
    structure.names = {
        "blocks": blocks_name,
        "embedding": names_of.get(id(embedding)) if embedding is not None else None,
        **{role: _pattern([p.names[role] for p in parts], blocks_name)
           for role in ("attention", "attn_out", "mlp_out", "neurons")},
        "final_norm": final_names,
        "unembedding": names_of.get(id(unembedding)) if unembedding is not None else None,
    }
    if structure.n_heads == 0:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: could not find the number of attention heads in its config")
    if unembedding is not None:
        structure.lens_exact = _check_lens(structure, current_last=last.output, output=output)
        if not structure.lens_exact:
            notes.append("logit lens is approximate: the final norm chain + unembedding did not "
                         "reproduce the model's logits")
    return structure


def _check_lens(structure: ModelStructure, current_last: torch.Tensor, output: Any) -> bool:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        return False
    with torch.inference_mode():
        try:
            mine = structure.lens_logits(current_last)
        except Exception:
            return False
    if mine.shape != logits.shape:
        return False
    ref = logits.float()
    diff = float((mine.float().to(ref.device) - ref).abs().max())
    scale = max(1e-6, float(ref.abs().max()))
    tol = 1e-4 if ref.dtype == torch.float32 and logits.dtype == torch.float32 else 2e-2
    return diff <= tol * scale or math.isclose(diff, 0.0)

