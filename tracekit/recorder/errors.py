"""Errors of the recorder. Both are :class:`tracekit.TraceError`, so the CLI reports them as one
line."""

from __future__ import annotations

from ..errors import TraceError


class RecorderError(TraceError):
    """Recording cannot start or go on: bad options, a model that cannot be loaded, too long."""


class UnsupportedArchitectureError(RecorderError):
    """The model's structure could not be mapped; the message names the part not found."""
