"""Where tracekit's embedded demo model lives.

The demo model is package data, not a Python package: a tiny GPT-2 (4 layers, 4 heads, 128 wide,
512 positions, 2048-token byte-level BPE) trained by ``scripts/train_demo_model.py`` on the
Python standard library's own source. See ``MODEL_CARD.md`` in the folder. This module does not
import torch or transformers.
"""

from __future__ import annotations

import importlib.resources
import pathlib

__all__ = ["demo_model_path"]


def demo_model_path() -> pathlib.Path:
    """Return the folder of the embedded demo model, in Hugging Face format.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``MODEL_CARD.md``; load it offline with
    ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")`` and
    ``AutoTokenizer.from_pretrained(path)``, or record it with ``tracekit record <path>``.
    """
    return pathlib.Path(str(importlib.resources.files("tracekit") / "demo_model"))
