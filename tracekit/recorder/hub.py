"""Where a model name is loaded from, and failing fast when the Hugging Face hub is out of reach.

Without a network, transformers asks the hub for every file and huggingface_hub retries each
request with back-off: about 28 s and a dozen retry lines before one error. A hub id is
therefore loaded from the local cache alone (``local_files_only``) when the hub does not
answer one short probe, or when ``HF_HUB_OFFLINE`` is set, and a model that is not cached then
fails at once with one line that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_PROBE_TIMEOUT_S", "describe_source", "hub_cache", "hub_endpoint", "hub_unreachable",
           "is_local_folder"]

#: Seconds the hub has to answer the probe before it counts as unreachable.
HUB_PROBE_TIMEOUT_S = 3.0


def is_local_folder(name: str | os.PathLike[str]) -> bool:
    """A name that is an existing folder (or written as a path) is never a hub id."""
    text = str(name)
    return text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().is_dir()


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def describe_source(name: str) -> str:
    """Where ``name`` (a resolved model name: folder or hub id) would be loaded from."""
    from .loading import DEMO_MODEL_NAME, resolve_model_path

    if name == DEMO_MODEL_NAME:
        return f"the embedded demo model ({resolve_model_path(name)})"
    if is_local_folder(name):
        return f"the local folder {Path(name).expanduser()}"
    return f"the Hugging Face cache ({hub_cache()}), else {hub_endpoint()}"


def hub_unreachable(timeout: float | None = None) -> str | None:
    """Why the hub cannot be used now (offline mode, or no answer within ``timeout`` seconds);
    None when it answers. Any HTTP answer, even an error status, means it is reachable."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub.utils import get_session

    endpoint = hub_endpoint()
    try:
        get_session().head(endpoint, timeout=timeout or HUB_PROBE_TIMEOUT_S,
                           follow_redirects=False)
    except (TypeError, AttributeError):  # a bug here, not the network
        raise
    except Exception as exc:  # DNS failure, refused, timed out, proxy error: all "offline"
        return f"{endpoint} did not answer: {type(exc).__name__}"
    return None
