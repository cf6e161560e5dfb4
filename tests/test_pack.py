"""Packs: a zarr trace as one stored zip (``tracekit pack``/``unpack``), read through
:class:`ZipSource` and by zarr-python's ZipStore, and hostile zips refused in one line."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tracegen
import zarr
from click.testing import CliRunner

from tracekit.cli import main
from tracekit.errors import CorruptTraceError
from tracekit.pack import pack, unpack
from tracekit.storage._source import LocalDirSource, LocalFileSource, Read
from tracekit.storage._zip import ZipSource, detect

DEMO = Path(__file__).parent.parent / "sample_traces" / "demo_fibonacci.zarr"


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its '/'-separated relative path, with its bytes."""
    out = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "t.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=11)
    return path


@pytest.fixture(params=["synthetic", "demo"])
def trace(request: pytest.FixtureRequest, synthetic: Path) -> Path:
    return synthetic if request.param == "synthetic" else DEMO


# -- round trip ------------------------------------------------------------------------------
@pytest.mark.parametrize("align", [0, 4096])
def test_pack_unpack_is_bit_exact(trace: Path, tmp_path: Path, align: int) -> None:
    result = pack(trace, tmp_path / "t.zip", align=align)
    assert result.status == "complete" and not result.zip64
    assert result.bytes == (tmp_path / "t.zip").stat().st_size
    unpack(tmp_path / "t.zip", tmp_path / "back.zarr")
    original, restored = _files(trace), _files(tmp_path / "back.zarr")
    assert sorted(restored) == sorted(original)
    assert all(restored[k] == original[k] for k in original)
    assert result.files == len(original)
    names = zipfile.ZipFile(tmp_path / "t.zip").namelist()
    assert names[-1] == "zarr.json" and sorted(names) == sorted(original)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_aligned_pack_starts_every_entry_on_a_page(synthetic: Path, tmp_path: Path) -> None:
    pack(synthetic, tmp_path / "t.zip", align=4096)
    with zipfile.ZipFile(tmp_path / "t.zip") as z, open(tmp_path / "t.zip", "rb") as f:
        assert z.testzip() is None
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            n_name, n_extra = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + n_name + n_extra) % 4096 == 0, info.filename


def test_zarr_zipstore_reads_the_pack(trace: Path, tmp_path: Path) -> None:
    pack(trace, tmp_path / "t.zip")
    folder = zarr.open_group(str(trace), mode="r", use_consolidated=True)
    packed = zarr.open_group(zarr.storage.ZipStore(tmp_path / "t.zip", mode="r"), mode="r",
                             use_consolidated=True)
    assert packed.attrs.asdict() == folder.attrs.asdict()
    names = sorted(folder.array_keys())
    assert sorted(packed.array_keys()) == names and len(names) > 10
    for name in names:
        a, b = folder[name][...], packed[name][...]
        assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_zipsource_serves_what_the_folder_does(trace: Path, tmp_path: Path) -> None:
    pack(trace, tmp_path / "t.zip")
    folder = LocalDirSource(trace)
    rng = np.random.default_rng(0)
    with ZipSource(LocalFileSource(tmp_path / "t.zip")) as packed:
        assert packed.get("zarr.json", 1 << 20) == folder.get("zarr.json", 1 << 20)
        assert packed.get("nothing", 10) is None and packed.size("nothing") is None
        keys = sorted(_files(trace))
        assert sorted(packed.names()) == keys
        for prefix in {"", *(k.rsplit("/", 1)[0] for k in keys if "/" in k)}:
            assert packed.list(prefix) == folder.list(prefix), prefix
        reads_p, reads_f = [], []
        for key in keys:
            size = folder.size(key)
            assert packed.size(key) == size, key
            lo = int(rng.integers(0, size))
            hi = int(rng.integers(lo, size + 1))
            reads_p.append(Read(key, lo, np.zeros(hi - lo, np.uint8)))
            reads_f.append(Read(key, lo, np.zeros(hi - lo, np.uint8)))
        reads_p.append(Read("residual/c.999", 0, np.zeros(3, np.uint8)))
        packed.fetch(reads_p)
        folder.fetch(reads_f)
        assert not reads_p[-1].found
        for p, f in zip(reads_p, reads_f, strict=False):
            assert p.found and np.array_equal(p.out, f.out), p.key
        key = keys[0]
        with pytest.raises(CorruptTraceError, match="expected 1 "):
            packed.fetch([Read(key, 0, np.zeros(1, np.uint8), whole=1)])
        with pytest.raises(CorruptTraceError, match="truncated"):
            packed.fetch([Read(key, folder.size(key), np.zeros(1, np.uint8))])
        with pytest.raises(CorruptTraceError, match="larger than the limit of 10 bytes"):
            packed.get("zarr.json", 10)


def test_zipsource_reads_a_directory_larger_than_its_first_read(
        synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracekit.storage._zip as zipmod

    monkeypatch.setattr(zipmod, "TAIL_BYTES", 100)
    pack(synthetic, tmp_path / "t.zip")
    with ZipSource(LocalFileSource(tmp_path / "t.zip")) as packed:
        assert packed.get("zarr.json", 1 << 20) == (synthetic / "zarr.json").read_bytes()
        assert sorted(packed.names()) == sorted(_files(synthetic))


# -- ZIP64 -------------------------------------------------------------------------------------
def test_zip64_pack_is_read_by_everyone(synthetic: Path, tmp_path: Path) -> None:
    result = pack(synthetic, tmp_path / "t.zip", zip64_limit=1)  # every size and offset wide
    assert result.zip64
    with zipfile.ZipFile(tmp_path / "t.zip") as z:
        assert z.testzip() is None
    tail = (tmp_path / "t.zip").read_bytes()[-22 - 20 - 56:]
    assert tail.startswith(b"PK\x06\x06") and tail[56:60] == b"PK\x06\x07"
    with ZipSource(LocalFileSource(tmp_path / "t.zip")) as packed:
        for key, data in _files(synthetic).items():
            assert packed.get(key, 1 << 20) == data, key
    unpack(tmp_path / "t.zip", tmp_path / "back.zarr")
    assert _files(tmp_path / "back.zarr") == _files(synthetic)
    group = zarr.open_group(zarr.storage.ZipStore(tmp_path / "t.zip", mode="r"), mode="r",
                            use_consolidated=True)
    assert np.array_equal(group["residual"][...],
                          zarr.open_group(str(synthetic), mode="r")["residual"][...])


@pytest.mark.parametrize("n", [65_534, 66_000])  # 65535 entries: the classic record's maximum
def test_zip64_more_than_65535_entries(tmp_path: Path, n: int) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(n):
            z.writestr(f"a/c.{i}", struct.pack("<I", i))
        z.writestr("zarr.json", b"{}")
    assert (path.read_bytes()[-22 - 20: -22 - 16] == b"PK\x06\x07") == (n > 65_534)
    with ZipSource(LocalFileSource(path)) as packed:
        assert len(packed.names()) == n + 1 and len(packed.list("a")) == n
        reads = [Read(f"a/c.{i}", 0, np.zeros(4, np.uint8)) for i in (0, 65_533, n - 1)]
        packed.fetch(reads)
        assert [int(r.out.view("<u4")[0]) for r in reads] == [0, 65_533, n - 1]


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


# -- what pack copies --------------------------------------------------------------------------
def test_pack_skips_hidden_temporaries_and_refuses_links(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "t.zarr"
    shutil.copytree(synthetic, copy)
    (copy / ".zarr.json.123.partial").write_text("{")
    result = pack(copy, tmp_path / "t.zip")
    assert result.skipped == [".zarr.json.123.partial"]
    assert ".zarr.json.123.partial" not in zipfile.ZipFile(tmp_path / "t.zip").namelist()
    (copy / "residual" / "c.9.9.9").symlink_to("/etc/passwd")
    with pytest.raises(CorruptTraceError, match="residual/c.9.9.9 is a symbolic link"):
        pack(copy, tmp_path / "u.zip")
    assert not (tmp_path / "u.zip").exists()


def test_pack_reports_progress(tmp_path: Path) -> None:
    path = tmp_path / "big.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(max_positions=300), seed=2)
    seen: list[tuple[int, int]] = []
    pack(path, tmp_path / "t.zip", progress=lambda done, total: seen.append((done, total)))
    total = sum(len(b) for b in _files(path).values())
    assert len(seen) > 100 and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_pack_and_unpack(synthetic: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "t.zip"
    result = runner.invoke(main, ["pack", str(synthetic), str(out)])
    assert result.exit_code == 0, result.output
    size = out.stat().st_size
    from tracekit._cliutil import human_bytes

    n = len(_files(synthetic))
    assert result.output == f"wrote {out} ({human_bytes(size)}, {n} files)\n"
    result = runner.invoke(main, ["pack", str(synthetic), str(out)])
    assert result.exit_code == 1
    assert result.output == f"Error: {out} already exists (use --force to replace it)\n"
    assert runner.invoke(main, ["pack", str(synthetic), str(out), "--force"]).exit_code == 0

    back = tmp_path / "back.zarr"
    result = runner.invoke(main, ["unpack", str(out), str(back)])
    assert result.exit_code == 0 and result.output == f"wrote {back}\n"
    assert _files(back) == _files(synthetic)
    result = runner.invoke(main, ["unpack", str(out), str(back)])
    assert result.exit_code == 1
    assert result.output == f"Error: {back} already exists (use --force to replace it)\n"
    (back / "residual" / "c.0.0.0").write_bytes(b"spoiled")
    assert runner.invoke(main, ["unpack", str(out), str(back), "--force"]).exit_code == 0
    assert _files(back) == _files(synthetic)
    # --force replaces a folder with a pack and a file with a folder
    assert runner.invoke(main, ["pack", str(synthetic), str(back), "--force"]).exit_code == 0
    assert back.is_file() and back.read_bytes() == out.read_bytes()
    assert runner.invoke(main, ["unpack", str(out), str(back), "--force"]).exit_code == 0
    assert _files(back) == _files(synthetic)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.zarr", "t.zip"]


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    h5 = DEMO.with_suffix(".h5")
    result = runner.invoke(main, ["pack", str(h5), str(tmp_path / "x.zip")])
    assert result.exit_code == 1
    assert result.output == (f"Error: {h5} is an HDF5 trace, already one file: share it as it "
                             f"is (a pack holds a zarr trace)\n")
    result = runner.invoke(main, ["unpack", str(h5), str(tmp_path / "x.zarr")])
    assert result.output == f"Error: {h5} is not a pack (no zip signature)\n"
    bad = _patched(tmp_path, lambda d: d.__delitem__(slice(len(d) - 10, None)))
    result = runner.invoke(main, ["unpack", str(bad), str(tmp_path / "x.zarr")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no end-of-central-directory record" in result.output
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zip").exists()


def test_cli_packs_an_unfinished_trace_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=3, n_positions=7,
                             status="aborted")
    result = CliRunner().invoke(main, ["pack", str(path), str(tmp_path / "a.zip")])
    assert result.exit_code == 0
    assert (f"warning: {path} is not complete (status aborted): the pack holds what was "
            f"written so far\n") in result.output
    assert (tmp_path / "a.zip").exists()


def test_cli_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "big.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(max_positions=300), seed=2)
    result = CliRunner().invoke(main, ["pack", str(path), str(tmp_path / "t.zip")],
                                env={"FORCE_COLOR": "1", "TTY_INTERACTIVE": "1"})
    assert result.exit_code == 0
    assert "packing" in result.output


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
