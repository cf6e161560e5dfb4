"""Tiny random-initialised models of each supported family, for tests and benchmarks.

Nothing here downloads anything: configs are built locally and a byte-level BPE tokenizer is
trained in memory in about a second.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "SEQUENTIAL_FAMILIES", "save_tiny_model", "tiny_model", "tiny_tokenizer"]

#: family -> (config class, model class, config keywords). 2 layers, d_model 32-64.
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"hidden_size": 32, "intermediate_size": 64, "use_parallel_residual": True}),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2,
                 "sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"hidden_size": 32, "ffn_dim": 64, "word_embed_proj_dim": 32}),
    "phi": ("PhiConfig", "PhiForCausalLM", {"hidden_size": 32, "intermediate_size": 64}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 1,
               "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 1,
                "head_dim": 8, "sliding_window": 6}),
    "bert": ("BertConfig", "BertModel", {"hidden_size": 32, "intermediate_size": 64}),
}
_COMMON = {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}

FAMILIES = tuple(_SPECS)
#: Families whose blocks run attention then MLP on the residual stream (pre-norm, sequential).
SEQUENTIAL_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "opt", "gemma", "gemma2")


def tiny_config(family: str, vocab_size: int = 256, **overrides: Any) -> Any:
    import transformers

    config_cls, _, kwargs = _SPECS[family]
    options = {**({} if family == "gpt2" else _COMMON), **kwargs, "vocab_size": vocab_size,
               # A wider init than the default 0.02 gives peaked attention and predictions,
               # so comparisons are not between near-uniform distributions.
               "initializer_range": 0.2, **overrides}
    if family != "bert":
        options.setdefault("bos_token_id", 1)
        options.setdefault("eos_token_id", 2)
    return getattr(transformers, config_cls)(**options)


def tiny_model(family: str, *, seed: int = 0, vocab_size: int = 256,
               dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A random-initialised 2-layer model of ``family`` (see :data:`FAMILIES`), in eval mode."""
    import transformers

    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    model_cls = getattr(transformers, _SPECS[family][1])
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    return model


_CORPUS_MODULES = ("textwrap", "string")


@functools.cache
def _corpus() -> tuple[str, ...]:
    import importlib
    import inspect

    return tuple(inspect.getsource(importlib.import_module(m)) for m in _CORPUS_MODULES)


def tiny_tokenizer(vocab_size: int = 256) -> Any:
    """A byte-level BPE tokenizer trained in memory on a few stdlib modules' source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def save_tiny_model(folder: str | Path, family: str = "gpt2", *, seed: int = 0,
                    vocab_size: int = 512, tokenizer: Any = None, **overrides: Any) -> Path:
    """Save a tiny model and a trained tokenizer as a Hugging Face folder; returns it."""
    folder = Path(folder)
    tokenizer = tokenizer or tiny_tokenizer(vocab_size)
    import transformers

    from .loading import _quiet

    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), **overrides)
    with _quiet(transformers):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
