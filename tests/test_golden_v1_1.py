"""The golden v1.1 traces in tests/data: they open, validate (every chunk's checksum
included), hold the values of make_golden.py's formulas and their vocabulary, and a format 1.0
reader (tracekit as released with 1.0, taken from this repository's history) opens them with a
warning and reads the same values. Every later tracekit must keep passing this file unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import tracekit
from tracekit.validate import validate

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
FULL = ["golden-v1.1-full.zarr", "golden-v1.1-full.h5"]
PARTIAL = ["golden-v1.1-partial.zarr", "golden-v1.1-partial.h5"]
#: The last commit whose tracekit wrote and read format 1.0.
FORMAT_1_0_COMMIT = "d8c8af9d8679055ef2aba59ae4b9a8c7a9a8d044"


def test_golden_files_never_change() -> None:
    manifest = (DATA / "golden-v1.1.sha256").read_text().splitlines()
    assert len(manifest) > 8
    for line in manifest:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", FULL + PARTIAL)
def test_golden_v1_1_traces_validate_deeply(name) -> None:
    assert validate(DATA / name, deep=True) == []


@pytest.mark.parametrize("name", FULL + PARTIAL)
def test_golden_v1_1_trace_values_and_vocabulary(name) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # this reader's own version: no warning
        t = tracekit.open(DATA / name)
    with t:
        assert t.version == (1, 1) and t.metadata["version"] == "1.1"
        assert (t.n_positions, t.n_steps, t.prompt_length) == (5, 3, 3)
        assert t.tokens.ids.tolist() == [3, 10, 17, 24, 31]
        assert t["step_positions"][:].tolist() == [3, 1, 1]
        assert t["residual"][3, 1, 2] == 1.25           # (3+1)/4 + 1/2 - 2/8
        attention = t["attention"]
        assert attention.shape[0] == 5
        assert attention[4, 0, 0].astype(np.float32).tolist() == [0.125, 0, 0, 0, 0.25]
        assert t.decode([0, 7, 8, 49]) == ["w0", "\\xff", "", "w49"]
        if "predictions" in t.captured:
            assert [p.text for p in t.predictions(2)] == ["w2", "w3"]
            assert [p.logprob for p in t.predictions(2)] == [-0.5, -1.0]


def test_golden_v1_1_zarr_and_hdf5_hold_the_same_trace() -> None:
    for zarr_name, h5_name in (FULL, PARTIAL):
        with tracekit.open(DATA / zarr_name) as z, tracekit.open(DATA / h5_name) as h:
            assert z.metadata == h.metadata
            for name in [*z.plan.used_dims(), *z.array_names()]:
                a, b = z[name][...], h[name][...]
                assert a.dtype == b.dtype and a.shape == b.shape, name
                assert a.tobytes() == b.tobytes(), name


def test_golden_v1_1_chunks_carry_their_containers_checksums() -> None:
    import h5py

    meta = json.loads((DATA / "golden-v1.1-full.zarr" / "residual" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-1] == "crc32c"
    with h5py.File(DATA / "golden-v1.1-full.h5", "r") as f:
        assert f["residual"].fletcher32


def _format_1_0_reader(tmp_path: Path) -> Path:
    """tracekit's package as of format 1.0, unpacked from git history (skip without it)."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", FORMAT_1_0_COMMIT, "tracekit", "schemas"],
            capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip("git history with the format 1.0 reader is not available")
    site = tmp_path / "old"
    site.mkdir()
    subprocess.run(["tar", "-x", "-C", str(site)], input=archive, check=True)
    (site / "schemas").rename(site / "tracekit" / "schemas")
    return site


@pytest.mark.parametrize("name", FULL + PARTIAL)
def test_a_format_1_0_reader_opens_a_1_1_trace_with_a_warning(tmp_path, name) -> None:
    """Spec section 7: a 1.0 reader opens a 1.1 trace, warns that it is newer, and ignores
    what it does not know (the vocabulary arrays); checksummed chunks read through zarr's
    crc32c codec and HDF5's Fletcher-32 filter, which 1.0 already allowed."""
    site = _format_1_0_reader(tmp_path)
    code = (
        "import json, sys, warnings, tracekit\n"
        "assert tracekit.__file__.startswith(sys.argv[2]), tracekit.__file__\n"
        "assert tracekit.FORMAT_VERSION == (1, 0)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    t = tracekit.open(sys.argv[1])\n"
        "print(json.dumps({'warnings': [str(w.message) for w in caught],\n"
        "    'positions': t.n_positions, 'tokens': t.tokens.ids.tolist(),\n"
        "    'residual': float(t['residual'][3, 1, 2]),\n"
        "    'attention': t['attention'][4, 0, 0].astype(float).tolist()}))\n")
    # -S: no site processing, so this checkout's editable install stays out; dependencies
    # come from site-packages, after the old package.
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(DATA / name), str(site)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": f"{site}{os.pathsep}{deps}", "PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got["warnings"]) == 1 and "format 1.1, newer than this reader's" in (
        got["warnings"][0])
    assert got["positions"] == 5 and got["tokens"] == [3, 10, 17, 24, 31]
    assert got["residual"] == 1.25
    assert got["attention"] == [0.125, 0, 0, 0, 0.25]


def test_a_format_1_0_reader_refuses_a_truncated_trace_by_name(tmp_path) -> None:
    """The one 1.1 value a 1.0 reader cannot ignore: status ``truncated`` (a recording stopped
    at its size cap) is not in 1.0's schema, so a 1.0 reader refuses such a trace with an error
    naming the status (spec section 7), rather than reading it as something it is not."""
    import shutil

    site = _format_1_0_reader(tmp_path)
    trace = tmp_path / "capped.zarr"
    shutil.copytree(DATA / "golden-v1.1-full.zarr", trace)
    root = json.loads((trace / "zarr.json").read_text())
    root["attributes"]["tracekit"]["status"] = "truncated"
    (trace / "zarr.json").write_text(json.dumps(root))
    with tracekit.open(trace) as t:  # this reader knows the status
        assert t.status == "truncated" and t.n_positions == 5
    code = ("import sys, tracekit\n"
            "try:\n    tracekit.open(sys.argv[1])\n"
            "except tracekit.MetadataError as exc:\n    print(exc)\n")
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    out = subprocess.run(
        [sys.executable, "-S", "-W", "ignore", "-c", code, str(trace)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": f"{site}{os.pathsep}{deps}", "PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    assert "'truncated' is not one of" in out.stdout
