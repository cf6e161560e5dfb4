"""Errors raised by tracekit. Every failure a user can cause is a :class:`TraceError`."""

from __future__ import annotations

#: Longest message a TraceError shows: the start and the end of a longer one are kept.
MAX_MESSAGE_CHARS = 300


def one_line(text: str, limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one printable line: newlines, control characters and lone surrogates
    escaped (``\\n``, ``\\x1b``, ``\\udc80``), and beyond ``limit`` characters its middle cut out.
    Messages quote values from hostile files, which can be 100 kB long or hold newlines and
    terminal escape sequences."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in text)
    if limit is not None and len(text) > limit:
        head = limit * 2 // 3
        tail = limit - head - len(f" ...[{len(text)} chars]... ")  # room for the count
        text = f"{text[:head]} ...[{len(text) - head - tail} chars]... {text[-tail:]}"
    return text


class TraceError(Exception):
    """Base class of every error tracekit raises on purpose. Its message is one printable
    line of at most MAX_MESSAGE_CHARS characters, whatever values it quotes."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class NotATraceError(TraceError):
    """The path exists but is not a tracekit trace (no zarr group / HDF5 signature / metadata)."""


class MetadataError(TraceError):
    """The root metadata is missing, not JSON, too large, or does not follow the schema."""


class VersionError(TraceError):
    """The trace was written with a format major version this reader does not know."""


class MissingArrayError(TraceError, KeyError):
    """An array the metadata promises is not in the trace, or an uncaptured one was asked for."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return one_line(str(self.args[0])) if self.args else ""


class CorruptTraceError(TraceError):
    """The structure contradicts itself: shapes, dimension names, counters or chunks are wrong."""


class DisallowedCodecError(TraceError):
    """An array uses a codec, filter or data type outside the allowlist (e.g. an object codec)."""


class WriterError(TraceError):
    """Recording failed (bad step data, disk full, permission); committed data stays readable."""


class TraceFullError(WriterError):
    """A step would take the trace past its size cap: the trace keeps every step before it and
    closes with status ``truncated``."""


class TraceExistsError(TraceError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class TokenIdError(TraceError, IndexError):
    """A token id outside the trace's vocabulary (``Trace.decode``)."""


class RemoteError(TraceError):
    """A trace on HTTP or an object store could not be read: the server kept failing (5xx,
    429), the connection broke or timed out, or the remote-access packages are missing."""


class RemoteAccessError(RemoteError):
    """The server refused access (HTTP 401/403) or no credentials were found."""
