"""Tests of tracekit-viewer (a package, so its conftest does not shadow the one in tests/)."""
