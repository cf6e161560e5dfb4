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
from tracekit.storage._zip import ZipSource

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
    bad = tmp_path / "bad.zip"
    pack(DEMO, bad)
    bad.write_bytes(bad.read_bytes()[:-10])  # its end record cut
    result = runner.invoke(main, ["unpack", str(bad), str(tmp_path / "x.zarr")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no end-of-central-directory record" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


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
