"""The vocabulary a trace carries (format 1.1): every token id's text, so that predictions and
the logit lens read as text without the tokenizer; traces without one (1.0) still open."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tracegen
import zarr
from conftest import trace_target
from hypothesis import given, settings
from hypothesis import strategies as st

import tracekit
from tracekit._cliutil import disk_usage
from tracekit.convert import convert
from tracekit.errors import (
    CorruptTraceError,
    MetadataError,
    MissingArrayError,
    TokenIdError,
    WriterError,
)
from tracekit.format import MAX_VOCAB_BYTES, decode_token_text
from tracekit.validate import validate

DATA = Path(__file__).parent / "data"
V = 500  # tracegen.small_model's vocab_size


def vocab_of(size: int = V) -> list[bytes | str]:
    """Token texts of every kind a tokenizer gives: words with their leading space, empty,
    non-ASCII, half a UTF-8 character (byte-level BPE), long, and str as well as bytes."""
    texts: list[bytes | str] = [f" w{i}" if i % 3 else f"w{i}".encode() for i in range(size)]
    texts[0] = "<|endoftext|>"
    texts[1] = b""
    texts[2] = " café"
    texts[3] = "€".encode()[:2]
    texts[4] = " " * 300
    return texts


def as_text(t: bytes | str) -> str:
    return t if isinstance(t, str) else decode_token_text(t)


def write(target, *, vocab=None, seed: int = 3, **plan_kwargs) -> tracegen.Expected:
    plan = tracegen.small_plan(**plan_kwargs)
    return tracegen.write_synthetic(target, plan, seed=seed, vocab=vocab)


def test_vocabulary_round_trips_on_every_backend(tmp_path: Path, backend_kind: str) -> None:
    target = trace_target(tmp_path, backend_kind)
    vocab = vocab_of()
    write(target, vocab=vocab)
    with tracekit.open(target) as t:
        assert t.has_vocab
        assert t.decode(range(V)) == [as_text(x) for x in vocab]
        assert t.decode(2) == [" café"]
        assert t.decode(np.array([[3, 4]], dtype=np.int32)) == ["\\xe2\\x82", " " * 300]
        assert t.vocab.raw(3) == "€".encode()[:2] and t.vocab.raw(1) == b""
        assert t["vocab_nbytes"].dims == ("vocab",) and t["vocab_bytes"].dims == ("vocab_byte",)
        assert t.coords("vocab").tolist() == list(range(V))
        assert t.metadata["capture"]["vocab_bytes"] == len(t["vocab_bytes"])


def test_every_predicted_id_reads_as_text(tmp_path: Path, disk_kind: str) -> None:
    path = trace_target(tmp_path, disk_kind)
    vocab = vocab_of()
    expected = write(path, vocab=vocab)
    with tracekit.open(path) as t:
        top_ids, top_lp = expected.arrays["top_ids"], expected.arrays["top_logprobs"]
        lens_ids = expected.arrays["lens_ids"]
        for position in range(t.n_positions):
            preds = t.predictions(position)
            assert [p.rank for p in preds] == list(range(len(top_ids[position])))
            assert [p.id for p in preds] == top_ids[position].tolist()
            assert [p.text for p in preds] == [as_text(vocab[i]) for i in top_ids[position]]
            assert [p.prob for p in preds] == pytest.approx(np.exp(top_lp[position]))
            for index, point in enumerate(t.points):
                lens = t.lens_predictions(position, point)
                assert [p.text for p in lens] == [as_text(vocab[i])
                                                  for i in lens_ids[position, index]]
        assert t.decode(t["lens_ids"][:]) == [as_text(vocab[i]) for i in lens_ids.ravel()]
        with pytest.raises(IndexError, match="point 99 was not captured"):
            t.lens_predictions(0, 99)


def test_ids_outside_the_vocabulary_are_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path / "t.zarr", vocab=vocab_of())
    with tracekit.open(tmp_path / "t.zarr") as t:
        for bad in (V, -1):
            with pytest.raises(TokenIdError, match=rf"token id {bad} outside the vocabulary "
                                                   rf"0\.\.{V - 1}"):
                t.decode([0, bad])
        with pytest.raises(IndexError):  # TokenIdError is an IndexError too
            t.decode(V)
        with pytest.raises(TypeError, match="integers"):
            t.decode([1.5])


def test_a_trace_without_vocabulary_says_how_to_get_text(tmp_path: Path) -> None:
    write(tmp_path / "t.h5")
    with tracekit.open(tmp_path / "t.h5") as t:
        assert not t.has_vocab
        assert "vocab_bytes" not in t.array_names()
        assert t.metadata["capture"]["vocab_bytes"] is None
        with pytest.raises(MissingArrayError, match="recorded without a vocabulary .*tokenizer"):
            t.decode([1])
        with pytest.raises(MissingArrayError, match="without a vocabulary"):
            t.predictions(0)


@pytest.mark.parametrize("name", ["golden-v1.0-full.zarr", "golden-v1.0-full.h5"])
def test_format_1_0_traces_open_and_explain_their_missing_vocabulary(name: str) -> None:
    with tracekit.open(DATA / name) as t:
        assert t.metadata["version"] == "1.0" and not t.has_vocab
        assert t.tokens.ids.size  # everything else reads as before
        with pytest.raises(MissingArrayError, match=r"without a vocabulary \(format 1\.0\)"):
            t.decode(t.tokens.ids)


def test_writer_refuses_a_vocabulary_that_does_not_fit(tmp_path: Path) -> None:
    plan = tracegen.small_plan()
    path = tmp_path / "t.zarr"
    with pytest.raises(WriterError, match=f"vocab has {V - 1} token texts, but the model's "
                                          f"vocab_size is {V}"):
        tracekit.create(path, plan, vocab=vocab_of(V - 1))
    sized = dataclasses.replace(plan, vocab_bytes=7)
    with pytest.raises(WriterError, match="pass its texts as vocab="):
        tracekit.create(path, sized)
    with pytest.raises(WriterError, match="the plan says 7"):
        tracekit.create(path, sized, vocab=vocab_of())
    assert list(tmp_path.iterdir()) == []  # nothing half-made is left behind


def test_plain_zarr_and_h5py_read_the_vocabulary(tmp_path: Path) -> None:
    vocab = vocab_of()
    write(tmp_path / "t.zarr", vocab=vocab)
    write(tmp_path / "t.h5", vocab=vocab)
    group = zarr.open_group(tmp_path / "t.zarr", mode="r")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        for nbytes, data in ((group["vocab_nbytes"][:], group["vocab_bytes"][:]),
                             (f["vocab_nbytes"][:], f["vocab_bytes"][:])):
            ends = np.cumsum(nbytes)
            texts = [bytes(data[e - n: e]) for e, n in zip(ends, nbytes, strict=True)]
            assert texts == [x.encode() if isinstance(x, str) else x for x in vocab]
        assert group["vocab_bytes"].metadata.dimension_names == ("vocab_byte",)


def test_a_50k_vocabulary_adds_well_under_a_megabyte(tmp_path: Path, disk_kind: str) -> None:
    # 50257 texts of GPT-2's length distribution (median 6 bytes, mean 6.8, up to 96),
    # random letters: less compressible than real tokens, so an upper bound.
    rng = np.random.default_rng(0)
    lengths = np.minimum(96, 1 + rng.poisson(5.8, 50257))
    letters = rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes()
    ends = np.cumsum(lengths)
    vocab = [b" " + letters[e - n: e - 1] for e, n in zip(ends, lengths, strict=True)]
    model = tracegen.small_model(vocab_size=len(vocab))
    sizes = {}
    for label, v in (("without", None), ("with", vocab)):
        path = trace_target(tmp_path, disk_kind, label)
        write(path, vocab=v, model=model)
        sizes[label] = disk_usage(path)
    added = sizes["with"] - sizes["without"]
    assert 0 < added < 500_000, f"{len(vocab)} token texts ({int(lengths.sum())} bytes) add " \
                                f"{added} bytes"


def test_convert_carries_the_vocabulary(tmp_path: Path) -> None:
    vocab = vocab_of()
    write(tmp_path / "a.zarr", vocab=vocab)
    convert(tmp_path / "a.zarr", tmp_path / "b.h5")
    convert(tmp_path / "b.h5", tmp_path / "c.zarr")
    for name in ("b.h5", "c.zarr"):
        assert validate(tmp_path / name) == []
        with tracekit.open(tmp_path / name) as t:
            assert t.decode(range(V)) == [as_text(x) for x in vocab]


def test_validate_and_xarray_see_the_vocabulary(tmp_path: Path, disk_kind: str) -> None:
    path = trace_target(tmp_path, disk_kind)
    write(path, vocab=vocab_of())
    assert validate(path) == []
    with tracekit.open(path) as t:
        ds = t.to_xarray()
        assert ds["vocab_bytes"].dims == ("vocab_byte",)
        assert ds["vocab_nbytes"].sel(vocab=2).item() == len(" café".encode())


def test_a_vocabulary_whose_lengths_do_not_add_up_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    write(path, vocab=vocab_of())
    arr = zarr.open_array(path / "vocab_nbytes", mode="r+")
    arr[5] = int(arr[5]) + 1
    with tracekit.open(path) as t, pytest.raises(CorruptTraceError, match="add up to"):
        t.decode([0])
    total = sum(len(x.encode() if isinstance(x, str) else x) for x in vocab_of())
    assert validate(path) == [f"vocab_nbytes add up to {total + 1} bytes, but vocab_bytes "
                              f"holds {total}"]
    arr[5] = -1000
    with tracekit.open(path) as t, pytest.raises(CorruptTraceError, match="negative"):
        t.decode([0])


def test_an_oversized_declared_vocabulary_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    write(path, vocab=vocab_of())
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["tracekit"]["capture"]["vocab_bytes"] = MAX_VOCAB_BYTES + 1
    doc["consolidated_metadata"] = None
    (path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="vocab_bytes"):
        tracekit.open(path)


def test_xarray_alone_shows_the_vocabulary(tmp_path: Path) -> None:
    import warnings

    import xarray as xr

    vocab = vocab_of()
    packed = b"".join(x.encode() if isinstance(x, str) else x for x in vocab)
    write(tmp_path / "t.zarr", vocab=vocab)
    write(tmp_path / "t.h5", vocab=vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(tmp_path / "t.zarr", engine="zarr")
    with xr.open_dataset(tmp_path / "t.h5", engine="h5netcdf") as ds:
        for view in (tree, ds):
            assert view["vocab_bytes"].dims == ("vocab_byte",)
            assert view["vocab_nbytes"].dims == ("vocab",)
            assert view["vocab_bytes"].values.tobytes() == packed
            assert view["vocab"].values.tolist() == list(range(V))


@given(st.lists(st.binary(max_size=40) | st.text(max_size=12), max_size=60))
@settings(max_examples=60, deadline=None)
def test_any_texts_pack_and_read_back(texts: list[bytes | str]) -> None:
    from tracekit.vocab import Vocabulary, pack_vocab

    vocab = Vocabulary(*pack_vocab(texts))
    assert len(vocab) == len(texts)
    assert [vocab.raw(i) for i in range(len(texts))] == [
        t.encode() if isinstance(t, str) else t for t in texts]
    assert vocab.decode(range(len(texts))) == [as_text(t) for t in texts]
