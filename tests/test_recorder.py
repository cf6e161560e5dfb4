"""The recorder on the architecture matrix: a tiny random-initialised model of every supported
family, recorded for a few steps with the KV cache, checked against the model's own outputs.

What a user would notice if these failed: a residual stream that is not the model's
(``output_hidden_states``), attention rows that are not distributions, a step-by-step recording
that differs from one full forward pass, predictions that are not the model's top tokens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tracekit  # noqa: E402
from tracekit.recorder import (  # noqa: E402
    RecorderError,
    Recording,
    Sampling,
    UnsupportedArchitectureError,
    discover_structure,
    record,
    verify_trace,
)
from tracekit.recorder.testing import (  # noqa: E402
    FAMILIES,
    SEQUENTIAL_FAMILIES,
    tiny_model,
    tiny_tokenizer,
)
from tracekit.recorder.tokens import token_bytes  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 64]
NEW = 5


def as_f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


@pytest.fixture(scope="module", params=FAMILIES)
def recorded(request, tmp_path_factory):
    """(family, model, trace, structure): every group captured, stored float32."""
    family = request.param
    model = tiny_model(family)
    suffix = ".h5" if FAMILIES.index(family) % 2 else ".zarr"
    out = tmp_path_factory.mktemp(family) / f"trace{suffix}"
    structure = discover_structure(model)
    result = record(model, None, input_ids=PROMPT, out=out, max_new_tokens=NEW,
                    capture=tracekit.CAPTURE_GROUPS, store_dtype="float32",
                    stop_at_eos=False, structure=structure)
    trace = tracekit.open(out)
    yield family, model, trace, structure, result
    trace.close()


def full_forward(model, ids, **kwargs):
    """One plain forward pass, with the attention implementation the recording ran."""
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)]), **kwargs)


def test_trace_has_the_planned_shapes(recorded) -> None:
    family, model, trace, s, result = recorded
    n = len(PROMPT) + (NEW if s.kind == "causal" else 0)
    L, d, h = s.n_layers, s.d_model, s.n_heads
    assert trace.status == "complete"
    assert (trace.n_positions, trace.n_steps) == (n, 1 + (NEW if s.kind == "causal" else 0))
    assert trace["residual"].shape == (n, L + 1, d)
    assert trace["attn_out"].shape == trace["mlp_out"].shape == (n, L, d)
    assert trace["attention"].shape == (n, L, h, n)
    assert trace["neurons"].shape == (n, L, s.d_mlp)
    assert list(trace.tokens.ids[: len(PROMPT)]) == PROMPT
    steps = trace["token_step"][:]
    assert (steps[: len(PROMPT)] == 0).all() and list(steps[len(PROMPT):]) == list(
        range(1, n - len(PROMPT) + 1))
    run = trace.metadata["run"]
    assert run["attn_implementation"] == "eager"
    assert run["model_dtype"] == "float32" and run["device"] == "cpu"
    assert trace.metadata["environment"]["torch"] == torch.__version__
    if s.kind == "causal":
        assert trace["top_ids"].shape == (n, 10)
        assert trace["lens_ids"].shape == (n, L + 1, 10)
        assert trace.metadata["model"]["kind"] == "causal"
    else:
        assert "predictions" not in trace.captured and "logit_lens" not in trace.captured
        assert set(run["skipped"]) == {"predictions", "logit_lens"}


def test_prompt_residual_is_exactly_the_models_hidden_states(recorded) -> None:
    """Step 0 runs the same computation as a plain forward pass: bit-identical in float32.
    The last hidden state is taken after the final norm in most families, the trace's last
    point before it."""
    family, model, trace, s, _ = recorded
    out = full_forward(model, PROMPT, output_hidden_states=True)
    hs = [x[0].numpy() for x in out.hidden_states]
    residual = trace["residual"][: len(PROMPT)]
    for p in range(s.n_layers):
        np.testing.assert_array_equal(residual[:, p], hs[p], err_msg=f"point {p}")
    last = torch.from_numpy(residual[:, s.n_layers].copy())
    with torch.inference_mode():
        for module in s.final:
            last = module(last)
    np.testing.assert_allclose(last.numpy(), hs[s.n_layers], rtol=1e-5, atol=1e-5)


def test_kv_cache_recording_equals_one_full_forward(recorded) -> None:
    family, model, trace, s, _ = recorded
    report = verify_trace(trace, model, structure=s)
    assert report.effective_dtype == "float32"
    assert report.ok, [(c.name, c.measure, c.tolerance) for c in report.checks if not c.ok]
    names = {c.name for c in report.checks}
    assert {"residual", "attn_out", "mlp_out", "attention", "neurons"} <= names


def test_attention_rows_are_distributions_over_past_keys(recorded) -> None:
    family, model, trace, s, _ = recorded
    att = as_f32(trace["attention"][:])
    np.testing.assert_allclose(att.sum(axis=-1), 1.0, atol=1e-5)
    assert (att >= 0).all()
    if s.kind == "causal":
        n = att.shape[0]
        future = np.triu(np.ones((n, n), bool), k=1)
        assert (att[:, :, :, :][np.broadcast_to(future[:, None, None, :],
                                                att.shape)] == 0).all()
    top_keys = trace["attention_top_keys"][:]
    top_w = trace["attention_top_weights"][:]
    best = att.argmax(axis=-1)
    np.testing.assert_allclose(top_w[..., 0], att.max(axis=-1), rtol=1e-6)
    assert (np.take_along_axis(att, top_keys[..., :1].astype(np.int64), -1)[..., 0]
            == att[np.arange(att.shape[0])[:, None, None],
                   np.arange(att.shape[1])[None, :, None],
                   np.arange(att.shape[2])[None, None, :], best]).all()


def test_predictions_are_the_top_k_of_the_logits(recorded) -> None:
    family, model, trace, s, _ = recorded
    if s.kind != "causal":
        pytest.skip("encoders make no next-token predictions")
    ids = trace.tokens.ids
    logits = full_forward(model, ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    vals, top = torch.topk(lp, 10, -1)
    rec_ids, rec_lp = trace["top_ids"][:], trace["top_logprobs"][:]
    np.testing.assert_allclose(rec_lp, vals.numpy(), atol=1e-4)
    gaps = np.diff(vals.numpy(), axis=-1)
    clear = np.concatenate([gaps[:, :1], np.minimum(gaps[:, 1:], gaps[:, :-1])], axis=1) < -1e-4
    assert (rec_ids[:, :-1][clear] == top.numpy()[:, :-1][clear]).all()
    # The logit lens at the last point is the model's own prediction.
    np.testing.assert_allclose(trace["lens_logprobs"][:, -1], rec_lp, atol=1e-4)
    # Greedy: each generated token is the previous position's top prediction.
    assert list(ids[len(PROMPT):]) == list(rec_ids[len(PROMPT) - 1:-1, 0])


def test_residual_stream_decomposes_into_attention_and_mlp(recorded) -> None:
    """block output - block input == what attention adds + what the MLP adds, for sequential
    (GPT-2, Llama...) and parallel (GPT-NeoX, Phi) pre-norm blocks; not for post-norm BERT,
    which the metadata says."""
    family, model, trace, s, _ = recorded
    structure = trace.metadata["run"]["structure"]
    if family == "bert":
        assert structure["residual_additive"] is False
        return
    assert structure["residual_additive"] is True
    r = as_f32(trace["residual"][:])
    added = as_f32(trace["attn_out"][:]) + as_f32(trace["mlp_out"][:])
    delta = r[:, 1:] - r[:, :-1]
    scale = np.abs(r).max()
    np.testing.assert_allclose(delta, added, atol=1e-5 * max(1.0, scale))
    if family in SEQUENTIAL_FAMILIES:
        assert structure["attn_out"] != structure["mlp_out"]


def test_summaries_are_computed_while_recording(recorded) -> None:
    family, model, trace, s, _ = recorded
    r = as_f32(trace["residual"][:])
    np.testing.assert_allclose(trace["residual_norm"][:], np.linalg.norm(r, axis=-1),
                               rtol=1e-5)
    ranges = trace.metadata["summary"]["value_ranges"]
    assert ranges["residual"][0] <= r.min() and ranges["residual"][1] >= r.max()


# -- structure discovery ---------------------------------------------------------------------
def test_structure_is_found_by_role_not_by_name() -> None:
    s = discover_structure(tiny_model("gemma2"))
    # Gemma-2 normalises each sublayer's output before adding it: that norm's output is what
    # attention adds, found because it takes the attention output unchanged.
    assert s.names["attn_out"] == "model.layers.{i}.post_attention_layernorm"
    assert s.names["mlp_out"] == "model.layers.{i}.post_feedforward_layernorm"
    assert s.logit_softcap == 30.0 and s.lens_exact
    phi = discover_structure(tiny_model("phi"))
    # Phi sends both sublayers through one dropout module: told apart by call order. What
    # attention adds is also the attention module's own output, hooked there instead.
    assert phi.names["attn_out"] == "model.layers.{i}.self_attn"
    assert phi.names["mlp_out"] == "model.layers.{i}.resid_dropout (call 2)"
    llama = discover_structure(tiny_model("llama"))
    assert llama.names["neurons"] == "model.layers.{i}.mlp.down_proj (input)"
    assert llama.d_mlp == 64 and llama.final and llama.lens_exact


class _NoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, input_ids=None):
        return self.proj(torch.zeros(1, 4))


class _MlpOnlyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _NoAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 10, "num_attention_heads": 2})()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList([_MlpOnlyBlock(), _MlpOnlyBlock()])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_unknown_architecture_names_what_is_missing() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="could not find the transformer "
                                                           "blocks"):
        discover_structure(_NoBlocks())
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"block 0 \(layers.0, _MlpOnlyBlock\): could not find the "
                             r"attention module"):
        discover_structure(_NoAttention())
    assert issubclass(UnsupportedArchitectureError, tracekit.TraceError)


# -- options ---------------------------------------------------------------------------------
def test_layer_subset_records_its_boundary_points(tmp_path: Path) -> None:
    model = tiny_model("llama")
    record(model, None, input_ids=PROMPT, out=tmp_path / "t.zarr", max_new_tokens=2,
           layers=[1], capture=["residual", "attention", "predictions"])
    with tracekit.open(tmp_path / "t.zarr") as t:
        assert t.layers == [1] and t.points == [1, 2]
        assert t["residual"].shape[1] == 2 and t["attention"].shape[1] == 1
        assert t.captured == ["residual", "attention", "predictions"]


def test_sampling_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    model = tiny_model("gpt2")

    def run(seed: int, name: str) -> list[int]:
        sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        return record(model, None, input_ids=PROMPT, out=tmp_path / name, max_new_tokens=8,
                      sampling=sampling, capture=["predictions"], stop_at_eos=False).token_ids

    a, b, c = run(1, "a.zarr"), run(1, "b.zarr"), run(2, "c.zarr")
    assert a == b and a != c
    with tracekit.open(tmp_path / "a.zarr") as t:
        gen = t.metadata["run"]["generation"]
        assert gen["strategy"] == "sample" and gen["top_k"] == 50 and gen["top_p"] == 0.95
        assert t.metadata["run"]["seed"] == 1


def test_eager_attention_only_while_attention_is_captured(tmp_path: Path) -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    record(model, None, input_ids=PROMPT, out=tmp_path / "a.zarr", max_new_tokens=1,
           capture=["attention"])
    assert model.config._attn_implementation == "sdpa"  # restored
    record(model, None, input_ids=PROMPT, out=tmp_path / "b.zarr", max_new_tokens=1,
           capture=["residual"])
    with tracekit.open(tmp_path / "a.zarr") as a, tracekit.open(tmp_path / "b.zarr") as b:
        assert a.metadata["run"]["attn_implementation"] == "eager"
        assert b.metadata["run"]["attn_implementation"] == "sdpa"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_storage_replays_within_its_tolerance(tmp_path: Path, dtype: str) -> None:
    model = tiny_model("qwen2")
    out = tmp_path / "t.h5"
    record(model, None, input_ids=PROMPT, out=out, max_new_tokens=4, store_dtype=dtype,
           capture=tracekit.CAPTURE_GROUPS, stop_at_eos=False)
    with tracekit.open(out) as t:
        assert t["residual"].logical_dtype == dtype
        report = verify_trace(t, model)
    assert report.effective_dtype == dtype and report.ok


def test_too_long_a_generation_is_refused_before_recording(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match="exceeds the model's context length 128"):
        Recording(tiny_model("gpt2"), None, input_ids=PROMPT, max_new_tokens=200)
    with pytest.raises(RecorderError, match="unknown capture group"):
        Recording(tiny_model("gpt2"), None, input_ids=PROMPT, capture=["residuals"])
    assert not list(tmp_path.iterdir())


def test_ctrl_c_mid_generation_leaves_a_valid_aborted_trace(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    structure = discover_structure(model)  # its probe pass is not one of the counted calls
    calls = {"n": 0}

    def interrupt(module, args):  # Ctrl-C arrives inside the 4th forward pass
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    handle = model.transformer.h[1].register_forward_pre_hook(interrupt)
    out = tmp_path / "t.zarr"
    try:
        with pytest.raises(KeyboardInterrupt):
            record(model, None, input_ids=PROMPT, out=out, max_new_tokens=10,
                   stop_at_eos=False, structure=structure)
    finally:
        handle.remove()
    with tracekit.open(out) as t:
        assert t.status == "aborted"
        assert (t.n_positions, t.n_steps) == (len(PROMPT) + 2, 3)  # steps 0-2 were computed
        assert t["residual"][:].shape[0] == len(PROMPT) + 2
        assert verify_trace(t, model).ok


def test_token_texts_are_the_exact_bytes() -> None:
    tok = tiny_tokenizer(300)
    text = "déf naïve(x):\n    return '€'"
    ids = tok(text)["input_ids"]
    assert b"".join(token_bytes(tok, ids)) == text.encode("utf-8")


def test_importing_tracekit_does_not_import_torch() -> None:
    code = ("import sys, tracekit, tracekit.cli, tracekit.record_cli; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_offloaded_model_is_recorded_through_accelerate_hooks(tmp_path: Path) -> None:
    """Weights that live on ``meta`` between calls (accelerate offload, as device_map="auto"
    does past the GPUs) are recorded like any other, and the metadata names where it ran."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama")
    reference = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    out = tmp_path / "t.zarr"
    record(model, None, input_ids=PROMPT, out=out, max_new_tokens=3, store_dtype="float32",
           capture=tracekit.CAPTURE_GROUPS, stop_at_eos=False)
    with tracekit.open(out) as t:
        assert t.metadata["run"]["device"] == "cpu"
        assert verify_trace(t, reference).ok


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_generation_continues_in_a_preallocated_cache_where_it_can(family: str) -> None:
    from tracekit.recorder.recording import preallocated_cache

    model = tiny_model(family)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[3, 1, 4, 1, 5]]), use_cache=True)
        grown = out.past_key_values
        static = preallocated_cache(model, grown, 12)
    if family == "mistral":  # sliding-window layers keep the model's own cache
        assert static is None
        return
    assert type(static).__name__ == "StaticCache"
    for mine, theirs in zip(static.layers, grown.layers, strict=True):
        assert mine.keys.shape[-2] == 12  # room for every position, allocated once
        assert torch.equal(mine.keys[:, :, :5], theirs.keys)
        assert torch.equal(mine.values[:, :, :5], theirs.values)
        assert not mine.keys[:, :, 5:].any()


@pytest.mark.parametrize("family", ["gpt2", "mistral", "opt"])
def test_steps_collected_together_equal_steps_collected_alone(family: str, tmp_path: Path,
                                                              monkeypatch) -> None:
    """Decode steps are handed to the writer in small batches (one stack, cast and copy for
    several steps); the trace must not change by a bit. gpt2: a preallocated cache (batched);
    mistral: a sliding window (each step alone); opt: an MLP that flattens its rows."""
    from tracekit.recorder import recording

    model = tiny_model(family)
    structure = discover_structure(model)
    traces = {}
    for steps in (1, 4):
        monkeypatch.setattr(recording, "_BATCH_STEPS", steps)
        out = tmp_path / f"b{steps}.zarr"
        record(model, None, input_ids=PROMPT, out=out, max_new_tokens=10,
               capture=tracekit.CAPTURE_GROUPS, stop_at_eos=False, structure=structure)
        traces[steps] = tracekit.open(out)
    one, four = traces[1], traces[4]
    assert four.n_steps == one.n_steps == 11
    for name in sorted(set(one.array_names()) - {"step_time"}):  # when it ran
        if name == "lens_logprobs":  # one matmul over more rows: float32 rounding may move
            np.testing.assert_allclose(one[name][:], four[name][:], rtol=0, atol=1e-5)
        else:
            assert np.array_equal(one[name][:], four[name][:]), name
    for t in traces.values():
        t.close()


@pytest.mark.parametrize(("steps", "budget", "handovers"),
                         [(8, 32 << 20, [[6], [1] * 7, [1] * 3]),  # prompt, then 8 at a time
                          (8, 1, [[6]] + [[1]] * 10)])  # each step over the byte budget
def test_steps_are_held_back_only_a_bounded_while(tmp_path: Path, monkeypatch, steps: int,
                                                  budget: int, handovers) -> None:
    """Memory stays flat: the recorder holds at most _BATCH_STEPS steps, or fewer when their
    tensors pass _BATCH_BYTES, before handing them to the writer."""
    from tracekit.recorder import recording
    from tracekit.writer import TraceWriter

    monkeypatch.setattr(recording, "_BATCH_STEPS", steps)
    monkeypatch.setattr(recording, "_BATCH_BYTES", budget)
    calls = []
    real = TraceWriter.write_steps

    def spy(self, *args, step_positions, **kwargs):
        calls.append(list(step_positions))
        return real(self, *args, step_positions=step_positions, **kwargs)

    monkeypatch.setattr(TraceWriter, "write_steps", spy)
    record(tiny_model("gpt2"), None, input_ids=PROMPT, out=tmp_path / "t.zarr",
           max_new_tokens=10, stop_at_eos=False)
    assert calls == handovers
