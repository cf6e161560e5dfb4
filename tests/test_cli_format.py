"""CLI tests for info / validate / convert, with exact expected output (click's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tracegen
from click.testing import CliRunner

import tracekit
from tracekit.cli import disk_usage, human_bytes, main


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _trace(tmp_path: Path, name: str = "t.zarr", **plan_kwargs) -> tuple[Path, tracegen.Expected]:
    plan = tracegen.small_plan(**plan_kwargs)
    path = tmp_path / name
    expected = tracegen.write_synthetic(path, plan, seed=5)
    return path, expected


def test_info_prints_exact_summary(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = _trace(tmp_path, captured=["residual", "attention"], layers=[0, 2],
                     max_positions=7)
    with tracekit.open(path) as t:
        created = t.metadata["created"]
        text = "".join(tok.text for tok in t.tokens)
        steps, prompt = t.n_steps, t.prompt_length
    result = runner.invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    expected = f"""\
Trace     {path} (zarr, format 1.1, {human_bytes(disk_usage(path))})
Status    complete: 7 positions in {steps} steps (prompt {prompt})
Model     synthetic/tiny (SyntheticForCausalLM, causal): 3 layers, d_model 8, 2 heads, vocab 500
Captured  residual, attention
Layers    0, 2 (residual points 0-3)
Stored    float16, top-k 3, attention top-k 2
Vocab     not stored: predictions are token ids (decode with the tokenizer)
Created   {created}
Text      {text!r}
Arrays
  commit                 int64     commit_field 2
  token_id               int64     position 7
  token_bytes            uint8     position 7 x byte 6
  token_nbytes           int32     position 7
  token_step             int32     position 7
  step_start             int64     step {steps}
  step_positions         int32     step {steps}
  step_time              float64   step {steps}
  residual               float16   position 7 x point 4 x hidden 8
  attention              float16   position 7 x layer 2 x head 2 x key 7
  residual_norm          float32   position 7 x point 4
  residual_range         float32   position 7 x bound 2
  attention_top_keys     int32     position 7 x layer 2 x head 2 x attn_rank 2
  attention_top_weights  float32   position 7 x layer 2 x head 2 x attn_rank 2
"""
    assert result.output == expected


def test_info_json_is_machine_readable(runner: CliRunner, tmp_path: Path) -> None:
    path, expected = _trace(tmp_path, max_positions=9)
    result = runner.invoke(main, ["info", "--json", str(path)])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["positions"] == 9
    assert data["metadata"]["status"] == "complete"
    assert data["arrays"]["residual"] == {"dims": ["position", "point", "hidden"],
                                          "shape": [9, 4, 8], "dtype": "float16"}


def test_validate_accepts_a_good_trace(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = _trace(tmp_path, name="ok.h5")
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 0
    assert result.output == f"{path}: valid\n"


def test_validate_reports_one_line_per_problem(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = _trace(tmp_path)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["tracekit"]["model"]["n_heads"] = "two"
    root["attributes"]["tracekit"]["capture"]["top_k"] = 0
    root.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(root))
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output == (
        f"{path}: metadata capture/top_k: 0 is less than the minimum of 1\n"
        f"{path}: metadata model/n_heads: 'two' is not of type 'integer'\n"
    )


def test_validate_finds_a_missing_chunk(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = _trace(tmp_path, max_positions=12)
    (path / "token_id" / "c.0").unlink()
    result = runner.invoke(main, ["validate", "--quick", str(path)])
    assert result.exit_code == 1
    assert result.output == (
        f"{path}: array 'token_id': 1 committed chunk(s) missing, first c.0\n")


def test_errors_are_one_line_without_traceback(runner: CliRunner, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a trace at all")
    result = runner.invoke(main, ["info", str(junk)])
    assert result.exit_code == 1
    assert result.output == f"Error: {junk}: neither a zarr v3 directory, a pack nor an HDF5 file\n"
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("src_name,dst_name", [("a.zarr", "b.h5"), ("a.h5", "b.zarr")])
def test_convert_is_bit_exact(runner: CliRunner, tmp_path: Path, src_name: str,
                              dst_name: str) -> None:
    src, expected = _trace(tmp_path, name=src_name, stored_dtype="bfloat16", max_positions=15)
    dst = tmp_path / dst_name
    result = runner.invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {dst} ({human_bytes(disk_usage(dst))})\n"
    with tracekit.open(src) as a, tracekit.open(dst) as b:
        assert a.metadata == b.metadata
        assert b.format == ("hdf5" if dst_name.endswith(".h5") else "zarr")
        for name in a.array_names():
            x, y = a[name][...], b[name][...]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), name
        tracegen.assert_trace_matches(b, expected)
    assert runner.invoke(main, ["validate", str(dst)]).exit_code == 0


def test_convert_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    src, _ = _trace(tmp_path, name="a.zarr")
    dst, _ = _trace(tmp_path, name="b.h5")
    before = dst.read_bytes()
    result = runner.invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 1
    assert result.output == f"Error: {dst} already exists (use --force to replace it)\n"
    assert dst.read_bytes() == before
    result = runner.invoke(main, ["convert", "--force", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    with tracekit.open(dst) as b:
        assert b.format == "hdf5"


def test_every_command_has_a_one_line_help(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name, cmd in main.commands.items():
        first = cmd.help.splitlines()[0] if cmd.help else ""
        assert first, f"{name} has no help"
        # shown whole in an 80-column terminal
        assert any(line.split() == [name, *first.split()] for line in lines), (name, first)


def test_validate_names_the_path_once(runner: CliRunner, tmp_path: Path) -> None:
    junk = tmp_path / "junk.txt"
    junk.write_text("not a trace")
    result = runner.invoke(main, ["validate", str(junk)])
    assert result.exit_code == 1
    assert result.output == f"{junk}: neither a zarr v3 directory, a pack nor an HDF5 file\n"


def test_convert_refuses_an_unknown_suffix_unless_format_is_given(runner: CliRunner,
                                                                  tmp_path: Path) -> None:
    src, _ = _trace(tmp_path, name="a.zarr")
    dst = tmp_path / "b.txt"
    result = runner.invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {dst}: a trace is named .zarr (a folder) or .h5/.hdf5 "
                             f"(a file); or choose with --format zarr|hdf5\n")
    assert not dst.exists()
    assert runner.invoke(main, ["convert", "--format", "hdf5", str(src), str(dst)]).exit_code == 0
    with tracekit.open(dst) as t:
        assert t.format == "hdf5"


@pytest.mark.parametrize("name", ["empty.zarr", "empty.h5"])
@pytest.mark.parametrize("prompt_length", [0, 3])
def test_an_empty_trace_is_aborted_and_valid(runner: CliRunner, tmp_path: Path, name: str,
                                             prompt_length: int) -> None:
    """A writer closed before its first step finalizes the trace as aborted (spec section 3),
    whatever status it was asked for; validate accepts it and info says what it holds."""
    path = tmp_path / name
    tracekit.create(path, tracegen.small_plan(), prompt_length=prompt_length).close("complete")
    with tracekit.open(path) as t:
        assert (t.status, t.n_positions, t.n_steps) == ("aborted", 0, 0)
    assert runner.invoke(main, ["validate", str(path)]).output == f"{path}: valid\n"
    info = runner.invoke(main, ["info", str(path)]).output.splitlines()
    assert info[1] == f"Status    aborted: 0 positions in 0 steps (prompt {prompt_length})"


def test_a_complete_trace_without_a_step_is_invalid(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    tracekit.create(path, tracegen.small_plan()).close()
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["tracekit"]["status"] = "complete"  # as a writer before 1.1 could
    root.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(root))
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output == (
        f"{path}: status complete but no step recorded (an empty trace is aborted)\n")


def test_to_xarray_without_xarray_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    path, _ = _trace(tmp_path)
    monkeypatch.setitem(sys.modules, "xarray", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "tracekit._xarray", raising=False)
    with tracekit.open(path) as t, pytest.raises(ModuleNotFoundError) as err:
        t.to_xarray()
    assert str(err.value) == ("to_xarray() needs xarray: python -m pip install xarray (or the "
                              "tracekit[xarray] extra)")


def test_an_empty_complete_trace_of_format_1_0_stays_valid(runner: CliRunner,
                                                         tmp_path: Path) -> None:
    """The rule that an empty trace is aborted came with format 1.1 (spec section 3)."""
    path = tmp_path / "t.zarr"
    tracekit.create(path, tracegen.small_plan()).close()
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["tracekit"].update(status="complete", version="1.0")
    root.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(root))
    result = runner.invoke(main, ["validate", str(path)])
    assert result.output == f"{path}: valid\n"
