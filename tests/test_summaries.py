"""The writer's summary kernels agree with plain float arithmetic, edge cases included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tracekit.summaries import attention_top_k, row_min_max


@pytest.mark.parametrize("dtype,name", [(np.float16, "float16"),
                                        (ml_dtypes.bfloat16, "bfloat16"),
                                        (np.float32, "float32")])
def test_row_min_max_matches_float_min_max(dtype, name) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 300)).astype(dtype)
    x[3] = np.abs(x[3])        # no negative value
    x[4] = -np.abs(x[4])       # all negative
    x[5] = 0.0
    x[6] = -0.0
    x[7] = 2.5                 # constant row
    x[8, 17] = -65000 if name == "float16" else -1e30   # extreme magnitudes
    stored = x.view(np.uint16) if name == "bfloat16" else x
    got = row_min_max(stored, name)
    f = x.astype(np.float32)
    assert np.array_equal(got, np.stack([f.min(axis=1), f.max(axis=1)], axis=1))


def test_attention_top_k_orders_by_weight_and_marks_missing_keys() -> None:
    w = np.array([[0.1, 0.6, 0.3, 0.0]], dtype=np.float32)
    keys, weights = attention_top_k(w, 5)
    assert keys.tolist() == [[1, 2, 0, -1, -1]]
    assert weights[0].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0, 0.0])


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("step", [1, 6])
def test_summaries_of_large_commits_match_the_data(tmp_path, fmt: str, step: int) -> None:
    # Commits of more than 1 MiB per array compute norms and ranges on a helper thread while
    # the rows are written; the result must be what the rows say, in order.
    import tracekit
    from tracekit import ModelInfo, TracePlan

    model = ModelInfo(name="wide", n_layers=7, d_model=4096, n_heads=1, vocab_size=10)
    plan = TracePlan(model=model, max_positions=96, captured=frozenset({"residual"}))
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((96, 8, 4096)) * rng.uniform(0.1, 9, (96, 8, 1))).astype(
        np.float16)
    path = tmp_path / ("t.zarr" if fmt == "zarr" else "t.h5")
    with tracekit.create(path, plan, commit_bytes=4 << 20) as w:
        for p in range(0, 96, step):
            w.write_step([1] * len(data[p:p + step]), [b"x"] * len(data[p:p + step]),
                         {"residual": data[p:p + step]})
    f = data.astype(np.float32)
    with tracekit.open(path) as t:
        np.testing.assert_allclose(t["residual_norm"][:], np.linalg.norm(f, axis=-1),
                                   rtol=1e-5)
        flat = f.reshape(96, -1)
        assert np.array_equal(t["residual_range"][:],
                              np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1))
        assert np.array_equal(t["residual"][:], data)
