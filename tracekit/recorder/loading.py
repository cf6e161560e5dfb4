"""Loading a model and its tokenizer by hub id or local folder, for recording or replay."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .errors import RecorderError
from .hub import hub_cache, hub_endpoint, hub_unreachable, is_local_folder

__all__ = ["DEMO_MODEL_NAME", "load_model", "resolve_model_path"]

#: The model name recorded in traces of the embedded demo model (``tracekit record`` without a
#: MODEL); replay maps it back to the installed copy.
DEMO_MODEL_NAME = "tracekit:demo"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def resolve_model_path(name: str | os.PathLike[str] | None) -> str:
    """``None`` or the demo name -> the embedded demo model's folder; otherwise unchanged."""
    if name is None or str(name) == DEMO_MODEL_NAME:
        from ..demo import demo_model_path

        path = demo_model_path()
        if not (path / "config.json").is_file():
            raise RecorderError(f"the embedded demo model is missing from {path} (broken "
                                f"install?); pass a MODEL")
        return str(path)
    return str(name)


def _is_causal(config: Any) -> bool:
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecorderError(f"--device {device}: no CUDA GPU is visible to torch")
    return device


def load_model(name_or_path: str | os.PathLike[str] | None = None, *, device: str = "auto",
               dtype: str = "auto", attn_implementation: str | None = None,
               trust_remote_code: bool = False, revision: str | None = None,
               load_tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)``: a causal LM when the config names one, else the base model
    (an encoder). ``None`` loads the embedded demo model.

    ``device="auto"`` spreads the model over every visible GPU (``device_map="auto"``, needs
    accelerate) or uses the CPU. ``dtype="auto"`` is float32 on the CPU and the checkpoint's
    dtype on a GPU. Remote code runs only with ``trust_remote_code=True``; weights load only
    from safetensors files. A hub id comes from the local cache alone when the hub does not
    answer (offline), and fails at once when it is not cached.
    """
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the record extra is missing
        raise RecorderError("recording needs torch and transformers: pip install "
                            "'tracekit[record]'") from exc
    source = resolve_model_path(name_or_path)
    local = is_local_folder(source)
    if local and not Path(source).expanduser().is_dir():
        raise RecorderError(f"no model folder at {source}")
    # A hub id is looked up in the local cache only when the hub does not answer (see .hub).
    offline = None if local else hub_unreachable()
    target = pick_device(device)
    if dtype != "auto" and dtype not in _DTYPES:
        raise RecorderError(f"--dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    torch_dtype: Any = _DTYPES.get(dtype)
    if torch_dtype is None:
        torch_dtype = "auto" if target.startswith("cuda") else torch.float32
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if offline:
        common["local_files_only"] = True
    with _quiet(transformers):
        try:
            config = AutoConfig.from_pretrained(source, **common)
        except Exception as exc:
            raise _load_error(source, exc, offline) from exc
        cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
        # Weights only from safetensors, never pickle: a pytorch_model.bin can run code on load.
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, **common}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        spread = target == "cuda" and torch.cuda.device_count() > 1 and \
            importlib.util.find_spec("accelerate") is not None
        if spread:
            kwargs["device_map"] = "auto"
        try:
            model = cls.from_pretrained(source, config=config, **kwargs)
        except Exception as exc:
            raise _load_error(source, exc, offline) from exc
        if not spread:
            model.to(target)
        model.eval()
        tokenizer = None
        if load_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, **common)
            except Exception as exc:
                raise RecorderError(
                    f"cannot load the tokenizer of {source!r}: {_one_line(exc)}") from exc
    return model, tokenizer


def model_name_for(name_or_path: str | os.PathLike[str] | None) -> str:
    """The name a trace records: the demo name, a hub id, or a local folder's absolute path."""
    if name_or_path is None or str(name_or_path) == DEMO_MODEL_NAME:
        return DEMO_MODEL_NAME
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else str(name_or_path)


def _load_error(source: str, exc: BaseException, offline: str | None = None) -> RecorderError:
    """One line for a model that would not load: the two refusals and the hub's answers said in
    tracekit's terms. ``offline``: why the hub was not asked (files only from the cache)."""
    text = str(exc)
    if offline and (_caused_by(exc, "LocalEntryNotFoundError") or "cached files" in text):
        why = f"offline ({offline}), and it is not in the Hugging Face cache {hub_cache()}"
    elif _caused_by(exc, "RepositoryNotFoundError"):
        why = f"no such model on {hub_endpoint()}, and no such local folder"
    elif "custom code" in text or "trust_remote_code" in text:
        why = ("it needs its own Python code, which runs only with --trust-remote-code "
               "(off by default)")
    elif "safetensors" in text and "no file named" in text:
        why = ("it has no safetensors weights; weights in pickle files (.bin, .pt) are never "
               "loaded, since unpickling can run code")
    else:
        why = _one_line(exc)
    return RecorderError(f"cannot load model {source!r}: {why}")


def _caused_by(exc: BaseException | None, name: str) -> bool:
    """Whether ``exc`` or an exception it was raised from is of the class ``name``."""
    seen = 0
    while exc is not None and seen < 16:
        if any(c.__name__ == name for c in type(exc).__mro__):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet(transformers: Any):
    """Keep transformers' info/warning chatter out of the CLI's output."""
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(before)
        if bars:
            logging.enable_progress_bar()
