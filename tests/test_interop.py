"""Traces the writer has just made open in other tools: xarray, zarr-python, h5py.

The golden traces check this for files made by an earlier version; these tests check what the
current writer makes (its zarr metadata is written by tracekit, not by zarr-python)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tracegen

import tracekit

xr = pytest.importorskip("xarray")


@pytest.fixture
def written(tmp_path: Path, disk_kind: str):
    plan = tracegen.small_plan(max_positions=40)
    path = tmp_path / ("t.zarr" if disk_kind == "zarr" else "t.h5")
    # 30 of 40 planned positions: the arrays are trimmed at the end.
    expected = tracegen.write_synthetic(path, plan, seed=5, n_positions=30)
    return path, expected


def _stored(expected, name: str) -> np.ndarray:
    values = expected.arrays[name]
    return values.view(np.uint16) if values.dtype.name == "bfloat16" else values


def test_zarr_trace_opens_in_xarray_and_zarr(tmp_path: Path) -> None:
    import zarr

    plan = tracegen.small_plan(max_positions=40)
    path = tmp_path / "t.zarr"
    expected = tracegen.write_synthetic(path, plan, seed=5, n_positions=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. zarr's "consolidated metadata not found"
        tree = xr.open_datatree(path, engine="zarr")
        group = zarr.open_group(path, mode="r")
    assert group.metadata.consolidated_metadata is not None
    assert sorted(group.metadata.consolidated_metadata.metadata) == sorted(group.array_keys())
    residual = tree["residual"]
    assert residual.dims == ("position", "point", "hidden")
    assert residual.shape[0] == 30
    assert np.array_equal(residual.values, _stored(expected, "residual"))
    assert np.array_equal(group["token_id"][:], expected.arrays["token_id"])
    attention = tree["attention"]
    assert attention.dims == ("position", "layer", "head", "key")
    assert np.array_equal(attention.values, _stored(expected, "attention"))
    assert tree["layer"].values.tolist() == list(plan.layers)


def test_hdf5_trace_shows_dimension_names(tmp_path: Path) -> None:
    import h5py

    plan = tracegen.small_plan(max_positions=40)
    path = tmp_path / "t.h5"
    expected = tracegen.write_synthetic(path, plan, seed=5, n_positions=30)
    with h5py.File(path, "r") as f:
        ds = f["residual"]
        assert [d.label for d in ds.dims] == ["position", "point", "hidden"]
        assert np.array_equal(ds[()], _stored(expected, "residual"))
        assert [d.label for d in f["attention"].dims] == ["position", "layer", "head", "key"]


def test_to_xarray_is_lazy_and_exact(written) -> None:
    path, expected = written
    with tracekit.open(path) as trace:
        ds = trace.to_xarray()
        residual = ds["residual"]
        assert residual.dims == ("position", "point", "hidden")
        assert residual.shape == (30, *expected.arrays["residual"].shape[1:])
        # One position through xarray's indexing equals the data written.
        np.testing.assert_array_equal(
            np.asarray(residual.isel(position=7).values, dtype=np.float32),
            np.asarray(expected.arrays["residual"][7], dtype=np.float32))
        assert ds.attrs["status"] == "complete"
        assert ds["layer"].values.tolist() == list(expected.plan.layers)
