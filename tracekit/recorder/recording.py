"""The recording loop: prompt at step 0, then one new position per step with the KV cache.

Every position is recorded exactly once, by the forward pass that computes it, and the steps go to
the writer in small batches of bounded size, so memory stays flat however long the generation runs.
Ctrl-C finalises a valid trace (status ``aborted``) holding every step computed so far.
"""

from __future__ import annotations

import contextlib
import inspect
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import create as create_trace
from ..errors import TraceFullError, WriterError
from ..format import CAPTURE_GROUPS, DEFAULT_ATTENTION_TOP_K, DEFAULT_TOP_K, ModelInfo, TracePlan
from ..sizecap import positions_within
from ..storage import format_from_suffix
from .capture import Capture, StepTaps, eager_attention
from .errors import RecorderError
from .structure import ModelStructure, discover_structure, input_device
from .tokens import token_bytes, vocab_texts

__all__ = [
    "DEFAULT_CAPTURE",
    "limit_heap_fragmentation",
    "RecordResult",
    "Recording",
    "Sampling",
    "StepInfo",
    "record",
]

_PROMPT_META_CHARS = 1 << 16
#: Steps handed to the writer together (see Capture.collect_groups): at most this many, and at
#: most this many bytes of the model's tensors held for them.
_BATCH_STEPS = 8
_BATCH_BYTES = 32 << 20

#: What ``tracekit record`` captures unless told otherwise: everything but the MLP neurons,
#: which are 4x wider than the residual stream and usually the bulk of a trace.
DEFAULT_CAPTURE = tuple(g for g in CAPTURE_GROUPS if g != "neurons")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy unless a temperature, top-k or top-p is given."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise RecorderError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise RecorderError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RecorderError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        if self.temperature == 0:
            return True
        return self.temperature is None and self.top_k is None and self.top_p is None

    def to_json(self) -> dict[str, Any]:
        if self.greedy:
            return {"strategy": "greedy"}
        return {"strategy": "sample", "temperature": self.temperature or 1.0,
                "top_k": self.top_k, "top_p": self.top_p}

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if self.seed is None else int(self.seed))
        return gen

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The next token id from one row of logits (sampling runs on the CPU, so a seed gives
        the same tokens on any device)."""
        if self.greedy:
            return int(torch.argmax(logits))
        x = logits.detach().float().cpu() / (self.temperature or 1.0)
        if self.top_k is not None and self.top_k < x.numel():
            kth = torch.topk(x, self.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            probs, order = torch.sort(torch.softmax(x, dim=-1), descending=True)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
            drop = order[before >= self.top_p]
            x[drop] = float("-inf")
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class StepInfo:
    """Progress after one step, handed to ``on_step``."""

    step: int
    positions: int
    max_positions: int
    new_tokens: int
    bytes_written: int
    elapsed: float


@dataclass
class RecordResult:
    """What a finished recording produced."""

    path: Path | None
    status: str
    positions: int
    steps: int
    prompt_length: int
    token_ids: list[int]
    generated_text: str
    bytes_written: int
    seconds: float
    attn_implementation: str | None
    plan: TracePlan

    @property
    def new_tokens(self) -> int:
        return self.positions - self.prompt_length

    @property
    def tokens_per_second(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0


def _devices(model: torch.nn.Module) -> list[torch.device]:
    """Where the model computes: its parameters' devices, and the execution devices of
    accelerate's hooks for offloaded weights (which sit on ``meta`` between calls)."""
    seen: dict[str, torch.device] = {}
    for p in model.parameters():
        if p.device.type != "meta":
            seen.setdefault(str(p.device), p.device)
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            device = torch.device(device) if not isinstance(device, torch.device) else device
            seen.setdefault(str(device), device)
    return list(seen.values()) or [torch.device("cpu")]


def _model_dtype(model: torch.nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "unknown"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.append(source)
        elif isinstance(source, (list, tuple)):
            ids.extend(int(x) for x in source)
    return sorted(set(ids))


def _context_length(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _environment() -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.machine()}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class Recording:
    """A recording ready to run: the model's structure is mapped, the trace planned and sized.

    ``prompt`` is text (needs ``tokenizer``) or ``input_ids`` a list of ids. ``capture`` names
    the groups to record; groups that do not apply to the model (predictions and logit lens on
    an encoder, neurons on a mixture of experts) are left out and listed in
    :attr:`skipped` with the reason. ``layers`` selects blocks (default: all).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *,
                 prompt: str | None = None, input_ids: Sequence[int] | None = None,
                 max_new_tokens: int = 32, sampling: Sampling | None = None,
                 capture: Iterable[str] = DEFAULT_CAPTURE, layers: Iterable[int] | None = None,
                 store_dtype: str = "float16", top_k: int = DEFAULT_TOP_K,
                 attention_top_k: int = DEFAULT_ATTENTION_TOP_K, stop_at_eos: bool = True,
                 name: str | None = None, structure: ModelStructure | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.sampling = sampling or Sampling()
        self.stop_at_eos = stop_at_eos
        config = getattr(model, "config", None)

        if input_ids is None:
            if prompt is None or tokenizer is None:
                raise RecorderError("give a prompt and a tokenizer, or input_ids")
            input_ids = tokenizer(prompt)["input_ids"]
        self.prompt_ids = [int(i) for i in input_ids]
        if not self.prompt_ids:
            raise RecorderError("the prompt is empty (no tokens)")

        self.structure = structure or discover_structure(model)
        s = self.structure
        self.kind = s.kind
        unknown = set(capture) - set(CAPTURE_GROUPS)
        if unknown:
            raise RecorderError(f"unknown capture group(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(CAPTURE_GROUPS)}")
        groups = [g for g in CAPTURE_GROUPS if g in set(capture)]
        self.skipped: dict[str, str] = {}
        if s.kind == "encoder":
            for g in ("predictions", "logit_lens"):
                if g in groups:
                    self.skipped[g] = "encoder without a language-model head"
        if s.kind == "causal" and "logit_lens" in groups and s.unembedding is None:
            self.skipped["logit_lens"] = "no unembedding (get_output_embeddings) found"
        if "neurons" in groups and (s.d_mlp is None
                                    or any(b.mlp_down is None for b in s.blocks)):
            self.skipped["neurons"] = "no single MLP output projection per block"
        groups = [g for g in groups if g not in self.skipped]
        if not groups:
            raise RecorderError("nothing to capture: every selected group is not applicable "
                                f"to this model ({', '.join(self.skipped)})")
        self.groups = tuple(groups)

        outside = [i for i in self.prompt_ids if not 0 <= i < s.vocab_size]
        if outside:
            raise RecorderError(f"token id {outside[0]} outside the model's vocabulary "
                                f"(0..{s.vocab_size - 1})")
        if s.kind == "encoder":
            max_new_tokens = 0
        if max_new_tokens < 0:
            raise RecorderError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        total = len(self.prompt_ids) + max_new_tokens
        ctx = _context_length(config)
        if ctx is not None and total > ctx:
            raise RecorderError(
                f"prompt ({len(self.prompt_ids)} tokens) + max-new-tokens ({max_new_tokens}) = "
                f"{total} exceeds the model's context length {ctx}")

        layer_list = list(range(s.n_layers)) if layers is None else sorted(set(layers))
        bad = [x for x in layer_list if not 0 <= x < s.n_layers]
        if bad or not layer_list:
            raise RecorderError(f"layers {bad or layer_list} outside 0..{s.n_layers - 1}")
        self.name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        info = ModelInfo(
            name=str(self.name),
            n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, vocab_size=s.vocab_size,
            d_mlp=s.d_mlp, architecture=type(model).__name__,
            model_type=getattr(config, "model_type", None), kind=s.kind,
            revision=getattr(config, "_commit_hash", None),
        )
        # Every id's text travels with the trace, so predictions read as text without the
        # tokenizer (a few hundred kB for 50k ids, compressed; none without a tokenizer).
        self.vocab = None if tokenizer is None else vocab_texts(tokenizer, s.vocab_size)
        self.plan = TracePlan(model=info, max_positions=total, captured=frozenset(groups),
                              layers=tuple(layer_list), stored_dtype=store_dtype, top_k=top_k,
                              attention_top_k=attention_top_k,
                              vocab_bytes=None if self.vocab is None else sum(
                                  len(t) for t in self.vocab))

    @property
    def estimated_bytes(self) -> int:
        """Size on disk of the trace at its planned length, as zarr (HDF5:
        ``plan.estimated_bytes("hdf5")``)."""
        return self.plan.estimated_bytes()

    def run_metadata(self, attn_implementation: str | None) -> dict[str, Any]:
        generation: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "kv_cache": True,
                                      **self.sampling.to_json()}
        if self.kind == "causal":
            generation["stop_at_eos"] = self.stop_at_eos
            generation["eos_token_ids"] = _eos_ids(self.model, self.tokenizer)
        else:
            generation = {"max_new_tokens": 0, "strategy": "single forward step (encoder)"}
        meta: dict[str, Any] = {}
        if self.prompt is not None:
            # The metadata has a size limit (1 MiB); the tokens themselves are in the arrays.
            meta["prompt"] = self.prompt[:_PROMPT_META_CHARS]
            if len(self.prompt) > _PROMPT_META_CHARS:
                meta["prompt_truncated"] = True
        return {
            **meta,
            "generation": generation,
            "seed": None if self.sampling.greedy else self.sampling.seed,
            "model_dtype": _model_dtype(self.model),
            "device": ",".join(str(d) for d in _devices(self.model)),
            "attn_implementation": attn_implementation,
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "structure": self.structure.describe(),
            "skipped": dict(self.skipped),
            "notes": list(self.structure.notes),
        }

    def run(self, out: str | Path | Any, *, format: str | None = None, overwrite: bool = False,
            on_step: Callable[[StepInfo], None] | None = None,
            tags: Mapping[str, Any] | None = None,
            max_bytes: int | None = None) -> RecordResult:
        """Record into ``out`` (a path or a storage backend) and return what was recorded.

        ``max_bytes`` caps the trace's size on disk: generation stops before a step that would
        pass it, and the trace closes with status ``truncated``; TraceFullError (nothing
        written) when not even the prompt fits.

        On KeyboardInterrupt the trace is closed with status ``aborted`` (every computed step
        kept) and the interrupt propagates."""
        if max_bytes is not None:
            fmt = format or (getattr(out, "format_name", None) if not isinstance(
                out, (str, Path)) else None) or format_from_suffix(out)
            fits = positions_within(self.plan, fmt, max_bytes)
            if fits < len(self.prompt_ids):
                raise TraceFullError(
                    f"the {len(self.prompt_ids)}-token prompt alone takes "
                    f"{self.plan.estimated_bytes(fmt, len(self.prompt_ids), 1)} bytes, more "
                    f"than the size cap of {max_bytes}")
        model = self.model
        was_training = model.training
        model.eval()
        with eager_attention(model, "attention" in self.groups) as impl:
            writer = create_trace(
                out, self.plan, format=format, overwrite=overwrite,
                run=self.run_metadata(impl), prompt_length=len(self.prompt_ids),
                tags=tags, environment=_environment(), vocab=self.vocab,
                max_bytes=max_bytes)
            started = time.perf_counter()
            ids: list[int] = []
            steps = 0
            status = "complete"
            try:
                ids, steps = self._loop(writer, on_step, started)
            except BaseException as exc:
                status = "aborted"
                try:
                    writer.close("aborted")
                except WriterError as final:
                    if isinstance(exc, WriterError):  # the writer's own failure, now with
                        raise final from exc          # what the closed trace keeps
                except Exception:  # noqa: S110 - the error that stopped the loop comes first
                    pass
                raise
            finally:
                model.train(was_training)
                if status == "complete":
                    writer.close("complete")
                    if writer.truncated:
                        status = "truncated"
        seconds = time.perf_counter() - started
        new = ids[len(self.prompt_ids):]
        text = self.tokenizer.decode(new) if self.tokenizer is not None and new else ""
        return RecordResult(
            path=writer.path, status=writer.status, positions=writer.committed_positions,
            steps=steps, prompt_length=len(self.prompt_ids), token_ids=ids,
            generated_text=text, bytes_written=writer.bytes_written, seconds=seconds,
            attn_implementation=impl, plan=self.plan)

    def _loop(self, writer: Any, on_step: Callable[[StepInfo], None] | None,
              started: float) -> tuple[list[int], int]:
        model, s = self.model, self.structure
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        device = input_device(model)
        generator = self.sampling.generator()
        eos = set(_eos_ids(model, self.tokenizer)) if self.stop_at_eos else set()
        ids = list(self.prompt_ids)
        new_ids = list(self.prompt_ids)
        max_steps = 1 + self.max_new_tokens
        cache = None
        positions_arg = False  # pass cache_position (to a preallocated cache)
        position = 0
        capture = Capture(s, layers=self.plan.layers, points=self.plan.points,
                          groups=self.groups, store_dtype=self.plan.stored_dtype,
                          top_k=self.plan.top_k, attention_top_k=self.plan.attention_top_k)
        tokenizer = self.tokenizer
        # Steps computed and not yet handed to the writer: (taps, logits, token ids, time,
        # first position). Handed over in small batches (see Capture.collect_groups), at
        # most _BATCH_STEPS steps or _BATCH_BYTES of captured tensors, and whatever is left
        # when the loop ends, by error or Ctrl-C too: every computed step is kept.
        batch: list[tuple[StepTaps, Any, list[int], float, int]] = []

        def hand_over() -> None:
            fresh = [b for b in batch if b[4] >= writer.positions_written]
            at = 0
            for count, arrays in capture.collect_groups([(b[0], b[1]) for b in fresh]):
                group, at = fresh[at:at + count], at + count
                group_ids = [i for b in group for i in b[2]]
                try:
                    writer.write_steps(group_ids, token_bytes(tokenizer, group_ids), arrays,
                                       step_positions=[len(b[2]) for b in group],
                                       step_times=[b[3] for b in group])
                except TraceFullError:  # the cap moved (HDF5 measured its file): it took
                    break  # the steps that fit, and the trace closes "truncated"
            batch.clear()

        step_bytes = 0
        computed = 0
        with torch.inference_mode(), capture:
            try:
                for step in range(max_steps):
                    n = len(new_ids)
                    if position + n > writer.position_limit:
                        writer.truncate()  # the size cap: the trace closes "truncated"
                        del ids[len(ids) - n:]  # sampled, never computed nor recorded
                        break
                    capture.total_keys = position + n
                    inputs = torch.tensor([new_ids], dtype=torch.long, device=device)
                    if s.kind == "causal":
                        extra = {cache_arg: cache}
                        if positions_arg:
                            extra["cache_position"] = torch.arange(position, position + n,
                                                                   device=device)
                        output = model(input_ids=inputs, use_cache=True, **extra)
                        cache = _get(output, "cache", "past_key_values")
                        if step == 0 and max_steps > 1:
                            # The prompt ran with the model's own cache (so it is recorded
                            # exactly as the model computes it without one); generation
                            # continues in place.
                            moved = preallocated_cache(model, cache,
                                                       len(ids) + self.max_new_tokens)
                            if moved is not None:
                                cache, positions_arg = moved, "cache_position" in params
                    else:
                        output = model(input_ids=inputs)
                    logits = _get(output, "logits")
                    taps = capture.take()
                    if not batch:
                        step_bytes = _captured_bytes(taps, logits)
                    batch.append((taps, logits, new_ids, time.time(), position))
                    computed = step + 1
                    if len(batch) >= _BATCH_STEPS or len(batch) * step_bytes >= _BATCH_BYTES:
                        hand_over()
                        if writer.truncated:
                            break
                    position += n
                    if on_step is not None:
                        on_step(StepInfo(step, position, self.plan.max_positions,
                                         position - len(self.prompt_ids), writer.bytes_written,
                                         time.perf_counter() - started))
                    if step == max_steps - 1 or s.kind != "causal":
                        break
                    if new_ids[-1] in eos and step > 0:
                        break
                    token = self.sampling.choose(logits[0, -1], generator)
                    ids.append(token)
                    new_ids = [token]
                hand_over()
            except BaseException:
                if batch:  # steps computed before the error or Ctrl-C are kept
                    with contextlib.suppress(Exception):
                        hand_over()
                raise
        if writer.truncated:  # steps computed past the cap were not recorded
            del ids[writer.positions_written:]
            computed = min(computed, writer.steps_written)
        return ids, computed


def preallocated_cache(model: torch.nn.Module, cache: Any, max_len: int) -> Any:
    """``cache`` (the model's growing cache, after the prompt) copied into a KV cache allocated
    once for ``max_len`` positions (transformers' StaticCache); None where that does not apply
    (sliding windows, caches of another kind, models StaticCache does not know).

    A growing cache reallocates every layer's keys and values at every step (``torch.cat``):
    with large allocations served by mmap (see :func:`limit_heap_fragmentation`) each step
    then pays page faults for the whole cache (1.6x the time of a 1024-token generation of a
    12-layer d768 model on a CPU); in the heap it fragments around the rows waiting for the
    writer. A preallocated cache is written in place. Attention then spans all of it, the
    unused slots masked to weight 0 (the recorder keeps the real keys)."""
    try:
        from transformers import StaticCache

        layers = getattr(cache, "layers", None)
        config = getattr(model, "config", None)
        if not layers or config is None or any(
                getattr(layer, "is_sliding", False) or not hasattr(layer, "keys")
                for layer in layers):
            return None
        static = StaticCache(config=config, max_cache_len=int(max_len))
        if len(static.layers) != len(layers) or any(
                getattr(layer, "is_sliding", False) for layer in static.layers):
            return None
        for i, layer in enumerate(layers):
            static.update(layer.keys, layer.values, i)
        return static
    except Exception:  # a model or config StaticCache does not handle: keep the model's own
        return None


def limit_heap_fragmentation(threshold: int = 128 << 10) -> bool:
    """Serve allocations above ``threshold`` bytes with mmap, returned to the OS when freed.

    glibc raises its mmap threshold to the size of the largest block freed so far; attention
    rows grow by one key per step, so without this each step's arrays land in the heap at a new
    size and fragment it (RSS grew ~100 KB per token at 1024 keys). A process-wide setting:
    ``tracekit record`` calls it; library users may. Returns False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _captured_bytes(taps: StepTaps, logits: Any) -> int:
    """Bytes of the model's tensors one step's taps hold (its logits included)."""
    size = sum(t.nbytes for t in taps.buf.values())
    return size + (logits.nbytes if isinstance(logits, torch.Tensor) else 0)


def _get(output: Any, *keys: str) -> Any:
    for key in keys:
        value = output.get(key) if hasattr(output, "get") else getattr(output, key, None)
        if value is not None:
            return value
    return None


def record(model: torch.nn.Module, tokenizer: Any = None, prompt: str | None = None, *,
           out: str | Path | Any, format: str | None = None, overwrite: bool = False,
           on_step: Callable[[StepInfo], None] | None = None,
           tags: Mapping[str, Any] | None = None, **options: Any) -> RecordResult:
    """Record ``model`` generating from ``prompt`` into the trace ``out``.

    ``options`` go to :class:`Recording` (``input_ids``, ``max_new_tokens``, ``sampling``,
    ``capture``, ``layers``, ``store_dtype``, ``top_k``, ``attention_top_k``, ``stop_at_eos``,
    ``name``)."""
    return Recording(model, tokenizer, prompt=prompt, **options).run(
        out, format=format, overwrite=overwrite, on_step=on_step, tags=tags)

