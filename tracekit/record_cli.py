"""``tracekit record`` and ``tracekit replay``: the commands that run a model.

This module imports neither torch nor transformers: the recorder is imported inside the command
functions, so ``tracekit --help`` and the other commands stay fast and work without the
``record`` extra.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click

from ._cliutil import (
    TRACE,
    TraceCommand,
    human_bytes,
    index_ranges,
    output_format,
    parse_size,
    remote_options,
)
from .format import CAPTURE_GROUPS

__all__ = ["parse_capture", "parse_layers", "parse_size", "record", "replay"]

#: Mirrors ``tracekit.recorder.DEFAULT_CAPTURE`` without importing torch.
DEFAULT_CAPTURE = tuple(g for g in CAPTURE_GROUPS if g != "neurons")


#: The logit lens is one (points x d_model x vocab) matmul per token: negligible on a GPU, but
#: on a CPU it can cost more than the model itself (GPT-2 small: 13 x 768 x 50257 = 5e8).
LENS_CPU_BUDGET = 2e7


def lens_cost(structure: Any, layers: list[int] | None) -> float:
    """Multiply-adds per token of the logit lens over the points of ``layers``."""
    layers = list(range(structure.n_layers)) if layers is None else layers
    points = {p for x in layers for p in (x, x + 1)}
    return float(len(points) * structure.d_model * structure.vocab_size)


def _model_devices(model: Any) -> list[Any]:
    from .recorder.recording import _devices

    return _devices(model)


def parse_layers(text: str | None) -> list[int] | None:
    """``0,3,5`` or ``2:6`` (half-open, like Python) or ``:4`` / ``8:``; None = all layers.
    Ranges with an open end are resolved later against the model (returned as negatives)."""
    if text is None or text.strip() in ("", "all"):
        return None
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, _, hi = part.partition(":")
                start = int(lo) if lo.strip() else 0
                stop = int(hi) if hi.strip() else None
                if stop is None:
                    layers.add(-1 - start)  # "start:" -> resolved by _resolve_layers
                    continue
                if stop <= start:
                    raise ValueError
                layers.update(range(start, stop))
            else:
                layers.add(int(part))
        except ValueError:
            raise click.BadParameter(
                f"{text!r}: use layer numbers and ranges like 0,3,5 or 2:6") from None
    return sorted(layers)


def _resolve_layers(layers: list[int] | None, n_layers: int) -> list[int] | None:
    if layers is None:
        return None
    out: set[int] = set()
    for x in layers:
        if x < 0:
            out.update(range(-1 - x, n_layers))
        else:
            out.add(x)
    return sorted(out)


def parse_capture(text: str) -> list[str]:
    """Comma list of capture groups; ``all`` is every group, ``default`` the default set."""
    groups: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            groups.extend(CAPTURE_GROUPS)
        elif part == "default":
            groups.extend(DEFAULT_CAPTURE)
        elif part in CAPTURE_GROUPS:
            groups.append(part)
        elif part:
            raise click.BadParameter(
                f"unknown group {part!r}; choose from {', '.join(CAPTURE_GROUPS)}, all, default")
    if not groups:
        raise click.BadParameter("capture at least one group")
    return [g for g in CAPTURE_GROUPS if g in groups]


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        return prompt_file.read_text(encoding="utf-8")
    return prompt  # type: ignore[return-value]


def _free_bytes(out: Path) -> int | None:
    folder = out.resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@click.command(cls=TraceCommand)
@click.argument("model", required=False)
@click.option("-p", "--prompt", help="The prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from a UTF-8 file.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Trace to write: a .zarr folder or a .h5 file.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]),
              help="Trace format [default: from OUT's suffix, else zarr].")
@click.option("-n", "--max-new-tokens", default=32, show_default=True,
              type=click.IntRange(min=0), help="Tokens to generate (causal models).")
@click.option("--temperature", type=click.FloatRange(min=0),
              help="Sample at this temperature (default: greedy; 0 is greedy).")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the k likeliest tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
              help="Sample from the smallest set with this probability mass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-text token.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N, or auto (every visible GPU, else the CPU).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Model dtype (auto: float32 on CPU, the checkpoint's on GPU).")
@click.option("--store-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Stored activation dtype (auto: the model's 16-bit dtype, else float16).")
@click.option("--capture", "capture_text",
              help=f"Groups to record, comma separated: {', '.join(CAPTURE_GROUPS)}; 'all'; "
                   f"'default' (all but neurons). Unset: the default, without logit_lens on a "
                   f"CPU when it would cost over {LENS_CPU_BUDGET:.0e} multiply-adds per token.")
@click.option("--layers", "layers_text", help="Blocks to record: 0,3,5 or 2:6 [default: all].")
@click.option("--max-size", "max_size_text",
              help="Cap the trace's size on disk (e.g. 2GB): stop before a step would pass it "
                   "(status truncated); refuse to start if the prompt alone would.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model's own Python code to run (off by default).")
def record(model: str | None, prompt: str | None, prompt_file: Path | None, out: Path,
           fmt: str | None, max_new_tokens: int, temperature: float | None, top_k: int | None,
           top_p: float | None, seed: int, ignore_eos: bool, device: str, dtype: str,
           store_dtype: str, capture_text: str | None, layers_text: str | None,
           max_size_text: str | None, force: bool, trust_remote_code: bool) -> None:
    """Stream a model's internals on a prompt into a trace."""
    text = _read_prompt(prompt, prompt_file)
    groups = parse_capture(capture_text or "default")
    layers = parse_layers(layers_text)
    max_size = parse_size(max_size_text) if max_size_text else None
    fmt = output_format(out, fmt)
    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists (pass --force to overwrite)")

    from .recorder import Recording, Sampling, load_model
    from .recorder.loading import model_name_for
    from .recorder.recording import limit_heap_fragmentation

    limit_heap_fragmentation()  # flat memory while attention rows grow step by step

    try:
        with _status(f"Loading {model or 'the demo model'}"):
            lm, tokenizer = load_model(
                model, device=device, dtype=dtype,
                attn_implementation="eager" if "attention" in groups else None,
                trust_remote_code=trust_remote_code)
    except KeyboardInterrupt:
        click.echo("Interrupted while loading the model: nothing was written", err=True)
        raise SystemExit(130) from None
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    from .recorder import discover_structure

    structure = discover_structure(lm)
    model_dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
    if store_dtype == "auto":
        store_dtype = model_dtype if model_dtype in ("float16", "bfloat16") else "float16"
    skipped = {}
    if capture_text is None and "logit_lens" in groups and structure.kind == "causal":
        cost = lens_cost(structure, _resolve_layers(layers, structure.n_layers))
        if cost > LENS_CPU_BUDGET and all(d.type == "cpu" for d in _model_devices(lm)):
            groups.remove("logit_lens")
            skipped["logit_lens"] = (f"on a CPU it costs {cost:.1e} multiply-adds per token; "
                                     f"add it with --capture default")
    rec = Recording(lm, tokenizer, prompt=text, max_new_tokens=max_new_tokens,
                    sampling=sampling, capture=groups,
                    layers=_resolve_layers(layers, structure.n_layers),
                    store_dtype=store_dtype, stop_at_eos=not ignore_eos,
                    name=model_name_for(model), structure=structure)
    rec.skipped.update(skipped)
    _print_plan(rec, fmt)
    plan = rec.plan
    estimate = plan.estimated_bytes(fmt)
    if max_size is not None and estimate > max_size:
        from .sizecap import positions_within

        fits, prompt = positions_within(plan, fmt, max_size), len(rec.prompt_ids)
        if fits < prompt:
            raise click.ClickException(
                f"the {prompt}-token prompt alone takes "
                f"{human_bytes(plan.estimated_bytes(fmt, prompt, 1))}, more than --max-size "
                f"{human_bytes(max_size)}; capture less (--capture, --layers, --store-dtype) "
                f"or raise --max-size")
        click.echo(f"Size cap  {human_bytes(max_size)}: recording stops after at most {fits} "
                   f"of {plan.max_positions} positions (status truncated)")
    free = _free_bytes(out)
    if free is not None and estimate > free:
        click.echo(f"Warning   only {human_bytes(free)} free where {out} goes", err=True)

    try:
        with _progress(rec.plan.max_positions) as update:
            result = rec.run(out, format=fmt, overwrite=force, on_step=update,
                             max_bytes=max_size)
    except KeyboardInterrupt:
        click.echo(interrupted_message(out), err=True)
        raise SystemExit(130) from None
    if rec.kind == "causal":
        click.echo(f"Generated {result.generated_text!r}")
    click.echo(f"Trace     {out} ({result.status}: {result.positions} positions, "
               f"{human_bytes(result.bytes_written)} written, "
               f"{result.tokens_per_second:.1f} tokens/s)")


def interrupted_message(out: Path) -> str:
    """What a Ctrl-C left behind, read back from ``out`` itself (the trace appears there only
    once it is laid out, so an early Ctrl-C leaves nothing)."""
    if not out.exists():
        return f"Interrupted before {out} was created: nothing was written"
    from .errors import TraceError
    from .reader import open_or_error

    try:
        with open_or_error(out) as t:
            positions, steps, status = t.n_positions, t.n_steps, t.status
    except TraceError as exc:
        return f"Interrupted: {out} cannot be opened ({exc})"
    if positions == 0:
        return f"Interrupted: {out} holds no position yet (status {status})"
    return (f"Interrupted: {out} keeps the {positions} positions of {steps} steps recorded so "
            f"far (status {status})")


def _print_plan(rec: Any, fmt: str) -> None:
    plan, s = rec.plan, rec.structure
    m = plan.model
    run = rec.run_metadata(None)
    impl = "eager" if "attention" in rec.groups else getattr(
        getattr(rec.model, "config", None), "_attn_implementation", None)
    d_mlp = f", d_mlp {m.d_mlp}" if m.d_mlp else ""
    lines = [
        f"Model     {m.name} ({m.architecture}, {m.kind}): {m.n_layers} layers, "
        f"d_model {m.d_model}, {m.n_heads} heads{d_mlp}, vocab {m.vocab_size}",
    ]
    where = f"{run['device']}, {run['model_dtype']}, {impl} attention"
    prompt_len = len(rec.prompt_ids)
    if rec.kind == "causal":
        how = "greedy" if rec.sampling.greedy else (
            f"sampling (temperature {rec.sampling.temperature or 1.0}, top-k "
            f"{rec.sampling.top_k or 'off'}, top-p {rec.sampling.top_p or 'off'}, "
            f"seed {rec.sampling.seed})")
        lines.append(f"Run       {where}; {how}, up to {rec.max_new_tokens} new tokens after a "
                     f"{prompt_len}-token prompt")
    else:
        lines.append(f"Run       {where}; one forward step over {prompt_len} tokens (encoder)")
    lines.append(f"Capture   {', '.join(rec.groups)}; layers {index_ranges(list(plan.layers))} "
                 f"(points {index_ranges(list(plan.points))}); stored as {plan.stored_dtype}")
    if rec.skipped:
        reasons: dict[str, list[str]] = {}
        for g, why in rec.skipped.items():
            reasons.setdefault(why, []).append(g)
        lines.append("Skipped   " + "; ".join(f"{', '.join(g)} ({why})"
                                              for why, g in reasons.items()))
    for note in s.notes:
        lines.append(f"Note      {note}")
    lines.append(f"Estimate  {human_bytes(plan.estimated_bytes(fmt))} for at most "
                 f"{plan.max_positions} positions ({fmt})")
    click.echo("\n".join(lines))


class _status:
    """A transient spinner on stderr while the model loads (terminal only)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._ctx: Any = None

    def __enter__(self) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            self._ctx = console.status(self.text)
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


class _progress:
    """Rich progress bar on stderr: tokens, tokens/s and bytes written (terminal only)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __enter__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("Recording"), BarColumn(), MofNCompleteColumn(),
            TextColumn("positions, {task.fields[rate]} tokens/s, {task.fields[written]}"),
            TimeElapsedColumn(), console=console, transient=True,
            disable=not console.is_terminal)
        self._bar.__enter__()
        self._task = self._bar.add_task("record", total=self.total, rate="-", written="0 B")
        self._t0 = time.perf_counter()

        def update(info: Any) -> None:
            rate = info.positions / info.elapsed if info.elapsed > 0 else 0.0
            self._bar.update(self._task, completed=info.positions, rate=f"{rate:.1f}",
                             written=human_bytes(info.bytes_written))

        return update

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)


@click.command(cls=TraceCommand)
@click.argument("trace", type=TRACE)
@click.option("--verify", is_flag=True,
              help="Exit 1 when any array deviates beyond the tolerance.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True),
              help="Activation tolerance relative to each row's largest value (default: by "
                   "dtype: float32 1e-4, float16 1e-2, bfloat16 5e-2); the others scale with it.")
@click.option("--model", "model_override",
              help="Load the model from here instead of the name in the trace.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Dtype to replay in (float32 is the reference).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model's own Python code to run (off by default).")
@remote_options
def replay(trace: Path | str, verify: bool, tolerance: float | None,
           model_override: str | None, device: str, dtype: str, trust_remote_code: bool,
           remote: dict[str, Any]) -> None:
    """Re-run a trace's model on its tokens; report deviations.

    TRACE is a path or a URL (https://, s3://, gs://, az://, any fsspec URL); only the
    chunks read are fetched.
    """
    from .reader import open_or_error
    from .recorder import load_model, verify_trace
    from .recorder.errors import RecorderError
    from .recorder.hub import describe_source

    with open_or_error(trace, **remote) as t:
        name = model_override or t.model["name"]
        if not model_override:  # a trace from elsewhere names any model: say which, from where
            click.echo(f"Loading   {name} (named by the trace) from {describe_source(name)}",
                       err=True)
        try:
            with _status(f"Loading {name}"):
                lm, _ = load_model(name, device=device, dtype=dtype,
                                   attn_implementation="eager" if "attention" in t.captured
                                   else None, trust_remote_code=trust_remote_code,
                                   load_tokenizer=False)
        except RecorderError as exc:
            if model_override:
                raise
            raise RecorderError(f"{exc}; the trace names this model: pass --model PATH to "
                                f"load it from a local folder") from None
        run_dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
        where = str(next(lm.parameters()).device)
        report = verify_trace(t, lm, tolerance=tolerance)
    click.echo(f"Replay    {name} on {report.positions} recorded tokens ({where}, {run_dtype}, "
               f"{report.attn_implementation} attention)")
    click.echo(f"{'array':<15} {'max |dev|':>10} {'mean |dev|':>10} {'tested':>10} "
               f"{'limit':>9}  result")
    for c in report.checks:
        unit = {"relative": "rel", "absolute": "abs", "logprob": "lp"}[c.kind]
        click.echo(f"{c.name:<15} {c.max_abs:>10.2e} {c.mean_abs:>10.2e} "
                   f"{c.measure:>6.2e} {unit:<3} {c.tolerance:>9.2e}  "
                   f"{'ok' if c.ok else 'FAIL'}")
    if report.ok:
        click.echo(f"Verified  every array within tolerance (compared as "
                   f"{report.effective_dtype})")
        return
    click.echo(f"Failed    {', '.join(report.failed)} beyond tolerance (compared as "
               f"{report.effective_dtype})")
    if verify:
        raise SystemExit(1)
