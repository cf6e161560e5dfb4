"""A corpus of broken and hostile traces, built from a valid one at test time.

Each :class:`Case` damages a fresh copy of a valid zarr or HDF5 trace (or makes a file that is
no trace at all) and says what a reader must answer: a specific :class:`TraceError` subclass
from ``tracekit.open`` or from reading, or a ``validate`` problem. Nothing binary is committed;
``python tests/corruption.py OUT`` writes the corpus to a folder for manual fuzzing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import h5py
import numpy as np
from tracegen import chunk_files

from tracekit.errors import (
    CorruptTraceError,
    DisallowedCodecError,
    MetadataError,
    MissingArrayError,
    NotATraceError,
    TraceError,
    VersionError,
)
from tracekit.storage._hdf5 import _superblock_end

#: A folder that the pickle payload creates if anything ever unpickles it.
PWNED = "pwned-by-pickle"


@dataclass(frozen=True)
class Case:
    """One corrupted input and what a reader must say about it.

    ``error``: the TraceError subclass ``tracekit.open`` or reading must raise, whose message
    matches ``match``; ``None`` when the damage is only visible to ``validate`` (then
    ``match`` must match one of its problems) or, with ``warns``, when it must open with a
    warning and read back exactly."""

    name: str
    source: str  # "zarr", "hdf5" or "none" (no trace needed)
    damage: Callable[[Path], Path]
    error: type[TraceError] | None
    match: str = ""
    warns: bool = False


class _Payload:
    """Unpickling this marks the file system: proof that something unpickled hostile data."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(str(marker)))


# -- helpers --------------------------------------------------------------------------------
def edit_json(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Change a JSON file in place (``edit`` mutates the object; its result is ignored)."""
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def edit_meta(trace: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Change the tracekit metadata of a zarr trace in place."""
    edit_json(trace / "zarr.json", lambda root: edit(root["attributes"]["tracekit"]))


def edit_array_json(trace: Path, name: str, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Change an array's zarr.json, and its copy in the consolidated root metadata."""
    edit_json(trace / name / "zarr.json", edit)

    def apply(root: dict[str, Any]) -> None:
        consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        if name in consolidated:
            edit(consolidated[name])
    edit_json(trace / "zarr.json", apply)


def set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[key]
    obj[last] = value


def del_path(obj: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[key]
    del obj[last]


def h5_meta(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["tracekit"])


def h5_set_meta(path: Path, meta: dict[str, Any] | str | bytes, **create: Any) -> None:
    with h5py.File(path, "r+") as f:
        del f.attrs["tracekit"]
        text = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
        f.attrs.create("tracekit", text, **create)


def flip_bits(path: Path, offsets: list[int]) -> None:
    with open(path, "r+b") as fh:
        for off in offsets:
            fh.seek(off)
            byte = fh.read(1)[0]
            fh.seek(off)
            fh.write(bytes([byte ^ 0x10]))


def write_chunk(path: Path, body: bytes) -> None:
    """Store ``body`` as a zarr chunk with a matching crc32c (zarr's codec: 4 bytes
    little-endian after the data), so that what is tested is what lies behind the checksum."""
    path.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))


def edit_chunk(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a zarr chunk's data and give it the checksum that matches."""
    body = bytearray(path.read_bytes()[:-4])
    body[offset: offset + len(data)] = data
    write_chunk(path, bytes(body))


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


# -- zarr cases -----------------------------------------------------------------------------
def _z(name: str, error: type[TraceError] | None, match: str = "", warns: bool = False):
    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def damage(trace: Path) -> Path:
            fn(trace)
            return trace
        ZARR_CASES.append(Case(f"zarr-{name}", "zarr", damage, error, match, warns))
        return fn
    return register


ZARR_CASES: list[Case] = []


@_z("root-json-missing", NotATraceError, "without zarr.json")
def _(t: Path) -> None:
    (t / "zarr.json").unlink()


@_z("root-json-garbage", MetadataError, "not valid JSON")
def _(t: Path) -> None:
    (t / "zarr.json").write_bytes(bytes(range(256)) * 4)


@_z("root-json-empty", MetadataError, "not valid JSON")
def _(t: Path) -> None:
    (t / "zarr.json").write_bytes(b"")


@_z("root-json-truncated", MetadataError, "not valid JSON")
def _(t: Path) -> None:
    raw = (t / "zarr.json").read_bytes()
    (t / "zarr.json").write_bytes(raw[: len(raw) // 2])


@_z("root-json-not-object", MetadataError, "not a JSON object")
def _(t: Path) -> None:
    (t / "zarr.json").write_text("[1, 2, 3]")


@_z("root-json-deeply-nested", MetadataError, "JSON")
def _(t: Path) -> None:
    (t / "zarr.json").write_text("[" * 200_000 + "]" * 200_000)


@_z("root-json-huge", MetadataError, "limit")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r["attributes"].update(pad="x" * (2 << 20)))


@_z("root-is-zarr-v2", NotATraceError, "zarr v3")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r.update(zarr_format=2))


@_z("root-is-an-array", NotATraceError, "zarr v3 group")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r.update(node_type="array"))


@_z("consolidated-shape-disagrees", None, "consolidated metadata disagrees .* on shape")
def _(t: Path) -> None:
    # Only the copy xarray reads is changed: tracekit reads the array's own zarr.json.
    def apply(root: dict[str, Any]) -> None:
        root["consolidated_metadata"]["metadata"]["residual"]["shape"][0] += 5
    edit_json(t / "zarr.json", apply)


@_z("consolidated-array-missing", None, "missing from the consolidated metadata")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r["consolidated_metadata"]["metadata"].pop("mlp_out"))


@_z("consolidated-entry-not-an-object", None, "residual.*consolidated metadata is not an")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r["consolidated_metadata"]["metadata"].update(
        residual="a string"))


@_z("root-attributes-not-an-object", NotATraceError, "tracekit")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r.update(attributes="a string"))


@_z("metadata-missing", NotATraceError, "tracekit")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r["attributes"].pop("tracekit"))


@_z("metadata-not-object", NotATraceError, "tracekit")
def _(t: Path) -> None:
    edit_json(t / "zarr.json", lambda r: r["attributes"].update(tracekit="a string"))


@_z("metadata-without-model", MetadataError, "model")
def _(t: Path) -> None:
    edit_meta(t, lambda m: del_path(m, "model"))


@_z("metadata-wrong-type", MetadataError, "n_layers")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "model.n_layers", "three"))


@_z("metadata-other-schema", MetadataError, "schema")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "schema", "someone.else"))


@_z("metadata-bad-status", MetadataError, "status")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "status", "done"))


@_z("version-garbage", MetadataError, "version")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", "one"))


@_z("version-number-not-string", MetadataError, "version")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", 1.0))


@_z("version-higher-major", VersionError, r"2\.0.*1\.1")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", "2.0"))


@_z("version-lower-major", VersionError, r"0\.9.*1\.1")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", "0.9"))


@_z("version-huge-major", VersionError, "999999")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", "999999.0"))


@_z("version-higher-minor", None, warns=True)
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "version", "1.7"))


@_z("version-higher-minor-unknown-keys", None, warns=True)
def _(t: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["version"] = "1.3"
        m["provenance"] = {"added": "in 1.3"}
        m["model"]["rope_theta"] = 10000.0
    edit_meta(t, edit)


@_z("same-minor-unknown-key", MetadataError, "provenance")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "provenance", "not in 1.0"))


@_z("absurd-max-positions", MetadataError, "max_positions")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "capture.max_positions", 2**40))


@_z("absurd-layer-count", MetadataError, "n_layers")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "model.n_layers", 10**9))


@_z("layers-disagree-with-points", MetadataError, "points")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "capture.points", [0, 1]))


@_z("layer-beyond-model", MetadataError, "layers")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "capture.layers", [0, 1, 7]))


@_z("length-disagrees-with-commit", CorruptTraceError, "commit counter")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "length.positions", 3))


@_z("commit-counter-absurd", CorruptTraceError, "impossible")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "status", "recording"))
    write_chunk(chunk_files(t, "commit")[0], np.array([10**12, 1], "<i8").tobytes())


@_z("commit-counter-negative", CorruptTraceError, "impossible")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "status", "recording"))
    write_chunk(chunk_files(t, "commit")[0], np.array([-5, 0], "<i8").tobytes())


@_z("commit-counter-truncated", CorruptTraceError, "commit")
def _(t: Path) -> None:
    truncate(chunk_files(t, "commit")[0], 5)


@_z("commit-array-dropped", MissingArrayError, "commit")
def _(t: Path) -> None:
    shutil.rmtree(t / "commit")


@_z("data-array-dropped", MissingArrayError, "residual")
def _(t: Path) -> None:
    shutil.rmtree(t / "residual")


@_z("coordinate-array-dropped", MissingArrayError, "layer")
def _(t: Path) -> None:
    shutil.rmtree(t / "layer")


@_z("array-json-garbage", MetadataError, "residual")
def _(t: Path) -> None:
    (t / "residual" / "zarr.json").write_bytes(b"\x00\xff{{{")


@_z("array-json-is-group", CorruptTraceError, "residual")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(node_type="group"))


@_z("pickle-codec", DisallowedCodecError, "pickle")
def _(t: Path) -> None:
    marker = t.parent / PWNED
    edit_array_json(t, "token_id", lambda a: a.update(
        codecs=[{"name": "numcodecs.pickle", "configuration": {"protocol": 4}}]))
    for f in chunk_files(t, "token_id"):
        f.write_bytes(pickle_payload(marker))


@_z("pickle-codec-inside-sharding", DisallowedCodecError, "pickle")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.update(codecs=[{
        "name": "sharding_indexed", "configuration": {
            "chunk_shape": [1], "codecs": [{"name": "numcodecs.pickle"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}}]))


@_z("unknown-codec", DisallowedCodecError, "evil")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a["codecs"].append({"name": "evil"}))


@_z("codecs-not-a-list", CorruptTraceError, "codecs")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(codecs={"name": "bytes"}))


@_z("object-dtype", DisallowedCodecError, "data type")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.update(data_type="object"))


@_z("string-dtype", DisallowedCodecError, "data type")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.update(data_type="string"))


@_z("wrong-dtype", CorruptTraceError, "stored as")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.update(data_type="float64"))


@_z("absurd-shape", CorruptTraceError, "residual")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(shape=[2**62, 4, 8]))


@_z("negative-shape", CorruptTraceError, "shape")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(shape=[-1, 4, 8]))


@_z("shape-wrong-rank", CorruptTraceError, "residual")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: (a.update(shape=[20, 32]),
                                              a.update(dimension_names=["position", "x"])))


@_z("shape-not-a-list", CorruptTraceError, "shape")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(shape="big"))


@_z("absurd-chunk-shape", CorruptTraceError, "residual")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a["chunk_grid"]["configuration"].update(
        chunk_shape=[2**40, 4, 8]))


@_z("dimension-names-wrong", CorruptTraceError, "dimensions")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(dimension_names=["a", "b", "c"]))


@_z("dimension-names-missing", CorruptTraceError, "dimension_names")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.pop("dimension_names"))


@_z("chunk-truncated", CorruptTraceError, "residual")
def _(t: Path) -> None:
    truncate(chunk_files(t, "residual")[0], 10)


@_z("chunk-empty", CorruptTraceError, "residual")
def _(t: Path) -> None:
    truncate(chunk_files(t, "residual")[-1], 0)


@_z("chunk-too-long", CorruptTraceError, "residual")
def _(t: Path) -> None:
    f = chunk_files(t, "residual")[0]
    f.write_bytes(f.read_bytes() + b"\x00" * 100)


@_z("coordinate-chunk-truncated", CorruptTraceError, "'layer'")
def _(t: Path) -> None:
    truncate(chunk_files(t, "layer")[0], 3)


@_z("step-table-chunk-truncated", CorruptTraceError, "'step_start'")
def _(t: Path) -> None:
    truncate(chunk_files(t, "step_start")[0], 3)


@_z("token-table-chunk-truncated", CorruptTraceError, "'token_nbytes'")
def _(t: Path) -> None:
    truncate(chunk_files(t, "token_nbytes")[0], 3)


@_z("chunk-missing", None, "missing")
def _(t: Path) -> None:
    chunk_files(t, "residual")[0].unlink()


@_z("chunk-is-a-directory", CorruptTraceError, "residual")
def _(t: Path) -> None:
    f = chunk_files(t, "residual")[0]
    f.unlink()
    f.mkdir()


@_z("compressed-chunk-garbage", CorruptTraceError, "mlp_out")
def _(t: Path) -> None:
    edit_array_json(t, "mlp_out", lambda a: a["codecs"].append(
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}}))
    for f in chunk_files(t, "mlp_out"):
        f.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(40))


def _gzip_bomb(nbytes: int) -> bytes:
    import gzip
    import io

    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as g:
        for _ in range(nbytes >> 24):
            g.write(bytes(1 << 24))
    return out.getvalue()


@_z("gzip-bomb", CorruptTraceError, "mlp_out.*inflates")
def _(t: Path) -> None:
    """A 256 KB gzip chunk that inflates to 256 MiB (the chunk holds a few hundred bytes)."""
    edit_array_json(t, "mlp_out", lambda a: a["codecs"].append(
        {"name": "gzip", "configuration": {"level": 1}}))
    bomb = _gzip_bomb(1 << 28)
    for f in chunk_files(t, "mlp_out"):
        f.write_bytes(bomb)


@_z("zstd-bomb", CorruptTraceError, "mlp_out.*too small")
def _(t: Path) -> None:
    from numcodecs.zstd import Zstd

    edit_array_json(t, "mlp_out", lambda a: a["codecs"].append(
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}}))
    bomb = Zstd(level=19).encode(np.zeros(1 << 28, np.uint8))
    for f in chunk_files(t, "mlp_out"):
        f.write_bytes(bomb)


@_z("blosc-bomb", CorruptTraceError, "mlp_out.*too small")
def _(t: Path) -> None:
    from numcodecs import Blosc

    edit_array_json(t, "mlp_out", lambda a: a["codecs"].append({"name": "blosc", "configuration": {
        "cname": "zstd", "clevel": 5, "shuffle": "noshuffle", "typesize": 1, "blocksize": 0}}))
    bomb = Blosc(cname="zstd", clevel=9).encode(np.zeros(1 << 28, np.uint8))
    for f in chunk_files(t, "mlp_out"):
        f.write_bytes(bomb)


@_z("token-ids-outside-vocabulary", None, "vocabulary")
def _(t: Path) -> None:
    edit_chunk(chunk_files(t, "token_id")[0], 0, np.array([10**9], "<i8").tobytes())


@_z("step-table-inconsistent", None, "step")
def _(t: Path) -> None:
    edit_chunk(chunk_files(t, "step_positions")[0], 0, np.array([7], "<i4").tobytes())


@_z("data-chunk-byte-flipped", CorruptTraceError, r"'mlp_out': chunk c\.0\.0\.0 fails its crc32c")
def _(t: Path) -> None:
    flip_bits(chunk_files(t, "mlp_out")[0], [37])


@_z("coordinate-chunk-byte-flipped", CorruptTraceError, r"'hidden': chunk c\.0 fails its crc32c")
def _(t: Path) -> None:
    flip_bits(chunk_files(t, "hidden")[0], [9])


@_z("coordinate-not-its-definition", None, "coordinate 'head' differs from its definition")
def _(t: Path) -> None:
    edit_chunk(chunk_files(t, "head")[0], 0, np.array([1], "<i8").tobytes())


# -- hostile zarr traces: links, special files, budgets, malformed array metadata ------------
def _zstd_chunks(t: Path, name: str) -> list[Path]:
    """Make array ``name`` zstd-compressed (re-encoding its chunks), so that zarr-python, not
    tracekit's direct reads, opens its chunk files."""
    from numcodecs.zstd import Zstd

    edit_array_json(t, name, lambda a: a["codecs"].append(
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}}))
    files = chunk_files(t, name)
    for f in files:
        f.write_bytes(Zstd(level=1).encode(f.read_bytes()))
    return files


def _link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def zstd_rle_bomb(nbytes: int) -> bytes:
    """A zstd frame of ``nbytes`` zeros made of RLE blocks: 4 bytes per 128 KiB, so 1.5 GB
    takes 48 KB (and no time or memory to make)."""
    block = 1 << 17
    out = bytearray(b"\x28\xb5\x2f\xfd\xe0" + nbytes.to_bytes(8, "little"))
    left = nbytes
    while left:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


@_z("chunk-links-to-etc-passwd", CorruptTraceError, "token_bytes.*symbolic link")
def _(t: Path) -> None:
    _link(chunk_files(t, "token_bytes")[0], "/etc/passwd")


@_z("compressed-chunk-links-to-etc-passwd", CorruptTraceError, "mlp_out.*symbolic link")
def _(t: Path) -> None:
    _link(_zstd_chunks(t, "mlp_out")[0], "/etc/passwd")


@_z("chunk-links-inside-the-trace", CorruptTraceError, "symbolic link")
def _(t: Path) -> None:
    _link(chunk_files(t, "token_id")[0], str(chunk_files(t, "token_step")[0].resolve()))


@_z("array-json-links-to-etc-passwd", MetadataError, "residual.*symbolic link")
def _(t: Path) -> None:
    _link(t / "residual" / "zarr.json", "/etc/passwd")


@_z("array-json-links-to-dev-urandom", MetadataError, "residual.*symbolic link")
def _(t: Path) -> None:
    _link(t / "residual" / "zarr.json", "/dev/urandom")


@_z("array-folder-links-outside", MetadataError, "residual.*symbolic link")
def _(t: Path) -> None:
    outside = t.parent / "elsewhere"
    shutil.copytree(t / "residual", outside)
    shutil.rmtree(t / "residual")
    (t / "residual").symlink_to(outside)


@_z("chunk-folder-links-outside", CorruptTraceError, "token_bytes.*symbolic link")
def _(t: Path) -> None:
    """With "/" chunk keys (c/0/0) a folder on the way to a chunk can be a link, too."""
    edit_array_json(t, "token_bytes", lambda a: a.update(
        chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}}))
    outside = t.parent / "elsewhere" / "0"
    outside.mkdir(parents=True)
    chunk_files(t, "token_bytes")[0].rename(outside / "0")
    (t / "token_bytes" / "c").symlink_to(outside.parent)


@_z("chunk-is-a-fifo", CorruptTraceError, "token_bytes.*FIFO")
def _(t: Path) -> None:
    _fifo(chunk_files(t, "token_bytes")[0])


@_z("compressed-chunk-is-a-fifo", CorruptTraceError, "mlp_out.*FIFO")
def _(t: Path) -> None:
    _fifo(_zstd_chunks(t, "mlp_out")[0])


@_z("array-json-is-a-fifo", MetadataError, "residual.*FIFO")
def _(t: Path) -> None:
    _fifo(t / "residual" / "zarr.json")


@_z("root-json-links-to-etc-passwd", MetadataError, "symbolic link")
def _(t: Path) -> None:
    _link(t / "zarr.json", "/etc/passwd")


@_z("layout-over-the-trace-budget", MetadataError, "declares .* bytes")
def _(t: Path) -> None:
    """Every dimension within its own limit, their product far beyond any disk."""
    def edit(m: dict[str, Any]) -> None:
        m["capture"]["max_positions"] = 1 << 24
        m["model"].update(n_heads=4096)
    edit_meta(t, edit)


@_z("zstd-bomb-with-raised-chunk-shape", CorruptTraceError, "mlp_out.*per chunk")
def _(t: Path) -> None:
    """A 48 KB chunk that decodes to the 1.5 GB its raised chunk_shape declares."""
    files = _zstd_chunks(t, "mlp_out")
    edit_array_json(t, "mlp_out", lambda a: a["chunk_grid"]["configuration"].update(
        chunk_shape=[1 << 25, 3, 8]))
    bomb = zstd_rle_bomb((1 << 25) * 3 * 8 * 2)
    for f in files:
        f.write_bytes(bomb)


@_z("zstd-bomb-with-chunk-shape-beyond-the-array", CorruptTraceError, "mlp_out.*chunks")
def _(t: Path) -> None:
    """Within the per-chunk limit, but larger than the array was ever allocated."""
    files = _zstd_chunks(t, "mlp_out")
    edit_array_json(t, "mlp_out", lambda a: a["chunk_grid"]["configuration"].update(
        chunk_shape=[1 << 20, 3, 8]))
    bomb = zstd_rle_bomb((1 << 20) * 3 * 8 * 2)
    for f in files:
        f.write_bytes(bomb)


@_z("chunk-key-encoding-v2", CorruptTraceError, "residual.*chunk_key_encoding")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(
        chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}))


@_z("chunk-key-separator-unknown", CorruptTraceError, "residual.*chunk_key_encoding")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a.update(
        chunk_key_encoding={"name": "default", "configuration": {"separator": ["."]}}))


@_z("data-type-missing", CorruptTraceError, "token_id.*data_type")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.pop("data_type"))


for _i, _dtype in enumerate(["(100000000000,)i8", {"name": "int64"}, ["int64"], "<i8"]):
    @_z(f"data-type-odd-{_i}", DisallowedCodecError, "token_id.*data type")
    def _(t: Path, dtype: Any = _dtype) -> None:
        edit_array_json(t, "token_id", lambda a: a.update(data_type=dtype))


for _i, _conf in enumerate(["little", ["endian", "little"], None]):
    @_z(f"codec-configuration-not-an-object-{_i}", CorruptTraceError,
        "residual.*configuration")
    def _(t: Path, conf: Any = _conf) -> None:
        edit_array_json(t, "residual", lambda a: a.update(
            codecs=[{"name": "bytes", "configuration": conf}]))


for _i, _name in enumerate([{"bytes": 1}, ["bytes"]]):
    @_z(f"codec-name-not-a-string-{_i}", CorruptTraceError, "residual.*name")
    def _(t: Path, cname: Any = _name) -> None:
        edit_array_json(t, "residual", lambda a: a.update(codecs=[{"name": cname}]))


@_z("codec-a-bare-sharding-name", CorruptTraceError, "token_nbytes.*name")
def _(t: Path) -> None:
    edit_array_json(t, "token_nbytes", lambda a: a.update(codecs=["sharding_indexed"]))


@_z("chunk-grid-configuration-a-list", CorruptTraceError, "residual.*chunk grid")
def _(t: Path) -> None:
    edit_array_json(t, "residual", lambda a: a["chunk_grid"].update(configuration=[4, 4]))


for _version in ("\u00b2.0", "1.\u00b2", "\u0661.0"):
    @_z(f"version-unicode-digit-{_version.encode('unicode_escape').decode()}", MetadataError,
        "version")
    def _(t: Path, version: str = _version) -> None:
        edit_meta(t, lambda m: set_path(m, "version", version))


@_z("metadata-lone-surrogate", MetadataError, "surrogate")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "model.name", "tiny\udc80"))


@_z("array-attributes-lone-surrogate", MetadataError, "residual.*surrogate")
def _(t: Path) -> None:
    edit_json(t / "residual" / "zarr.json", lambda a: a["attributes"].update(note="\ud800"))


@_z("message-quotes-a-100kB-value", DisallowedCodecError, r"token_id.*\.\.\.")
def _(t: Path) -> None:
    edit_array_json(t, "token_id", lambda a: a.update(data_type="x\n" * 50_000))


@_z("message-quotes-newlines-and-escapes", MetadataError, "schema")
def _(t: Path) -> None:
    edit_meta(t, lambda m: set_path(m, "schema", "evil\n\x1b[2J" + "y" * 100_000))


# -- HDF5 cases -----------------------------------------------------------------------------
HDF5_CASES: list[Case] = []


def _h(name: str, error: type[TraceError] | None, match: str = "", warns: bool = False):
    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def damage(trace: Path) -> Path:
            fn(trace)
            return trace
        HDF5_CASES.append(Case(f"hdf5-{name}", "hdf5", damage, error, match, warns))
        return fn
    return register


for _fraction in (0.02, 0.3, 0.6, 0.95):
    @_h(f"truncated-to-{int(_fraction * 100)}pct", TraceError)
    def _(t: Path, fraction: float = _fraction) -> None:
        truncate(t, int(t.stat().st_size * fraction))


@_h("truncated-by-one-byte", TraceError)
def _(t: Path) -> None:
    truncate(t, t.stat().st_size - 1)


@_h("superblock-bit-flip", TraceError)
def _(t: Path) -> None:
    flip_bits(t, [20])


@_h("magic-only", TraceError)
def _(t: Path) -> None:
    t.write_bytes(b"\x89HDF\r\n\x1a\n")


@_h("magic-then-garbage", TraceError)
def _(t: Path) -> None:
    t.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(5000))


@_h("metadata-missing", NotATraceError, "tracekit")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f.attrs["tracekit"]


@_h("metadata-garbage", MetadataError, "not valid JSON")
def _(t: Path) -> None:
    h5_set_meta(t, b"\x00\xffnot json", dtype=h5py.string_dtype("utf-8", 10))


@_h("metadata-not-a-string", MetadataError, "not a JSON string")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f.attrs["tracekit"]
        f.attrs["tracekit"] = np.arange(5)


@_h("metadata-variable-length", MetadataError, "variable-length")
def _(t: Path) -> None:
    h5_set_meta(t, json.dumps(h5_meta(t)), dtype=h5py.string_dtype("utf-8"))


@_h("metadata-huge", MetadataError, "larger")
def _(t: Path) -> None:
    meta = h5_meta(t)
    meta["tags"] = {"pad": "x" * (2 << 20)}
    text = json.dumps(meta).encode()
    h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


@_h("version-higher-major", VersionError, r"2\.0.*1\.1")
def _(t: Path) -> None:
    meta = h5_meta(t)
    meta["version"] = "2.0"
    text = json.dumps(meta).encode()
    h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


@_h("version-higher-minor", None, warns=True)
def _(t: Path) -> None:
    meta = h5_meta(t)
    meta["version"] = "1.2"
    text = json.dumps(meta).encode()
    h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


@_h("data-array-dropped", MissingArrayError, "residual")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f["residual"]


@_h("commit-array-dropped", MissingArrayError, "commit")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f["commit"]


@_h("array-is-a-group", CorruptTraceError, "residual")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f["residual"]
        f.create_group("residual")


@_h("disallowed-filter", DisallowedCodecError, "filter")
def _(t: Path) -> None:
    _h5_replace(t, "residual", compression="lzf")


@_h("disallowed-dtype", DisallowedCodecError, "data type")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        data = f["token_id"][()]
        del f["token_id"]
        ds = f.create_dataset("token_id", data=data.astype("complex64"))
        ds.dims[0].label = "position"


@_h("string-dtype", DisallowedCodecError, "data type")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        n = len(f["token_id"])
        del f["token_id"]
        ds = f.create_dataset("token_id", data=np.array(["x"] * n, dtype=object),
                              dtype=h5py.string_dtype())
        ds.dims[0].label = "position"


@_h("absurd-shape", CorruptTraceError, "residual")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        f["residual"].resize((2**40, *f["residual"].shape[1:]))


@_h("external-raw-data", DisallowedCodecError, "outside the trace")
def _(t: Path) -> None:
    """Raw data in another file (it could be any file of the reader's) must not be read."""
    secret = t.parent / "secret.bin"
    secret.write_bytes(os.urandom(1 << 16))
    with h5py.File(t, "r+") as f:
        shape, dtype = f["residual"].shape, f["residual"].dtype
        del f["residual"]
        ds = f.create_dataset("residual", shape=shape, dtype=dtype,
                              external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        for i, d in enumerate(("position", "point", "hidden")):
            ds.dims[i].label = d


@_h("external-link", DisallowedCodecError, "ExternalLink")
def _(t: Path) -> None:
    other = t.parent / "other.h5"
    with h5py.File(other, "w") as g:
        g.create_dataset("x", data=np.zeros((20, 4, 8), np.float16))
    with h5py.File(t, "r+") as f:
        del f["residual"]
        f["residual"] = h5py.ExternalLink(str(other), "x")


@_h("soft-link", DisallowedCodecError, "SoftLink")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        del f["attn_out"]
        f["attn_out"] = h5py.SoftLink("/mlp_out")


@_h("virtual-dataset", DisallowedCodecError, "outside the trace")
def _(t: Path) -> None:
    with h5py.File(t, "r+") as f:
        shape, dtype = f["residual"].shape, f["residual"].dtype
        del f["residual"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(t.parent / "elsewhere.h5"), "x", shape=shape)
        ds = f.create_virtual_dataset("residual", layout, fillvalue=0)
        for i, d in enumerate(("position", "point", "hidden")):
            ds.dims[i].label = d


@_h("chunk-garbage-compressed", CorruptTraceError, "residual")
def _(t: Path) -> None:
    _h5_replace(t, "residual", compression="gzip")
    with h5py.File(t, "r") as f:
        ds = f["residual"]
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    with open(t, "r+b") as fh:
        for info in infos:
            fh.seek(info.byte_offset)
            fh.write(b"\xa5" * info.size)


for _version in ("\u00b2.0", "1.\u00b2"):
    @_h(f"version-unicode-digit-{_version.encode('unicode_escape').decode()}", MetadataError,
        "version")
    def _(t: Path, version: str = _version) -> None:
        meta = h5_meta(t)
        meta["version"] = version
        text = json.dumps(meta).encode()
        h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


@_h("metadata-lone-surrogate", MetadataError, "surrogate")
def _(t: Path) -> None:
    meta = h5_meta(t)
    meta["model"]["name"] = "tiny\udc80"
    text = json.dumps(meta).encode()
    h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


@_h("message-quotes-newlines", MetadataError, "schema")
def _(t: Path) -> None:
    meta = h5_meta(t)
    meta["schema"] = "evil\n\x1b[2J" + "y" * 100_000
    text = json.dumps(meta).encode()
    h5_set_meta(t, text, dtype=h5py.string_dtype("utf-8", len(text)))


def _h5_replace(t: Path, name: str, **create: Any) -> None:
    """Rewrite dataset ``name`` with other creation properties, keeping data and dim labels."""
    with h5py.File(t, "r+") as f:
        old = f[name]
        data, chunks = old[()], old.chunks or True
        labels = [d.label for d in old.dims]
        maxshape = old.maxshape
        del f[name]
        ds = f.create_dataset(name, data=data, chunks=chunks, maxshape=maxshape, **create)
        for i, label in enumerate(labels):
            ds.dims[i].label = label


# A recording whose writer died: still flagged open for SWMR writing, so readers take the
# SWMR path, where HDF5 skips its own truncation check and retries bad checksums.
def _hk(name: str, error: type[TraceError] | None, match: str = ""):
    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def damage(trace: Path) -> Path:
            fn(trace)
            return trace
        HDF5_CASES.append(Case(f"hdf5-killed-{name}", "hdf5-killed", damage, error, match))
        return fn
    return register


for _fraction in (0.02, 0.5, 0.99):
    @_hk(f"truncated-to-{int(_fraction * 100)}pct", CorruptTraceError, "truncated")
    def _(t: Path, fraction: float = _fraction) -> None:
        # Of what HDF5 wrote: a live writer's file also has space allocated ahead (zeros).
        truncate(t, int(_superblock_end(t) * fraction))


@_hk("metadata-block-bit-flips", TraceError)
def _(t: Path) -> None:
    flip_bits(t, [40, 48, 56, 64, 300, 600])


# -- not traces at all ----------------------------------------------------------------------
OTHER_CASES: list[Case] = []


def _o(name: str, error: type[TraceError], match: str = ""):
    def register(fn: Callable[[Path], Path]) -> Callable[[Path], Path]:
        OTHER_CASES.append(Case(f"other-{name}", "none", fn, error, match))
        return fn
    return register


@_o("missing-path", NotATraceError, "no such file")
def _(d: Path) -> Path:
    return d / "nothing.zarr"


@_o("empty-file", NotATraceError)
def _(d: Path) -> Path:
    (d / "empty.h5").write_bytes(b"")
    return d / "empty.h5"


@_o("text-file", NotATraceError)
def _(d: Path) -> Path:
    (d / "notes.zarr").write_text("just some notes\n")
    return d / "notes.zarr"


@_o("png-file", NotATraceError)
def _(d: Path) -> Path:
    (d / "image.h5").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return d / "image.h5"


@_o("zip-file", NotATraceError)
def _(d: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(d / "trace.zarr.zip", "w") as z:
        z.writestr("zarr.json", "{}")
    return d / "trace.zarr.zip"


@_o("empty-directory", NotATraceError)
def _(d: Path) -> Path:
    (d / "empty.zarr").mkdir()
    return d / "empty.zarr"


@_o("plain-zarr-group", NotATraceError, "tracekit")
def _(d: Path) -> Path:
    import zarr

    g = zarr.open_group(str(d / "plain.zarr"), mode="w")
    g.create_array("x", shape=(3,), dtype="i4")
    return d / "plain.zarr"


@_o("plain-hdf5-file", NotATraceError, "tracekit")
def _(d: Path) -> Path:
    with h5py.File(d / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    return d / "plain.h5"


@_o("root-json-links-to-dev-urandom", NotATraceError)
def _(d: Path) -> Path:
    (d / "odd.zarr").mkdir()
    (d / "odd.zarr" / "zarr.json").symlink_to("/dev/urandom")
    return d / "odd.zarr"


@_o("root-json-is-a-fifo", NotATraceError)
def _(d: Path) -> Path:
    (d / "odd.zarr").mkdir()
    os.mkfifo(d / "odd.zarr" / "zarr.json")
    return d / "odd.zarr"


@_o("trace-is-a-fifo", NotATraceError)
def _(d: Path) -> Path:
    os.mkfifo(d / "trace.h5")
    return d / "trace.h5"


@_o("zarr-json-is-a-directory", NotATraceError)
def _(d: Path) -> Path:
    (d / "odd.zarr" / "zarr.json").mkdir(parents=True)
    return d / "odd.zarr"


ALL_CASES: list[Case] = [*ZARR_CASES, *HDF5_CASES, *OTHER_CASES]


def materialize(case: Case, sources: dict[str, Path], workdir: Path) -> Path:
    """A fresh damaged copy for ``case`` in ``workdir`` (sources: valid traces by format)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.source == "none":
        return case.damage(workdir)
    src = sources[case.source]
    dst = workdir / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return case.damage(dst)


def make_sources(root: Path, seed: int) -> dict[str, Path]:
    """The valid traces the corpus starts from: a complete zarr and HDF5 trace, and an HDF5
    recording of 10 positions whose writer died (a copy taken while it was open)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tracegen

    root.mkdir(parents=True, exist_ok=True)
    plan = tracegen.small_plan()
    sources = {"zarr": root / "trace.zarr", "hdf5": root / "trace.h5",
               "hdf5-killed": root / "killed" / "trace.h5"}
    tracegen.write_synthetic(sources["zarr"], plan, seed)
    tracegen.write_synthetic(sources["hdf5"], plan, seed)
    writer = tracegen.create_synthetic(root / "recording.h5", plan, seed, commit_interval=0.0)
    tracegen.feed_synthetic(writer, plan, seed, 10)
    writer.flush()
    sources["hdf5-killed"].parent.mkdir()
    shutil.copy(root / "recording.h5", sources["hdf5-killed"])
    writer.close()
    return sources


def main(out: str) -> None:
    """Write the corpus under ``out`` (one folder per case) from freshly made valid traces."""
    root = Path(out)
    sources = make_sources(root / "valid", seed=11)
    for case in ALL_CASES:
        print(case.name, materialize(case, sources, root / case.name))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus")
