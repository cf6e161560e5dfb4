"""Shared fixtures. The synthetic trace generator itself lives in ``tests/tracegen.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make ``import tracegen`` work everywhere

import tracegen  # noqa: E402

from tracekit.storage import Backend  # noqa: E402
from tracekit.storage._memory import MemoryBackend  # noqa: E402

#: Every storage backend; on-disk ones are detected by their bytes when opened.
BACKENDS = ("memory", "zarr", "hdf5")
DISK_BACKENDS = ("zarr", "hdf5")
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def trace_target(tmp_path: Path, kind: str, name: str = "trace") -> Path | Backend:
    """Where a new trace of ``kind`` goes: a fresh path, or a fresh memory backend."""
    if kind == "memory":
        return MemoryBackend()
    return tmp_path / f"{name}{SUFFIX[kind]}"


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=DISK_BACKENDS)
def disk_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def small_plan():
    return tracegen.small_plan()


@pytest.fixture
def synthetic_trace(tmp_path: Path, backend_kind: str, small_plan):
    """(target, expected): a complete synthetic trace on every backend."""
    target = trace_target(tmp_path, backend_kind)
    expected = tracegen.write_synthetic(target, small_plan, seed=11)
    return target, expected


@pytest.fixture
def disk_trace(tmp_path: Path, disk_kind: str, small_plan):
    """(path, expected): a complete synthetic trace on each on-disk backend."""
    target = trace_target(tmp_path, disk_kind)
    expected = tracegen.write_synthetic(target, small_plan, seed=11)
    return target, expected


@pytest.fixture(scope="session")
def s3_server_session():
    """One loopback S3 server (moto) for the whole test session."""
    from servers import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def s3(s3_server_session, monkeypatch):
    """The loopback S3 server, emptied, with the environment pointing at it (endpoint and
    dummy credentials in the standard AWS variables)."""
    s3_server_session.reset()
    for key, value in s3_server_session.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server_session


# -- remote traces: an HTTP file server and a fault proxy in front of the S3 server ----------


@pytest.fixture
def http_server(tmp_path: Path):
    """A loopback HTTP server of a fresh folder (``http_server.root``), with byte ranges,
    request/byte counters and injectable faults (see ``servers.HTTPFileServer``)."""
    from servers import HTTPFileServer

    root = tmp_path / "served"
    root.mkdir()
    with HTTPFileServer(root) as server:
        yield server


@pytest.fixture
def s3_proxy(s3, monkeypatch):
    """The loopback S3 server (emptied) behind a fault/latency proxy; ``AWS_ENDPOINT_URL``
    points at the proxy, so ``s3://`` URLs go through it (see ``servers.FaultProxy``)."""
    from servers import FaultProxy

    with FaultProxy(s3.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy
