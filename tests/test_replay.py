"""``tracekit replay --verify``: passes on a fresh trace, fails on a tampered one, and says
which array is off."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

import tracekit  # noqa: E402
from tracekit.cli import main  # noqa: E402
from tracekit.recorder import load_model, record, tolerances_for, verify_trace  # noqa: E402
from tracekit.recorder.testing import save_tiny_model  # noqa: E402

ROW = re.compile(r"(\w+) +([0-9.e+-]+) +([0-9.e+-]+) +([0-9.e+-]+) (rel|abs|lp ) +([0-9.e+-]+)"
                 r"  (ok|FAIL)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama").resolve()


@pytest.fixture(scope="module")
def traces(model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("traces")
    out = {}
    for name, args in {"zarr": ["-o", folder / "t.zarr"],
                       "hdf5": ["-o", folder / "t.h5", "--store-dtype", "float32",
                                "--capture", "all"]}.items():
        result = CliRunner().invoke(main, ["record", str(model_dir), "-p", "def f(x):", "-n",
                                           "6", "--ignore-eos", *map(str, args)])
        assert result.exit_code == 0, result.output
        out[name] = Path(args[1])
    return out


def copy(src: Path, dst: Path) -> Path:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def replay(*args) -> tuple[int, list[str], dict[str, tuple]]:
    result = CliRunner().invoke(main, ["replay", *map(str, args)])
    lines = result.stdout.splitlines()
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.fullmatch, lines) if m}
    return result.exit_code, lines, rows


@pytest.mark.parametrize("kind", ["zarr", "hdf5"])
def test_fresh_trace_verifies(traces, kind: str, model_dir: Path) -> None:
    code, lines, rows = replay(traces[kind], "--verify")
    assert code == 0, lines
    stored = "float16" if kind == "zarr" else "float32"
    assert re.fullmatch(rf"Replay    {re.escape(str(model_dir))} on \d+ recorded tokens "
                        r"\(cpu, float32, eager attention\)", lines[0])
    assert lines[1].split() == ["array", "max", "|dev|", "mean", "|dev|", "tested", "limit",
                                "result"]
    expected = ["residual", "attn_out", "mlp_out", "attention"] + (
        ["neurons"] if kind == "hdf5" else []) + [
        "top_ids", "top_logprobs", "lens_ids", "lens_logprobs"]
    assert list(rows) == expected
    assert all(r[-1] == "ok" for r in rows.values())
    limit = {"float16": "1.00e-02", "float32": "1.00e-04"}[stored]
    assert rows["residual"][-2] == limit
    assert lines[-1] == f"Verified  every array within tolerance (compared as {stored})"


def tamper(path: Path, name: str, index: tuple, change) -> None:
    if path.is_dir():
        arr = zarr.open_array(str(path / name), mode="r+")
    else:
        f = h5py.File(path, "r+")
        arr = f[name]
    data = np.asarray(arr[index])
    arr[index] = change(data)
    if not path.is_dir():
        f.close()


@pytest.mark.parametrize(("kind", "array", "index", "change"), [
    ("zarr", "residual", (3, 1), lambda x: x + np.float16(0.5) * np.abs(x).max()),
    ("hdf5", "mlp_out", (4, 0), lambda x: x * 1.01),
    ("hdf5", "attention", (5, 1, 2), lambda x: x[::-1].copy()),
    ("zarr", "top_ids", (2,), lambda x: x[::-1].copy()),
])
def test_tampered_trace_fails_and_names_the_array(traces, tmp_path: Path, kind, array, index,
                                                  change) -> None:
    path = copy(traces[kind], tmp_path / traces[kind].name)
    tamper(path, array, index, change)
    code, lines, rows = replay(path, "--verify")
    assert code == 1
    assert rows[array][-1] == "FAIL"
    failed = [name for name, r in rows.items() if r[-1] == "FAIL"]
    assert lines[-1] == (f"Failed    {', '.join(failed)} beyond tolerance (compared as "
                         f"{'float16' if kind == 'zarr' else 'float32'})")
    # Without --verify the same report prints, and the exit status stays 0.
    assert replay(path)[0] == 0


def test_tolerance_override_and_model_override(traces, model_dir: Path, tmp_path: Path) -> None:
    code, lines, rows = replay(traces["zarr"], "--verify", "--tolerance", "1e-9")
    assert code == 1 and rows["residual"][-2] == "1.00e-09"
    moved = copy(model_dir, tmp_path / "elsewhere")
    code, lines, _ = replay(traces["zarr"], "--verify", "--model", moved)
    assert code == 0 and lines[0].startswith(f"Replay    {moved} on ")


def test_a_different_model_is_refused(traces, tmp_path: Path) -> None:
    other = save_tiny_model(tmp_path / "gpt2", "gpt2")
    result = CliRunner().invoke(main, ["replay", str(traces["zarr"]), "--model", str(other)])
    assert result.exit_code == 1
    assert result.stderr == ("Error: the model does not match the trace: architecture "
                             "GPT2LMHeadModel (trace: LlamaForCausalLM)\n")


def test_tolerances_follow_the_coarser_dtype() -> None:
    assert tolerances_for("float32", "float32")[0] == "float32"
    assert tolerances_for("float32", "bfloat16")[0] == "bfloat16"
    assert tolerances_for("float16", "float32") == ("float16", (1e-2, 2e-3, 5e-2))


def test_verify_trace_api_on_an_aborted_trace(model_dir: Path, tmp_path: Path) -> None:
    model, _ = load_model(model_dir, device="cpu", load_tokenizer=False)
    out = tmp_path / "aborted.zarr"

    def stop(info):  # Ctrl-C right after the prompt step was handed to the writer
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(model, None, input_ids=[3, 4, 5], out=out, on_step=stop)
    with tracekit.open(out) as t:
        assert t.status == "aborted" and t.n_positions == 3
        report = verify_trace(t, model)
    assert report.ok and report.positions == 3
