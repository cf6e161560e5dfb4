"""Errors raised by tracekit. Every failure a user can cause is a :class:`TraceError`."""

from __future__ import annotations


class TraceError(Exception):
    """Base class of every error tracekit raises on purpose."""


class NotATraceError(TraceError):
    """The path exists but is not a tracekit trace (no zarr group / HDF5 signature / metadata)."""


class MetadataError(TraceError):
    """The root metadata is missing, not JSON, too large, or does not follow the schema."""


class VersionError(TraceError):
    """The trace was written with a format major version this reader does not know."""


class MissingArrayError(TraceError, KeyError):
    """An array the metadata promises is not in the trace, or an uncaptured one was asked for."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


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
