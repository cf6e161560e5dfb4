"""The remote Source against real loopback servers: an HTTP file server with byte ranges and
moto's S3 server behind a fault/latency proxy. Every byte must match the local file, only the
bytes asked for may cross the wire, reads of one fetch must overlap, and every fault must end
in a success after retries or in one clear line within a bounded time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tracekit.errors import CorruptTraceError, RemoteAccessError, RemoteError, TraceError
from tracekit.storage._remote import open_remote
from tracekit.storage._remote_cache import RangeCache
from tracekit.storage._source import Read

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _files(root: Path) -> dict[str, bytes]:
    files = {"a.bin": _payload(300_000, 1), "sub/b.bin": _payload(70_000, 2),
             "zarr.json": b'{"zarr_format": 3}', "empty": b""}
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def _random_reads(files: dict[str, bytes], count: int, seed: int = 3,
                  max_len: int = 20_000) -> list[Read]:
    rng = np.random.default_rng(seed)
    keys = [k for k, v in files.items() if len(v) > 10]
    reads = []
    for i in range(count):
        key = keys[i % len(keys)]
        size = len(files[key])
        offset = int(rng.integers(0, size - 1))
        n = int(rng.integers(1, min(max_len, size - offset) + 1))
        whole = size if i % 5 == 0 and offset + n == size else None
        reads.append(Read(key, offset, np.zeros(n, np.uint8), whole))
    # whole reads of entire objects (chunk files), checked against their size
    reads += [Read(k, 0, np.zeros(len(files[k]), np.uint8), len(files[k])) for k in keys]
    return reads


def _check(reads: list[Read], files: dict[str, bytes]) -> None:
    for r in reads:
        assert r.found
        assert r.out.tobytes() == files[r.key][r.offset:r.offset + r.out.nbytes], r


# -- HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def served(http_server):
    files = _files(http_server.root / "t.zarr")
    src = open_remote(f"{http_server.url}/t.zarr")
    yield http_server, src, files
    src.close()


def test_http_bytes_match_and_only_asked_bytes_cross_the_wire(served):
    server, src, files = served
    assert src.location == f"{server.url}/t.zarr"
    assert src.get("a.bin", 1 << 20) == files["a.bin"]
    assert src.get("empty", 100) == b""
    assert src.get("missing.json", 100) is None
    assert src.size("sub/b.bin") == 70_000 and src.size("nope") is None
    assert src.sizes(["a.bin", "zarr.json", "nope"]) == [300_000, len(files["zarr.json"]), None]
    assert src.list() is None  # plain HTTP cannot list
    reads = _random_reads(files, 60)
    server.reset_stats()
    src.fetch(reads)
    _check(reads, files)
    stats = server.reset_stats()
    asked = sum(r.out.nbytes for r in reads)
    assert stats.count == len(reads)  # one ranged request each, no read-ahead
    assert all(r.range and r.range.startswith("bytes=") for r in stats.requests)
    assert asked <= stats.bytes_sent <= asked + len(reads)  # + the size-check byte at most


def test_http_reads_of_one_fetch_overlap(served):
    server, src, files = served
    server.latency = 0.2
    reads = _random_reads(files, 32, max_len=2000)[:32]
    start = time.perf_counter()
    src.fetch(reads)
    elapsed = time.perf_counter() - start
    _check(reads, files)
    assert server.stats.max_in_flight >= 8
    assert elapsed < 32 * 0.2 / 4, elapsed  # one after another would take 6.4 s


def test_http_sizes_and_absent_keys(served):
    server, src, files = served
    missing = Read("c/0.0", 0, np.full(8, 7, np.uint8))
    present = Read("a.bin", 10, np.zeros(8, np.uint8))
    src.fetch([missing, present])
    assert not missing.found and (missing.out == 7).all()  # left as it was
    assert present.found and present.out.tobytes() == files["a.bin"][10:18]
    with pytest.raises(CorruptTraceError, match="larger than the limit of 1000 bytes"):
        src.get("a.bin", 1000)


def test_http_whole_object_checks(served):
    _, src, files = served
    size = len(files["a.bin"])
    ok = Read("a.bin", size - 100, np.zeros(100, np.uint8), whole=size)
    src.fetch([ok])
    assert ok.out.tobytes() == files["a.bin"][-100:]
    with pytest.raises(CorruptTraceError, match=r"a\.bin has .* expected 299999"):
        src.fetch([Read("a.bin", size - 100 - 1, np.zeros(100, np.uint8), whole=size - 1)])
    with pytest.raises(CorruptTraceError, match=r"a\.bin has 300000 bytes, expected 300100"):
        src.fetch([Read("a.bin", size, np.zeros(100, np.uint8), whole=size + 100)])
    with pytest.raises(CorruptTraceError, match="truncated"):
        src.fetch([Read("a.bin", size - 10, np.zeros(20, np.uint8))])


@pytest.mark.parametrize("fault", [("status", 503), ("status", 500), ("status", 429),
                                   ("truncate", 0), ("reset", 0)])
def test_http_transient_faults_are_retried(served, fault):
    server, src, files = served
    kind, status = fault
    server.inject(kind, match="*/a.bin", times=2, status=status)
    start = time.perf_counter()
    reads = [Read("a.bin", 0, np.zeros(300_000, np.uint8), 300_000),
             Read("sub/b.bin", 5, np.zeros(50, np.uint8))]
    src.fetch(reads)
    _check(reads, files)
    assert time.perf_counter() - start < 5
    assert sum(1 for r in server.stats.requests if r.path.endswith("a.bin")) >= 3


@pytest.mark.parametrize("fault,words", [(("status", 500), "HTTP 500 after 4 tries"),
                                         (("status", 503), "HTTP 503 after 4 tries"),
                                         (("truncate", 0), "truncated"),
                                         (("reset", 0), "connection reset")])
def test_http_persistent_faults_end_in_one_line(served, fault, words):
    server, src, _ = served
    server.inject(fault[0], match="*/a.bin", times=1000, status=fault[1])
    start = time.perf_counter()
    with pytest.raises(RemoteError) as err:
        src.fetch([Read("a.bin", 0, np.zeros(1000, np.uint8))])
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message and not isinstance(err.value, RemoteAccessError)
    assert message.startswith(f"{server.url}/t.zarr/a.bin: ") and words in message


@pytest.mark.parametrize("status", [401, 403])
def test_http_access_denied(served, status):
    server, src, _ = served
    server.inject("status", times=10, status=status)
    with pytest.raises(RemoteAccessError, match=rf"access denied \(HTTP {status}\)"):
        src.get("zarr.json", 1000)
    assert server.stats.count == 1  # not retried


def test_http_read_timeout_is_bounded(http_server):
    _files(http_server.root)
    src = open_remote(http_server.url, {"read_timeout": 0.3, "retries": 2})
    http_server.inject("delay", times=10, seconds=5)
    start = time.perf_counter()
    with pytest.raises(RemoteError, match=r"timed out \(connect 10 s, read 0\.3 s\) after 2 "):
        src.get("a.bin", 1 << 20)
    assert time.perf_counter() - start < 3


def test_http_connection_refused_is_bounded():
    from servers import free_port

    src = open_remote(f"http://127.0.0.1:{free_port()}/t.zarr", connect_timeout=1)
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="connection refused after 4 tries"):
        src.get("zarr.json", 1000)
    assert time.perf_counter() - start < 5


def test_credentials_never_appear_in_messages(http_server):
    files = _files(http_server.root / "t")
    secrets = ("bob", "hunter22secret", "SIGNATURE123", "BearerXYZ789")
    url = (f"http://bob:hunter22secret@127.0.0.1:{http_server.port}/t"
           "?X-Amz-Signature=SIGNATURE123")
    src = open_remote(url, {"headers": {"X-Api-Key": "BearerXYZ789"}})
    assert src.get("a.bin", 1 << 20) == files["a.bin"]  # the URL still works as given
    assert src.location == f"http://127.0.0.1:{http_server.port}/t"
    http_server.inject("status", times=100, status=503)
    with pytest.raises(RemoteError) as err:
        src.get("a.bin", 1 << 20)
    http_server.clear_faults()
    http_server.inject("status", times=1, status=403)
    with pytest.raises(RemoteAccessError) as denied:
        src.get("a.bin", 1 << 20)
    for text in (str(err.value), str(denied.value), src.location, src.describe("x")):
        assert not any(s in text for s in secrets), text


def test_a_server_that_ignores_ranges(served):
    server, src, files = served
    server.ignore_ranges = True
    reads = _random_reads(files, 10)
    src.fetch(reads)
    _check(reads, files)
    assert src.size("a.bin") == 300_000 and src.get("zarr.json", 100) == files["zarr.json"]


def test_single_file_trace_is_the_empty_key(http_server):
    data = _payload(200_000, 5)
    (http_server.root / "t.h5").write_bytes(data)
    src = open_remote(f"{http_server.url}/t.h5")
    assert src.size("") == len(data) and src.get("", 1 << 20) == data
    f = src.open_file("")
    f.seek(123_456)
    assert f.read(1000) == data[123_456:124_456]


# -- the on-disk cache ------------------------------------------------------------------------


def test_cache_makes_a_second_fetch_free_and_stays_bounded(http_server, tmp_path):
    files = _files(http_server.root / "t")
    cache = tmp_path / "cache"
    reads = _random_reads(files, 40)
    with open_remote(f"{http_server.url}/t", cache_dir=str(cache)) as src:
        src.fetch(reads)
    first = http_server.reset_stats().count
    assert first == len(reads)
    again = _random_reads(files, 40)  # the same ranges, fresh buffers, a new source
    with open_remote(f"{http_server.url}/t", cache_dir=str(cache)) as src:
        src.fetch(again)
    _check(again, files)
    assert http_server.reset_stats().count == 0

    # a corrupt entry is dropped and read again, never trusted
    name = RangeCache.entry_name(f"{http_server.url}/t", "a.bin", 0, 300_001, 300_000)
    entry = cache / name[:2] / name  # the whole of a.bin (a range read once)
    entry.write_bytes(entry.read_bytes()[:-3] + b"XYZ")
    with open_remote(f"{http_server.url}/t", cache_dir=str(cache)) as src:
        src.fetch(third := _random_reads(files, 40))
    _check(third, files)
    assert http_server.reset_stats().count == 1

    limit = 64 * 1024
    small = tmp_path / "small"
    with open_remote(f"{http_server.url}/t", cache_dir=str(small), cache_bytes=limit) as src:
        for seed in range(6):
            src.fetch(reads := _random_reads(files, 20, seed=seed, max_len=8000)[:20])
            _check(reads, files)
    stored = sum(p.stat().st_size for p in small.glob("*/*") if p.is_file())
    assert 0 < stored <= limit


def test_cache_shared_by_processes(http_server, tmp_path):
    files = _files(http_server.root / "t")
    cache = tmp_path / "shared"
    code = """
import sys, numpy as np
from tracekit.storage._remote import open_remote
from tracekit.storage._remote_cache import RangeCache
from tracekit.storage._source import Read
url, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)
reads = [Read("a.bin", int(o), np.empty(5000, np.uint8)) for o in rng.integers(0, 290000, 60)]
with open_remote(url, cache_dir=cache, cache_bytes=400_000) as src:
    for _ in range(3):
        src.fetch(reads)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{http_server.url}/t", str(cache),
                               str(seed)]) for seed in (0, 1)]
    assert [p.wait(120) for p in procs] == [0, 0]
    stored = [p for p in cache.glob("*/*") if p.is_file()]  # entries, by hash prefix
    assert not [p for p in stored if p.name.startswith(".")]  # no temporary file left
    assert 0 < sum(p.stat().st_size for p in stored) <= 400_000
    reads = [Read("a.bin", int(o), np.empty(5000, np.uint8))
             for o in np.random.default_rng(1).integers(0, 290000, 60)]
    http_server.reset_stats()
    with open_remote(f"{http_server.url}/t", cache_dir=str(cache), cache_bytes=400_000) as src:
        src.fetch(reads)
    _check(reads, files)
    assert http_server.stats.count < 60  # the last process's entries are there


# -- S3 (moto) through the fault/latency proxy --------------------------------------------------


@pytest.fixture
def bucket(s3_proxy, s3, tmp_path):
    pytest.importorskip("s3fs")
    files = _files(tmp_path / "local")
    client = s3.client()
    client.create_bucket(Bucket="traces")
    for key, data in files.items():
        client.put_object(Bucket="traces", Key=f"t.zarr/{key}", Body=data)
    return s3_proxy, files


def test_s3_bytes_match_lists_and_absent_keys(bucket):
    proxy, files = bucket
    src = open_remote("s3://traces/t.zarr")
    assert src.location == "s3://traces/t.zarr"
    assert src.get("a.bin", 1 << 20) == files["a.bin"] and src.get("nope", 10) is None
    assert src.get("empty", 10) == b""
    assert src.sizes(["a.bin", "sub/b.bin", "nope"]) == [300_000, 70_000, None]
    assert src.list() == ["a.bin", "empty", "sub", "zarr.json"]
    assert src.list("sub") == ["b.bin"] and src.list("nothing") == []
    reads = _random_reads(files, 40)
    missing = Read("c/9", 0, np.zeros(4, np.uint8))
    proxy.reset_stats()
    src.fetch([*reads, missing])
    _check(reads, files)
    assert not missing.found
    stats = proxy.reset_stats()
    asked = sum(r.out.nbytes for r in reads)
    assert stats.count == len(reads) + 1
    assert asked <= stats.bytes_sent <= asked + len(reads) + 1000  # + the 404's error document


def test_s3_reads_of_one_fetch_overlap(bucket):
    proxy, files = bucket
    src = open_remote("s3://traces/t.zarr")
    src.get("zarr.json", 1000)  # connect first
    proxy.latency = 0.1
    reads = _random_reads(files, 32, max_len=4000)[:32]
    start = time.perf_counter()
    src.fetch(reads)
    elapsed = time.perf_counter() - start
    _check(reads, files)
    assert proxy.stats.max_in_flight >= 8
    assert elapsed < 32 * 0.1 / 2, elapsed  # one after another: over 3.2 s


def test_s3_faults(bucket):
    proxy, files = bucket
    src = open_remote("s3://traces/t.zarr", {"key": "AKIAFAKEKEYID", "secret": "s3cr3tValue99"})
    proxy.inject("status", match="*/a.bin", times=2, status=503)
    assert src.get("a.bin", 1 << 20) == files["a.bin"]
    proxy.inject("truncate", match="*/a.bin", times=1)
    assert src.get("a.bin", 1 << 20) == files["a.bin"]
    proxy.inject("status", times=1, status=403)
    start = time.perf_counter()
    with pytest.raises(RemoteAccessError) as err:
        src.get("a.bin", 1 << 20)
    message = str(err.value)
    assert message.startswith("s3://traces/t.zarr/a.bin: access denied (HTTP 403")
    assert "AWS_PROFILE" in message and time.perf_counter() - start < 5
    assert "AKIAFAKEKEYID" not in message and "s3cr3tValue99" not in message
    proxy.inject("status", times=100, status=500)
    with pytest.raises(RemoteError, match=r"a\.bin: HTTP 500 InternalError after 4 tries"):
        src.get("a.bin", 1 << 20)


def test_s3_missing_credentials(bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    src = open_remote("s3://traces/t.zarr")
    start = time.perf_counter()
    with pytest.raises(RemoteAccessError, match="no usable credentials: check AWS_PROFILE"):
        src.get("zarr.json", 1000)
    assert time.perf_counter() - start < 10


# -- other fsspec filesystems and the packages ------------------------------------------------


def test_a_synchronous_fsspec_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    files = {"a.bin": _payload(50_000, 7), "sub/b.bin": _payload(9_000, 8)}
    for key, data in files.items():
        fs.pipe(f"/remote-test/t.zarr/{key}", data)
    try:
        src = open_remote("memory://remote-test/t.zarr")
        assert src.get("a.bin", 1 << 20) == files["a.bin"] and src.get("x", 5) is None
        assert src.list() == ["a.bin", "sub"] and src.size("sub/b.bin") == 9_000
        reads = _random_reads(files, 30)
        src.fetch(reads)
        _check(reads, files)
        src.close()
    finally:
        fs.rm("/remote-test", recursive=True)


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(TraceError, match=r"pip install 'tracekit\[remote\]'"):
        open_remote("s3://bucket/t.zarr")


def test_import_tracekit_loads_no_remote_package():
    code = ("import sys, tracekit, tracekit.storage._remote; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fsspec', 's3fs', 'aiohttp', 'botocore')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
