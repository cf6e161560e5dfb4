"""The golden v1.0 traces in tests/data open, validate and hold exactly the values their
formulas give (see tests/data/make_golden.py). Every later tracekit must keep passing this
file unchanged: these are the files users already have.

The expected values below were worked out by hand from the formulas, not read from the files.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import tracekit
from tracekit.validate import validate

DATA = Path(__file__).parent / "data"
FULL = ["golden-v1.0-full.zarr", "golden-v1.0-full.h5"]
PARTIAL = ["golden-v1.0-partial.zarr", "golden-v1.0-partial.h5"]
BF16 = ml_dtypes.bfloat16


def test_golden_files_never_change() -> None:
    manifest = (DATA / "golden-v1.0.sha256").read_text().splitlines()
    assert len(manifest) > 8
    for line in manifest:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(params=FULL + PARTIAL)
def any_golden(request):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a v1.0 trace opens without a version warning
        trace = tracekit.open(DATA / request.param)
    with trace:
        yield trace


@pytest.fixture(params=FULL)
def full(request):
    with tracekit.open(DATA / request.param) as trace:
        yield trace


@pytest.fixture(params=PARTIAL)
def partial(request):
    with tracekit.open(DATA / request.param) as trace:
        yield trace


@pytest.mark.parametrize("name", FULL + PARTIAL)
def test_golden_traces_validate(name) -> None:
    assert validate(DATA / name) == []


def test_every_golden_trace_has_the_same_tokens_and_steps(any_golden) -> None:
    t = any_golden
    assert t.version == (1, 0)
    assert t.metadata["version"] == "1.0"
    assert t.metadata["created"] == "2026-01-01T00:00:00Z"
    assert t.model["name"] == "golden/tiny"
    assert (t.model["n_layers"], t.model["d_model"], t.model["n_heads"]) == (2, 4, 2)
    assert t.metadata["run"]["prompt"] == "t0t1\xff"
    assert t.metadata["tags"]["purpose"] == "golden v1.0 trace"
    assert (t.n_positions, t.n_steps, t.prompt_length) == (5, 3, 3)
    assert t.metadata["length"] == {"positions": 5, "steps": 3}
    assert len(t.tokens) == 5
    assert t.tokens.ids.tolist() == [3, 10, 17, 24, 31]
    assert [tok.text for tok in t.tokens] == ["t0", "t1", "\\xff\\xfe", "long", "t4"]
    assert t.tokens[2].raw == b"\xff\xfe"
    assert [tok.truncated for tok in t.tokens] == [False, False, False, True, False]
    assert [tok.is_prompt for tok in t.tokens] == [True, True, True, False, False]
    assert [tok.step for tok in t.tokens] == [0, 0, 0, 1, 2]
    assert t["step_start"][:].tolist() == [0, 3, 4]
    assert t["step_positions"][:].tolist() == [3, 1, 1]
    assert t["step_time"][:].tolist() == [1_700_000_000.0, 1_700_000_000.25, 1_700_000_000.5]
    assert list(t.step_positions(1)) == [3]
    assert t.coords("head").tolist() == [0, 1]


def test_full_golden_trace(full) -> None:
    t = full
    assert t.status == "complete"
    assert t.captured == ["residual", "attn_out", "mlp_out", "attention", "neurons",
                          "predictions", "logit_lens"]
    assert t.metadata["capture"]["stored_dtype"] == "bfloat16"
    assert t.layers == [0, 1] and t.points == [0, 1, 2]
    assert t.coords("layer").tolist() == [0, 1]
    assert t.coords("point").tolist() == [0, 1, 2]

    residual = t["residual"]
    assert residual.dims == ("position", "point", "hidden")
    assert residual.shape == (5, 3, 4)
    assert residual.dtype == BF16
    assert residual[3, 1, 2].shape == ()
    assert residual[3, 1, 2] == 1.25        # (3+1)/4 + 1/2 - 2/8
    assert residual[0, 0, 3] == -0.125      # 1/4 - 3/8
    assert residual[4, 2, 0] == 2.25        # 5/4 + 2/2
    assert residual[2].astype(np.float32).tolist()[0] == [0.75, 0.625, 0.5, 0.375]
    assert t["attn_out"][2, 1, 3] == 0.75   # 1 + 3/4 - 2/2
    assert t["mlp_out"][4, 0, 1] == 3.75    # 4 - 0 - 1/4
    assert t["neurons"][1, 1, 2] == 0.5     # (1-2)/2 + 1
    assert t["neurons"].shape == (5, 2, 3)

    attention = t["attention"]
    assert attention.dims == ("position", "layer", "head", "key")
    assert attention.shape == (5, 2, 2, 5)
    assert attention[3, 0, 1].astype(np.float32).tolist() == [0.25, 0, 0, 0.5, 0]
    assert attention[0, 1, 0].astype(np.float32).tolist() == [0.25, 0, 0, 0, 0]
    assert attention[4, 1, 0, 4] == 0.25 and attention[4, 1, 0, 0] == 0.125
    assert t["attention_top_keys"][3, 0, 1].tolist() == [3, 0]
    assert t["attention_top_weights"][3, 0, 1].tolist() == [0.5, 0.25]
    assert t["attention_top_keys"][0, 1, 0].tolist() == [0, -1]
    assert t["attention_top_weights"][0, 1, 0].tolist() == [0.25, 0.0]

    assert t["top_ids"][2].tolist() == [2, 3]
    assert t["top_logprobs"][2].tolist() == [-0.5, -1.0]
    assert t["lens_ids"][4, 2, 1] == 43     # (40 + 2 + 1) mod 50
    assert t["lens_logprobs"][4, 2, 1] == -2.5
    assert t["lens_ids"].dims == ("position", "point", "rank")

    # summaries written while recording
    assert t["residual_range"][2].tolist() == [0.375, 1.75]    # 3/4 - 3/8, 3/4 + 1
    assert t["residual_norm"][1, 0] == pytest.approx(np.sqrt(0.46875))  # 1/2, 3/8, 1/4, 1/8
    assert t["attn_out_range"][0].tolist() == [0.0, 1.75]       # layer 0 h 0; layer 1 h 3
    assert t.value_range("residual") == (-0.125, 2.25)


def test_partial_golden_trace(partial) -> None:
    t = partial
    assert t.status == "aborted"
    assert not t.complete
    assert t.captured == ["residual", "attention"]
    assert t.metadata["capture"]["stored_dtype"] == "float16"
    assert t.metadata["capture"]["compression"] == "zstd"
    assert t.metadata["capture"]["max_positions"] == 8
    assert t.layers == [1] and t.points == [1, 2]
    assert t.coords("layer").tolist() == [1]
    assert t.array_names() == ["commit", "token_id", "token_bytes", "token_nbytes",
                               "token_step", "step_start", "step_positions", "step_time",
                               "residual", "attention", "residual_norm", "residual_range",
                               "attention_top_keys", "attention_top_weights"]
    assert "mlp_out" not in t
    with pytest.raises(tracekit.MissingArrayError, match="not captured"):
        t["mlp_out"]
    residual = t["residual"]
    assert residual.dtype == np.float16 and residual.shape == (5, 2, 4)
    assert residual[3, 1, 2] == 1.25        # indices are of the stored axes
    assert residual[0, 0].tolist() == [0.25, 0.125, 0.0, -0.125]
    attention = t["attention"]
    assert attention.shape == (5, 1, 2, 5)
    assert attention[4, 0, 0].tolist() == [0.125, 0, 0, 0, 0.25]
    assert attention[2, 0, 1].tolist() == [0.25, 0, 0.5, 0, 0]


def test_golden_zarr_and_hdf5_hold_the_same_trace() -> None:
    for zarr_name, h5_name in (FULL, PARTIAL):
        with tracekit.open(DATA / zarr_name) as z, tracekit.open(DATA / h5_name) as h:
            assert z.format == "zarr" and h.format == "hdf5"
            assert z.metadata == h.metadata
            for name in [*z.plan.used_dims(), *z.array_names()]:
                a, b = z[name][...], h[name][...]
                assert a.dtype == b.dtype and a.shape == b.shape, name
                assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("name", FULL)
def test_golden_traces_open_without_tracekit(name) -> None:
    """Plain xarray (zarr) and h5py show the named dimensions."""
    path = DATA / name
    if path.suffix == ".zarr":
        xr = pytest.importorskip("xarray")
        ds = xr.open_dataset(path, engine="zarr", consolidated=True)
        assert ds["residual"].dims == ("position", "point", "hidden")
        assert ds["attention"].dims == ("position", "layer", "head", "key")
        assert ds["layer"].values.tolist() == [0, 1]
        assert ds["residual"].attrs["logical_dtype"] == "bfloat16"
        bits = ds["residual"].values[3, 1, 2]
        assert np.array(bits, np.uint16).view(BF16) == 1.25
    else:
        import h5py

        with h5py.File(path, "r") as f:
            assert [d.label for d in f["residual"].dims] == ["position", "point", "hidden"]
            assert f["residual"].attrs["logical_dtype"] == "bfloat16"
            assert np.array(f["residual"][3, 1, 2], np.uint16).view(BF16) == 1.25
