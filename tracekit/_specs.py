"""The arrays of format v1 (part of :mod:`tracekit.format`, which exports these names): the
capture groups, every array's spec (name, dimensions, dtype, group) and the dimensions."""

from __future__ import annotations

from dataclasses import dataclass

#: Capture groups a recording can select, in the order they are documented.
CAPTURE_GROUPS = (
    "residual",
    "attn_out",
    "mlp_out",
    "attention",
    "neurons",
    "predictions",
    "logit_lens",
)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the format: name, dimension names, dtype and the capture group it belongs to.

    ``dtype`` is a numpy dtype name, or ``"activation"`` for the plan's stored activation dtype.
    ``group`` is ``None`` for arrays every trace has.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    group: str | None
    description: str
    summary: bool = False


# fmt: off
ARRAY_SPECS: tuple[ArraySpec, ...] = (
    ArraySpec("commit", ("commit_field",), "int64", None,
              "Committed counter [positions, steps]; written after the data it covers."),
    ArraySpec("token_id", ("position",), "int64", None, "Token id at each position."),
    ArraySpec("token_bytes", ("position", "byte"), "uint8", None,
              "UTF-8 (or raw) bytes of each token's text, zero padded."),
    ArraySpec("token_nbytes", ("position",), "int32", None,
              "Length of each token's text in bytes (may exceed the stored width: truncated)."),
    ArraySpec("token_step", ("position",), "int32", None, "The step that computed each position."),
    ArraySpec("step_start", ("step",), "int64", None, "First position computed by each step."),
    ArraySpec("step_positions", ("step",), "int32", None,
              "Number of positions each step computed."),
    ArraySpec("step_time", ("step",), "float64", None,
              "Wall-clock time (Unix seconds) when each step was computed."),
    ArraySpec("residual", ("position", "point", "hidden"), "activation", "residual",
              "Residual stream at layer boundaries (point p = input of block p)."),
    ArraySpec("attn_out", ("position", "layer", "hidden"), "activation", "attn_out",
              "What each block's attention adds to the residual stream."),
    ArraySpec("mlp_out", ("position", "layer", "hidden"), "activation", "mlp_out",
              "What each block's MLP adds to the residual stream."),
    ArraySpec("attention", ("position", "layer", "head", "key"), "activation", "attention",
              "Attention pattern: the query at `position` attending to `key`."),
    ArraySpec("neurons", ("position", "layer", "neuron"), "activation", "neurons",
              "MLP hidden activations (after the nonlinearity)."),
    ArraySpec("top_ids", ("position", "rank"), "int32", "predictions",
              "Top-k next-token ids predicted at each position."),
    ArraySpec("top_logprobs", ("position", "rank"), "float32", "predictions",
              "Log-probabilities of top_ids."),
    ArraySpec("lens_ids", ("position", "point", "rank"), "int32", "logit_lens",
              "Logit lens: top-k ids decoded from the residual stream at each point."),
    ArraySpec("lens_logprobs", ("position", "point", "rank"), "float32", "logit_lens",
              "Log-probabilities of lens_ids."),
    # Level-of-detail summaries, written by the writer while recording.
    ArraySpec("residual_norm", ("position", "point"), "float32", "residual",
              "L2 norm of residual.", summary=True),
    ArraySpec("residual_range", ("position", "bound"), "float32", "residual",
              "Min and max of residual at each position.", summary=True),
    ArraySpec("attn_out_norm", ("position", "layer"), "float32", "attn_out",
              "L2 norm of attn_out.", summary=True),
    ArraySpec("attn_out_range", ("position", "bound"), "float32", "attn_out",
              "Min and max of attn_out at each position.", summary=True),
    ArraySpec("mlp_out_norm", ("position", "layer"), "float32", "mlp_out",
              "L2 norm of mlp_out.", summary=True),
    ArraySpec("mlp_out_range", ("position", "bound"), "float32", "mlp_out",
              "Min and max of mlp_out at each position.", summary=True),
    ArraySpec("neurons_range", ("position", "bound"), "float32", "neurons",
              "Min and max of neurons at each position.", summary=True),
    ArraySpec("attention_top_keys", ("position", "layer", "head", "attn_rank"), "int32",
              "attention", "Most attended keys per query, layer and head (-1: none).",
              summary=True),
    ArraySpec("attention_top_weights", ("position", "layer", "head", "attn_rank"), "float32",
              "attention", "Weights of attention_top_keys.", summary=True),
    # The vocabulary (1.1, optional): the text of every token id, so that predicted ids read
    # as text without the tokenizer. Ragged: token i is vocab_bytes[sum(vocab_nbytes[:i]):]
    # [:vocab_nbytes[i]]. Written once, when the trace is laid out.
    ArraySpec("vocab_nbytes", ("vocab",), "int32", "vocab",
              "Length in bytes of each token id's text in vocab_bytes."),
    ArraySpec("vocab_bytes", ("vocab_byte",), "uint8", "vocab",
              "UTF-8 (or raw) bytes of every token id's text, concatenated in id order."),
)
# fmt: on

SPECS_BY_NAME: dict[str, ArraySpec] = {s.name: s for s in ARRAY_SPECS}

#: Arrays whose per-position data the recorder passes to ``write_step`` (summaries are derived).
STEP_INPUT_ARRAYS = tuple(
    s.name for s in ARRAY_SPECS if s.group in CAPTURE_GROUPS and not s.summary
)

#: Group of the vocabulary arrays: present when ``capture.vocab_bytes`` is set, not captured.
VOCAB_GROUP = "vocab"
#: Compression of the vocabulary arrays and their coordinates, whatever ``capture.compression``
#: says: they are written once and read whole, so they are packed hard (byte shuffle + zstd on
#: zarr, shuffle + deflate on HDF5): a 50k-token vocabulary then adds about 0.2 MB, not 3 MB.
PACKED = "packed"

#: Every dimension; each has a coordinate array of the same name in the trace.
DIMENSIONS = (
    "position", "step", "point", "layer", "head", "key", "hidden", "neuron",
    "rank", "attn_rank", "bound", "byte", "commit_field", "vocab", "vocab_byte",
)
