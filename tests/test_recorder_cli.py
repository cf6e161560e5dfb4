"""``tracekit record`` as a user types it: exact output lines, one-line errors, options."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

import tracekit  # noqa: E402
from tracekit._cliutil import human_bytes  # noqa: E402
from tracekit.cli import main  # noqa: E402
from tracekit.record_cli import parse_capture, parse_layers, parse_size  # noqa: E402
from tracekit.recorder.testing import save_tiny_model  # noqa: E402
from tracekit.validate import validate  # noqa: E402

PROMPT = "def fib(n):"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2").resolve()


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_record_prints_plan_text_and_trace(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fib.zarr"
    result = run("record", model_dir, "--prompt", PROMPT, "-o", out, "-n", "6")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    with tracekit.open(out) as t:
        n_prompt = t.prompt_length
        generated = "".join(tok.text for tok in t.tokens[n_prompt:])
        assert t.n_positions == n_prompt + 6 and t.status == "complete"
        assert t.model["name"] == str(model_dir)
        assert t.metadata["run"]["prompt"] == PROMPT
    assert lines[:4] == [
        f"Model     {model_dir} (GPT2LMHeadModel, causal): 2 layers, d_model 32, 4 heads, "
        f"d_mlp 128, vocab 512",
        f"Run       cpu, float32, eager attention; greedy, up to 6 new tokens after a "
        f"{n_prompt}-token prompt",
        "Capture   residual, attn_out, mlp_out, attention, predictions, logit_lens; layers 0-1 "
        "(points 0-2); stored as float16",
        f"Estimate  {lines[3].split()[1]} KB for at most {n_prompt + 6} positions (zarr)",
    ]
    assert lines[4] == f"Generated {generated!r}"
    assert re.fullmatch(rf"Trace     {re.escape(str(out))} \(complete: {n_prompt + 6} "
                        r"positions, [0-9.]+ KB written, [0-9.]+ tokens/s\)", lines[5])
    assert len(lines) == 6


def test_format_follows_the_suffix_unless_given(model_dir: Path, tmp_path: Path) -> None:
    assert run("record", model_dir, "-p", PROMPT, "-o", tmp_path / "a.h5", "-n", "1"
               ).exit_code == 0
    assert (tmp_path / "a.h5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert run("record", model_dir, "-p", PROMPT, "-o", tmp_path / "b.trace", "-n", "1",
               "--format", "hdf5").exit_code == 0
    assert (tmp_path / "b.trace").is_file()
    assert run("record", model_dir, "-p", PROMPT, "-o", tmp_path / "c", "-n", "1",
               "--format", "zarr").exit_code == 0
    assert (tmp_path / "c" / "zarr.json").is_file()


@pytest.mark.parametrize("name", ["x.txt", "trace", "t.zip"])
def test_an_unknown_suffix_is_refused_without_format(model_dir: Path, tmp_path: Path,
                                                      name: str) -> None:
    out = tmp_path / name
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "1")
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {out}: a trace is named .zarr (a folder) or .h5/.hdf5 "
                             f"(a file); or choose with --format zarr|hdf5\n")
    assert list(tmp_path.iterdir()) == []


def test_options_reach_the_trace(model_dir: Path, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("import os\n", encoding="utf-8")
    out = tmp_path / "t.h5"
    result = run("record", model_dir, "--prompt-file", prompt_file, "-o", out, "-n", "4",
                 "--capture", "residual,neurons,logit_lens", "--layers", "1:",
                 "--store-dtype", "bfloat16", "--temperature", "0.7", "--top-k", "20",
                 "--seed", "5", "--ignore-eos")
    assert result.exit_code == 0, result.output
    assert "sampling (temperature 0.7, top-k 20, top-p off, seed 5)" in result.stdout
    with tracekit.open(out) as t:
        assert t.captured == ["residual", "neurons", "logit_lens"]
        assert t.layers == [1] and t["residual"].logical_dtype == "bfloat16"
        assert t.metadata["run"]["prompt"] == "import os\n"
        assert t.metadata["run"]["seed"] == 5
        assert t.metadata["run"]["generation"]["stop_at_eos"] is False


def test_max_size_refuses_to_start_when_the_prompt_alone_would_pass_it(
        model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "--max-size", "10KB")
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: the [0-9]+-token prompt alone takes [0-9.]+ KB, more than "
                        r"--max-size 10.0 KB; capture less \(--capture, --layers, --store-dtype\) "
                        r"or raise --max-size\n", result.stderr)
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_max_size_stops_at_the_cap_with_a_valid_truncated_trace(
        model_dir: Path, tmp_path: Path, suffix: str) -> None:
    from tracekit.sizecap import disk_bytes

    full = tmp_path / f"full{suffix}"
    assert run("record", model_dir, "-p", PROMPT, "-o", full, "-n", "40",
               "--ignore-eos").exit_code == 0
    with tracekit.open(full) as t:
        prompt, positions = t.prompt_length, t.n_positions
        plan, steps = t.plan, t.n_steps
    fmt = "hdf5" if suffix == ".h5" else "zarr"
    # A cap the trace passes 20 positions in.
    cap = plan.estimated_bytes(fmt, prompt + 20, prompt + 20)
    out = tmp_path / f"capped{suffix}"
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "40", "--ignore-eos",
                 "--max-size", str(cap))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    cap_line = next(line for line in lines if line.startswith("Size cap"))
    fits = int(re.fullmatch(rf"Size cap  [0-9.]+ KB: recording stops after at most ([0-9]+) of "
                            rf"{positions} positions \(status truncated\)", cap_line)[1])
    assert prompt < fits < positions
    with tracekit.open(out) as t, tracekit.open(full) as whole:
        kept = t.n_positions
        assert t.status == "truncated" and prompt < kept <= fits
        # Every committed step intact: the same tokens and activations as the full run.
        assert np.array_equal(t["token_id"][:], whole["token_id"][:kept])
        assert np.array_equal(t["attention"][:], whole["attention"][:kept, ..., :kept])
    size = disk_bytes(out)
    assert size <= cap
    assert re.fullmatch(rf"Trace     {re.escape(str(out))} \(truncated: {kept} positions, "
                        rf"{re.escape(human_bytes(size))} written, [0-9.]+ tokens/s\)", lines[-1])
    assert validate(out) == []
    assert steps == positions - prompt + 1


def test_existing_output_needs_force(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    assert run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "1").exit_code == 0
    again = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "1")
    assert again.exit_code == 1
    assert again.stderr == f"Error: {out} already exists (pass --force to overwrite)\n"
    assert run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "2", "--force"
               ).exit_code == 0
    with tracekit.open(out) as t:
        assert t.n_positions == t.prompt_length + 2


@pytest.mark.parametrize(("args", "message"), [
    (["/no/such/model"], "Error: no model folder at /no/such/model\n"),
    (["{model}", "--layers", "7"], "Error: layers [7] outside 0..1\n"),
    (["{model}", "-n", "500"], None),
])
def test_errors_are_one_line_without_traceback(model_dir: Path, tmp_path: Path, args,
                                               message) -> None:
    args = [a.replace("{model}", str(model_dir)) for a in args]
    result = run("record", *args, "-p", PROMPT, "-o", tmp_path / "t.zarr")
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1
    if message:
        assert result.stderr == message
    else:
        assert "exceeds the model's context length 128" in result.stderr


def test_usage_errors(model_dir: Path, tmp_path: Path) -> None:
    no_prompt = run("record", model_dir, "-o", tmp_path / "t.zarr")
    assert no_prompt.exit_code == 2
    assert "give exactly one of --prompt and --prompt-file" in no_prompt.stderr
    bad = run("record", model_dir, "-p", "x", "-o", tmp_path / "t.zarr", "--capture", "resid")
    assert bad.exit_code == 2 and "unknown group 'resid'" in bad.stderr


def test_option_parsers() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("512") == 512
    assert parse_layers("0,3,5") == [0, 3, 5]
    assert parse_layers("2:6") == [2, 3, 4, 5]
    assert parse_layers(":2,7") == [0, 1, 7]
    assert parse_layers(None) is None
    assert parse_capture("all") == list(tracekit.CAPTURE_GROUPS)
    assert parse_capture("default") == [g for g in tracekit.CAPTURE_GROUPS if g != "neurons"]
    assert parse_capture("logit_lens,residual") == ["residual", "logit_lens"]
    for bad, parser in (("2XB", parse_size), ("5:2", parse_layers), ("x", parse_layers)):
        with pytest.raises(click.BadParameter):
            parser(bad)


def test_record_without_model_uses_the_demo_model(tmp_path: Path) -> None:
    from tracekit.demo import demo_model_path

    if not (demo_model_path() / "config.json").is_file():
        pytest.skip("the embedded demo model is not built yet")
    out = tmp_path / "demo.zarr"
    result = run("record", "--prompt", "def fibonacci(n):", "-o", out, "-n", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Model     tracekit:demo (GPT2LMHeadModel, causal)")
    with tracekit.open(out) as t:
        assert t.model["name"] == "tracekit:demo"
        assert t.tokens.texts[0].startswith("def")


def test_costly_logit_lens_is_left_out_by_default_on_cpu(model_dir: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    from tracekit import record_cli

    monkeypatch.setattr(record_cli, "LENS_CPU_BUDGET", 1000)  # the tiny model's lens: 4.9e4
    result = run("record", model_dir, "-p", PROMPT, "-o", tmp_path / "a.zarr", "-n", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2].startswith("Capture   residual, attn_out, mlp_out, attention, predictions;")
    assert lines[3] == ("Skipped   logit_lens (on a CPU it costs 4.9e+04 multiply-adds per token; "
                        "add it with --capture default)")
    with tracekit.open(tmp_path / "a.zarr") as t:
        assert "logit_lens" not in t.captured and "logit_lens" in t.metadata["run"]["skipped"]
    explicit = run("record", model_dir, "-p", PROMPT, "-o", tmp_path / "b.zarr", "-n", "1",
                   "--capture", "default")
    assert "logit_lens" in explicit.stdout.splitlines()[2]


def test_ctrl_c_keeps_what_was_recorded(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from tracekit.recorder.capture import Capture

    take, calls = Capture.take, {"n": 0}

    def interrupted(self):  # Ctrl-C just after the 4th forward pass
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return take(self)

    monkeypatch.setattr(Capture, "take", interrupted)
    out = tmp_path / "t.zarr"
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "10")
    assert result.exit_code == 130
    with tracekit.open(out) as t:
        assert t.status == "aborted" and t.n_steps == 3
        assert result.stderr == (f"Interrupted: {out} keeps the {t.n_positions} positions "
                                 f"of 3 steps recorded so far (status aborted)\n")


def test_ctrl_c_before_the_trace_exists_says_nothing_was_written(
        model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import tracekit.recorder.recording as recording

    def interrupted(*args, **kwargs):  # Ctrl-C while the trace is being laid out
        raise KeyboardInterrupt

    monkeypatch.setattr(recording, "create_trace", interrupted)
    out = tmp_path / "t.zarr"
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "10")
    assert result.exit_code == 130
    assert result.stderr == f"Interrupted before {out} was created: nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_loading_the_model(tmp_path: Path, monkeypatch) -> None:
    import tracekit.recorder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracekit.recorder, "load_model", interrupted)
    result = run("record", "-p", PROMPT, "-o", tmp_path / "t.zarr")
    assert result.exit_code == 130
    assert result.stderr == "Interrupted while loading the model: nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_before_the_first_step_leaves_an_empty_aborted_trace(
        model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from tracekit.recorder.capture import Capture

    def interrupted(self):  # Ctrl-C during the prompt's forward pass
        raise KeyboardInterrupt

    monkeypatch.setattr(Capture, "take", interrupted)
    out = tmp_path / "t.h5"
    result = run("record", model_dir, "-p", PROMPT, "-o", out, "-n", "10")
    assert result.exit_code == 130
    assert result.stderr == f"Interrupted: {out} holds no position yet (status aborted)\n"
    with tracekit.open(out) as t:
        assert (t.status, t.n_positions, t.n_steps) == ("aborted", 0, 0)
