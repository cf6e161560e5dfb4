"""ZipSource against hostile zips (each refused with one line), and what opening and reading
a pack costs in ranged reads of the underlying object."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tracegen

from tracekit.errors import CorruptTraceError
from tracekit.pack import pack, unpack
from tracekit.storage._source import LocalFileSource, Read
from tracekit.storage._zip import ZipSource, detect


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=11)
    return path


# -- hostile zips ------------------------------------------------------------------------------
def _zip(tmp_path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED
         ) -> Path:
    path = tmp_path / "h.zip"
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def _central(data: bytearray) -> list[int]:
    """Offsets of the central directory records."""
    cd = struct.unpack_from("<I", data, len(data) - 6)[0]
    out = []
    while data[cd:cd + 4] == b"PK\x01\x02":
        out.append(cd)
        n, e, c = struct.unpack_from("<HHH", data, cd + 28)
        cd += 46 + n + e + c
    return out


GOOD = [("zarr.json", b'{"zarr_format": 3}'), ("a/c.0", bytes(range(200)))]


def _patched(tmp_path: Path, patch) -> Path:
    path = _zip(tmp_path, GOOD)
    data = bytearray(path.read_bytes())
    patch(data)
    path.write_bytes(bytes(data))
    return path


def _put(data: bytearray, at: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, at, value)


def _raw(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "x.zip").write_bytes(data)
    return tmp_path / "x.zip"


def _eocd(data: bytearray) -> int:
    return len(data) - 22


HOSTILE = {
    "compressed": (lambda p: _zip(p, [("zarr.json", b"x" * 1000)], zipfile.ZIP_DEFLATED),
                   "is compressed"),
    "encrypted": (lambda p: _patched(p, lambda d: [_put(d, c + 8, "<H", 1) for c in _central(d)]),
                  "is encrypted"),
    "dotdot": (lambda p: _zip(p, [("a/../../etc/passwd", b"x")]), "unsafe entry name"),
    "absolute": (lambda p: _zip(p, [("/etc/passwd", b"x")]), "unsafe entry name"),
    "backslash": (lambda p: _zip(p, [("a\\..\\x", b"x")]), "unsafe entry name"),
    "duplicate": (lambda p: _zip(p, [("zarr.json", b"1"), ("zarr.json", b"2")]),
                  "appears twice"),
    "overlap": (lambda p: _patched(p, lambda d: _put(d, _central(d)[1] + 42, "<I", 0)),
                "overlaps the next entry"),
    "offset past the end": (lambda p: _patched(
        p, lambda d: _put(d, _central(d)[1] + 42, "<I", 10**9)), "lies past the end"),
    "bomb": (lambda p: _patched(p, lambda d: [_put(d, _central(d)[0] + o, "<I", 4 * 10**9)
                                              for o in (20, 24)]), "overlaps the next entry"),
    "directory past the end": (lambda p: _patched(
        p, lambda d: _put(d, _eocd(d) + 16, "<I", 10**9)), "does not end where"),
    "directory too large": (lambda p: _patched(
        p, lambda d: [_put(d, _eocd(d) + o, "<H", 60_000) for o in (8, 10)]),
        "more than this file could hold"),
    "truncated": (lambda p: _patched(p, lambda d: d.__delitem__(slice(len(d) // 2, None))),
                  "no end-of-central-directory record"),
    "not a zip": (lambda p: _raw(p, b"hello" * 100), "no end-of-central-directory record"),
    "tiny": (lambda p: _raw(p, b"PK"), "too short"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_zip_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    path = make(tmp_path)
    with (pytest.raises(CorruptTraceError, match=message) as info,
          ZipSource(LocalFileSource(path)) as packed):
        packed.get("zarr.json", 1 << 20)
    assert "\n" not in str(info.value) and len(str(info.value)) <= 300


def test_local_header_that_contradicts_the_directory(tmp_path: Path) -> None:
    path = _patched(tmp_path, lambda d: d.__setitem__(slice(30, 39), b"zarr.JSON"))
    with (ZipSource(LocalFileSource(path)) as packed,  # the directory alone looks fine
          pytest.raises(CorruptTraceError, match="local header does not match")):
        packed.get("zarr.json", 1 << 20)


def test_corrupt_byte_fails_the_crc(tmp_path: Path, synthetic: Path) -> None:
    pack(synthetic, tmp_path / "t.zip")
    data = bytearray((tmp_path / "t.zip").read_bytes())
    at = zipfile.ZipFile(tmp_path / "t.zip").getinfo("zarr.json").header_offset + 30 + 9 + 5
    data[at] ^= 1
    (tmp_path / "t.zip").write_bytes(bytes(data))
    with (ZipSource(LocalFileSource(tmp_path / "t.zip")) as packed,
          pytest.raises(CorruptTraceError, match="t.zip/zarr.json fails its CRC-32")):
        packed.get("zarr.json", 1 << 20)
    with pytest.raises(CorruptTraceError, match="zarr.json fails its CRC-32"):
        unpack(tmp_path / "t.zip", tmp_path / "back.zarr")
    assert not (tmp_path / "back.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_detect() -> None:
    assert detect(b"PK\x03\x04rest") and not detect(b"\x89HDF\r\n\x1a\n") and not detect(b"")


class _CountingSource(LocalFileSource):
    """A local file source that records the ranged reads asked of it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def fetch(self, reads) -> None:
        self.batches.append(len(reads))
        super().fetch(reads)


def test_open_is_one_ranged_read_and_each_batch_two(synthetic: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What a remote pack costs in requests: the tail once, then per fetch the local headers
    not yet seen (one batch) and the data (one batch)."""
    import tracekit.storage._zip as zipmod

    pack(synthetic, tmp_path / "t.zip")
    inner = _CountingSource(tmp_path / "t.zip")
    packed = ZipSource(inner)
    assert inner.batches == [1]
    keys = [k for k in packed.names() if k.startswith("residual/c.")]
    packed.fetch([Read(k, 0, np.empty(packed.size(k), np.uint8)) for k in keys])
    assert inner.batches == [1, len(keys), len(keys)]
    packed.fetch([Read(keys[0], 0, np.empty(4, np.uint8))])  # header known: data only
    assert inner.batches == [1, len(keys), len(keys), 1]
    monkeypatch.setattr(zipmod, "TAIL_BYTES", 100)
    inner = _CountingSource(tmp_path / "t.zip")
    ZipSource(inner)
    assert inner.batches == [1, 1]  # the directory did not fit in the tail: one more read


def test_folder_entries_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "f.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.mkdir("a")
        z.writestr("a/c.0", b"abc")
        z.writestr("zarr.json", b"{}")
    with ZipSource(LocalFileSource(path)) as packed:
        assert packed.names() == ["a/c.0", "zarr.json"] and packed.list("") == ["a", "zarr.json"]
        assert packed.size("a") is None and packed.list("a") == ["c.0"]


def test_zip64_locator_past_the_end_is_refused(synthetic: Path, tmp_path: Path) -> None:
    pack(synthetic, tmp_path / "t.zip", zip64_limit=1)
    data = bytearray((tmp_path / "t.zip").read_bytes())
    struct.pack_into("<Q", data, len(data) - 22 - 20 + 8, 10**12)
    (tmp_path / "t.zip").write_bytes(bytes(data))
    with pytest.raises(CorruptTraceError, match="ZIP64 end record lies past its locator"):
        ZipSource(LocalFileSource(tmp_path / "t.zip"))
