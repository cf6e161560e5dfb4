"""Traces read where they lie: over loopback HTTP and S3 (moto), in both formats, packed and
unpacked, through the API, the CLI and the viewer; only the chunks read are fetched, and
faults end in retries or one clear line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tracegen
from click.testing import CliRunner

import tracekit
from tracekit.cli import main
from tracekit.errors import NotATraceError, RemoteAccessError, RemoteError
from tracekit.pack import pack

SEED = 11
KINDS = ("zarr", "hdf5", "pack")


def _make(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A finished synthetic trace on disk: (local path, name to serve it under)."""
    plan = tracegen.small_plan(max_positions=40)
    folder = tmp_path / "local"
    folder.mkdir(exist_ok=True)
    if kind == "hdf5":
        path = folder / "t.h5"
        tracegen.write_synthetic(path, plan, seed=SEED)
        return path, "t.h5"
    path = folder / "t.zarr"
    if not path.exists():
        tracegen.write_synthetic(path, plan, seed=SEED)
    if kind == "pack":
        pack(path, folder / "t.pack")
        return folder / "t.pack", "shared/t.pack"  # a pack is known by its bytes, any name
    return path, "t.zarr"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)


def _upload(s3, src: Path, bucket: str, key: str) -> None:
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for f in files:
        name = key if src.is_file() else f"{key}/{f.relative_to(src).as_posix()}"
        client.upload_file(str(f), bucket, name)


@pytest.fixture(params=KINDS)
def served_http(request, http_server, tmp_path):
    """(url, local path, server): a trace of each kind on the loopback HTTP server."""
    local, name = _make(tmp_path, request.param)
    _copy(local, http_server.root / name)
    return f"{http_server.url}/{name}", local, http_server


@pytest.fixture(params=KINDS)
def served_s3(request, s3, s3_proxy, tmp_path):
    """(url, local path, proxy): a trace of each kind in a bucket of the loopback S3 server,
    reached through the counting proxy."""
    local, name = _make(tmp_path, request.param)
    _upload(s3, local, "traces", name)
    return f"s3://traces/{name}", local, s3_proxy


def _assert_same_trace(remote: tracekit.Trace, local: tracekit.Trace) -> None:
    assert remote.metadata == local.metadata
    assert (remote.n_positions, remote.n_steps) == (local.n_positions, local.n_steps)
    for name in local.array_names():
        a, b = local[name][:], remote[name][:]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} differs"
    expected = tracegen.expected_contents(local.plan, SEED, local.n_positions)
    tracegen.assert_trace_matches(remote, expected)


def test_http_trace_equals_the_local_one_bit_for_bit(served_http):
    url, local, server = served_http
    server.reset_stats()
    with tracekit.open(url) as remote, tracekit.open(local) as here:
        opened = server.reset_stats()
        # Opening is a handful of requests: a folder's consolidated metadata and counter, a
        # file's superblock and headers, a pack's directory.
        assert opened.count <= 10, opened.requests
        _assert_same_trace(remote, here)
        assert remote.location == url and remote.path is None


def test_s3_trace_equals_the_local_one_bit_for_bit(served_s3):
    url, local, proxy = served_s3
    proxy.reset_stats()
    with tracekit.open(url) as remote, tracekit.open(local) as here:
        assert proxy.reset_stats().count <= 10
        _assert_same_trace(remote, here)


@pytest.mark.parametrize("kind", ["zarr", "pack"])
def test_a_position_fetches_only_its_chunks(kind, http_server, tmp_path):
    local, name = _make(tmp_path, kind)
    _copy(local, http_server.root / name)
    with tracekit.open(f"{http_server.url}/{name}") as t, tracekit.open(local) as here:
        chunk = t["residual"]._stored.chunks
        row = t["residual"][0].nbytes
        http_server.reset_stats()
        value = t["residual"][25]
        seen = http_server.reset_stats()
        assert np.array_equal(value, here["residual"][25])
        # One chunk of residual, read whole once to check its checksum: that chunk's bytes
        # and its 4-byte checksum (a pack's entry also costs its local header, once).
        stored = chunk[0] * row + 4
        assert seen.bytes_sent <= stored + 1024, (seen.bytes_sent, stored, seen.requests)
        if kind == "zarr":
            assert all("/residual/" in r.path for r in seen.requests), seen.requests
        # Read again: checked already, so only the row itself crosses the wire.
        t["residual"][26]
        again = http_server.reset_stats()
        assert again.bytes_sent <= row + 1, again.requests


def test_reads_of_several_chunks_go_out_together(http_server, tmp_path):
    local, name = _make(tmp_path, "zarr")
    _copy(local, http_server.root / name)
    with tracekit.open(f"{http_server.url}/{name}") as t:
        t["attention"][39]  # check every tile once
        http_server.latency = 0.2
        http_server.reset_stats()
        started = time.perf_counter()
        t["attention"][0:40]  # every tile of the triangle
        took = time.perf_counter() - started
        seen = http_server.reset_stats()
    assert seen.count >= 3 and seen.max_in_flight >= 3, seen
    assert took < 0.2 * seen.count * 0.6, (took, seen.count)


def test_transient_faults_on_open_are_retried(http_server, tmp_path):
    local, name = _make(tmp_path, "zarr")
    _copy(local, http_server.root / name)
    http_server.inject("status", match="*/zarr.json", times=2, status=503)
    with tracekit.open(f"{http_server.url}/{name}") as t:
        assert t.n_positions == 40


def test_missing_trace_and_refused_access_are_one_line(http_server, tmp_path):
    with pytest.raises(NotATraceError, match="no trace there"):
        tracekit.open(f"{http_server.url}/nothing.zarr")
    local, name = _make(tmp_path, "zarr")
    _copy(local, http_server.root / name)
    http_server.inject("status", times=50, status=403)
    started = time.perf_counter()
    with pytest.raises(RemoteAccessError, match="403") as caught:
        tracekit.open(f"{http_server.url}/{name}")
    assert time.perf_counter() - started < 5 and "\n" not in str(caught.value)


def test_a_slow_server_times_out_in_bounded_time(http_server, tmp_path):
    local, name = _make(tmp_path, "hdf5")
    _copy(local, http_server.root / name)
    http_server.inject("delay", times=100, seconds=5)
    started = time.perf_counter()
    with pytest.raises(RemoteError):
        tracekit.open(f"{http_server.url}/{name}",
                      storage_options={"read_timeout": 0.3, "retries": 2})
    assert time.perf_counter() - started < 5


def test_cache_makes_rescrubbing_free(http_server, tmp_path):
    local, name = _make(tmp_path, "zarr")
    _copy(local, http_server.root / name)
    url, cache = f"{http_server.url}/{name}", tmp_path / "cache"
    steps = [3, 17, 29, 39]
    with tracekit.open(url, cache_dir=cache) as t:
        first = [t["residual"][s] for s in steps]
    http_server.reset_stats()
    with tracekit.open(url, cache_dir=cache) as t:
        http_server.reset_stats()  # opening reads the (uncached) metadata
        again = [t["residual"][s] for s in steps]
        assert http_server.reset_stats().count == 0
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_cli_reads_urls(served_http, tmp_path):
    url, local, _ = served_http
    runner = CliRunner()
    info = runner.invoke(main, ["info", url])
    assert info.exit_code == 0, info.output
    assert info.output.startswith(f"Trace     {url} (")
    valid = runner.invoke(main, ["validate", "--deep", url])
    assert (valid.exit_code, valid.output) == (0, f"{url}: valid\n")
    out = tmp_path / "copy.h5"
    converted = runner.invoke(main, ["convert", url, str(out)])
    assert converted.exit_code == 0, converted.output
    with tracekit.open(out) as copy, tracekit.open(local) as here:
        _assert_same_trace(copy, here)


def test_cli_errors_on_urls_are_one_line(http_server):
    runner = CliRunner()
    result = runner.invoke(main, ["info", f"{http_server.url}/missing.zarr"])
    assert result.exit_code == 1
    assert result.output == (f"Error: {http_server.url}/missing.zarr: no trace there (no "
                             f"zarr.json, no file)\n")
    http_server.inject("status", times=50, status=500)
    result = runner.invoke(main, ["validate", f"{http_server.url}/t.zarr",
                                  "-S", "retries=2"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "HTTP 500" in result.output and "Traceback" not in result.output


def test_render_a_url(served_http, tmp_path):
    pytest.importorskip("tracekit_viewer")
    url, _, _ = served_http
    out = tmp_path / "frame.png"
    result = CliRunner().invoke(main, ["render", url, "--step", "5", "--size", "320x240",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000


def test_h5py_reading_a_url_survives_cycle_collection_on_the_event_loop(http_server, tmp_path):
    """h5py reads through the source's file object holding its global lock, while the source
    waits on its event-loop thread; a cycle collection there that frees an h5py object needs
    that lock. It deadlocked; run in a child so that a deadlock fails the test, not hangs it."""
    local, name = _make(tmp_path, "hdf5")
    _copy(local, http_server.root / name)
    code = f"""
import gc, h5py
from tracekit.storage._remote import open_remote
from tracekit.storage._source import SourceFile

class Cycle:
    pass

gc.set_threshold(1, 1, 1)  # collect at almost every allocation, on whichever thread
with open_remote({http_server.url + '/' + name!r}) as src:
    f = h5py.File(SourceFile(src, "", block=4096, blocks=1), "r", rdcc_nbytes=0)
    for i in range(40):
        for key in ("residual", "top_ids", "attention", "neurons"):
            c = Cycle()
            c.me, c.ds = c, f[key]  # an h5py object only the collector frees
            del c
            f[key][i % 8]
    f.close()
print("ok")
"""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("h5py reading through a remote source deadlocked")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
