"""Recording Hugging Face models into traces (needs the ``record`` extra: torch, transformers).

``import tracekit`` never imports this package; import it explicitly::

    from tracekit.recorder import record, load_model
    model, tokenizer = load_model("gpt2")
    result = record(model, tokenizer, "def fibonacci(n):", out="fib.zarr", max_new_tokens=32)
"""

from __future__ import annotations

from .capture import Capture
from .errors import RecorderError, UnsupportedArchitectureError
from .loading import DEMO_MODEL_NAME, load_model, resolve_model_path
from .recording import DEFAULT_CAPTURE, Recording, RecordResult, Sampling, StepInfo, record
from .replay import ArrayCheck, VerifyReport, tolerances_for, verify_trace
from .structure import BlockParts, ModelStructure, discover_structure

__all__ = [
    "DEFAULT_CAPTURE",
    "DEMO_MODEL_NAME",
    "ArrayCheck",
    "BlockParts",
    "Capture",
    "ModelStructure",
    "RecordResult",
    "RecorderError",
    "Recording",
    "Sampling",
    "StepInfo",
    "UnsupportedArchitectureError",
    "VerifyReport",
    "discover_structure",
    "load_model",
    "record",
    "resolve_model_path",
    "tolerances_for",
    "verify_trace",
]
