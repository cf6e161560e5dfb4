"""tracekit: record what a transformer does, token by token, into versioned trace files.

``tracekit.open(path)`` reads a trace lazily; ``tracekit.create(path, plan)`` writes one.
Importing tracekit never imports torch, transformers or VTK.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CorruptTraceError,
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
    NotATraceError,
    TokenIdError,
    TraceError,
    TraceExistsError,
    VersionError,
    WriterError,
)
from .format import (  # noqa: E402
    CAPTURE_GROUPS,
    FORMAT_VERSION,
    FORMAT_VERSION_STR,
    ModelInfo,
    TracePlan,
)
from .reader import LazyArray, Prediction, Token, Tokens, Trace, open  # noqa: E402
from .writer import TraceWriter, create  # noqa: E402

__all__ = [
    "CAPTURE_GROUPS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_STR",
    "CorruptTraceError",
    "DisallowedCodecError",
    "LazyArray",
    "MetadataError",
    "MissingArrayError",
    "ModelInfo",
    "NotATraceError",
    "Prediction",
    "Token",
    "TokenIdError",
    "Tokens",
    "Trace",
    "TraceError",
    "TraceExistsError",
    "TracePlan",
    "TraceWriter",
    "VersionError",
    "WriterError",
    "__version__",
    "create",
    "open",
]
