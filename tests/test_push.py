"""``tracekit push`` against a real S3-protocol server on loopback (moto), through a proxy that
logs every request and injects faults (a refused upload, a flipped byte), and to ``file://``."""

from __future__ import annotations

import filecmp
import os
import sys
from pathlib import Path

import pytest
import tracegen
from click.testing import CliRunner
from servers import FaultProxy

import tracekit
from tracekit import push as push_module
from tracekit.cli import main
from tracekit.errors import TraceError, TraceExistsError
from tracekit.push import PushError, push, redact

BUCKET = "traces"
DEMO_ZARR = Path(__file__).parents[1] / "sample_traces" / "demo_fibonacci.zarr"


@pytest.fixture
def proxy(s3, monkeypatch):
    """The S3 server behind a fault proxy; the environment points at the proxy; the bucket
    exists."""
    s3.client().create_bucket(Bucket=BUCKET)
    with FaultProxy(s3.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture
def zarr_trace(tmp_path: Path) -> Path:
    path = tmp_path / "synthetic.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=11)
    return path


@pytest.fixture
def lean_zarr(tmp_path: Path) -> Path:
    """A zarr trace of fewer files (residual stream only): most tests push several times."""
    path = tmp_path / "lean.zarr"
    tracegen.write_synthetic(path, tracegen.small_plan(captured=("residual",)), seed=5)
    return path


@pytest.fixture
def h5_trace(tmp_path: Path) -> Path:
    path = tmp_path / "synthetic.h5"
    tracegen.write_synthetic(path, tracegen.small_plan(), seed=11)
    return path


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stored(s3, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (key relative to it) and its bytes, downloaded."""
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix):]] = body
    return out


def object_puts(proxy: FaultProxy, prefix: str) -> list:
    return [r for r in proxy.stats.uploads() if r.path.startswith(f"/{BUCKET}/{prefix}")]


@pytest.mark.parametrize("which", ["synthetic", "demo"])
def test_zarr_trace_arrives_bit_exact_with_its_root_last(proxy, s3, zarr_trace, tmp_path,
                                                         which) -> None:
    src = zarr_trace if which == "synthetic" else DEMO_ZARR
    seen: list[tuple[int, int]] = []
    done = push(src, f"s3://{BUCKET}/shared/t.zarr", progress=lambda d, t: seen.append((d, t)))
    assert stored(s3, "shared/t.zarr/") == local_files(src)
    assert done["uploaded"][-1] == "zarr.json" and done["skipped"] == []
    assert done["objects"] == len(local_files(src)) and done["verified"]
    # The root went up only after every other object's upload had been answered.
    puts = object_puts(proxy, "shared/t.zarr/")
    root = [r for r in puts if r.path.endswith("t.zarr/zarr.json")]
    assert len(root) == 1 and len(puts) == done["objects"]
    assert all(r.ended <= root[0].started for r in puts if r is not root[0])
    # The progress bar counts bytes: uploaded and read back.
    assert seen[-1] == (2 * done["bytes"],) * 2
    # What arrived is the same trace.
    copy = tmp_path / "downloaded.zarr"
    for key, data in stored(s3, "shared/t.zarr/").items():
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes(data)
    with tracekit.open(copy) as a, tracekit.open(src) as b:
        assert (a.status, a.n_positions) == (b.status, b.n_positions) == ("complete",
                                                                          b.n_positions)


def test_hdf5_trace_goes_up_under_a_temporary_key_then_moves(proxy, s3, h5_trace) -> None:
    done = push(h5_trace, f"s3://{BUCKET}/shared/t.h5")
    assert stored(s3, "shared/") == {"t.h5": h5_trace.read_bytes()}
    assert done["uploaded"] == [""] and done["objects"] == 1
    # Uploaded to t.h5.partial, read back, then copied server-side (a PUT without a body).
    log = [(r.method, r.path.removeprefix(f"/{BUCKET}/shared/")) for r in proxy.stats.requests
           if r.path.startswith(f"/{BUCKET}/shared/") and r.method != "HEAD"]
    assert log.index(("PUT", "t.h5.partial")) < log.index(("GET", "t.h5.partial")) \
        < log.index(("PUT", "t.h5"))
    assert [r.path for r in object_puts(proxy, "shared/")] == [f"/{BUCKET}/shared/t.h5.partial"]


def test_large_file_goes_up_in_parts_interrupted_or_corrupted_leaves_no_trace(
        proxy, s3, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(push_module, "PART_SIZE", 5 * 2**20)  # S3's smallest part
    big = tmp_path / "big.h5"
    plan = tracegen.small_plan(max_positions=300, chunk_bytes=2**20, stored_dtype="float32",
                               model=tracegen.small_model(n_layers=4, d_model=512, n_heads=8))
    tracegen.write_synthetic(big, plan, seed=3)
    assert big.stat().st_size > 2 * 5 * 2**20  # s3fs sends a file this large in parts
    proxy.inject("status", status=403, uploads=True, after=1)  # the second part
    with pytest.raises(PushError, match=r"s3://traces/big\.h5\.partial: access denied"):
        push(big, f"s3://{BUCKET}/big.h5")
    assert stored(s3, "") == {}  # a multipart upload not completed is no object
    proxy.clear_faults()
    # A part corrupted on its way (its checksum dropped): the read-back, in ranges, notices.
    proxy.inject("corrupt", "*/big.h5.partial", drop_checksum=True)
    with pytest.raises(PushError, match=r"big\.h5\.partial differs from .* \(sha256 "):
        push(big, f"s3://{BUCKET}/big.h5")
    assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]] == [
        "big.h5.partial"]  # verified before it could be moved into place
    proxy.reset_stats()
    push(big, f"s3://{BUCKET}/big.h5")
    assert stored(s3, "") == {"big.h5": big.read_bytes()}
    # The parts of the upload that was completed (parts of the failed one may still arrive).
    completed = [r.query for r in proxy.stats.requests if r.method == "POST"
                 and r.query.startswith("uploadId=")]
    assert len(completed) == 1
    parts = sorted(r.query for r in proxy.stats.requests if r.upload
                   and completed[0] in r.query)
    assert parts == [f"partNumber={i}&{completed[0]}" for i in (1, 2, 3)]


def test_interrupted_zarr_push_is_no_trace_and_a_rerun_completes_it(proxy, s3,
                                                                    lean_zarr) -> None:
    zarr_trace = lean_zarr
    url = f"s3://{BUCKET}/t.zarr"
    proxy.inject("status", status=403, uploads=True, after=14)  # the 15th upload
    with pytest.raises(PushError, match=r"^s3://traces/t\.zarr/\S+: access denied"):
        push(zarr_trace, url, jobs=4)
    partial = stored(s3, "t.zarr/")
    assert 0 < len(partial) < len(local_files(zarr_trace))
    assert "zarr.json" not in partial  # nothing there looks like a complete trace
    first = {r.path for r in object_puts(proxy, "t.zarr/")}
    proxy.clear_faults()
    done = push(zarr_trace, url, jobs=4)
    assert stored(s3, "t.zarr/") == local_files(zarr_trace)
    # What was there already (same size, same SHA-256 read back) was not sent again.
    assert sorted(f"/{BUCKET}/t.zarr/{k}" for k in done["skipped"]) == sorted(first)
    puts = [r.path for r in object_puts(proxy, "t.zarr/")]
    assert len(puts) == len(set(puts)) == len(local_files(zarr_trace))


def test_an_object_corrupted_on_its_way_is_caught(proxy, s3, lean_zarr) -> None:
    zarr_trace = lean_zarr
    url = f"s3://{BUCKET}/t.zarr"
    key = "residual/c.0.0.0"
    assert (zarr_trace / key).is_file()
    # A store that keeps no checksum of its own: only push's read-back can notice.
    proxy.inject("corrupt", f"*/t.zarr/{key}", drop_checksum=True)
    digest = r"[0-9a-f]{16}\.\.\."
    with pytest.raises(PushError, match=rf"t\.zarr/{key} differs from .*{key} after upload "
                                        rf"\(sha256 {digest}, expected {digest}\)"):
        push(zarr_trace, url)
    assert "zarr.json" not in stored(s3, "t.zarr/")
    # The same corruption without verification goes unnoticed: the check is what catches it.
    s3.client().delete_object(Bucket=BUCKET, Key=f"t.zarr/{key}")
    proxy.inject("corrupt", f"*/t.zarr/{key}", drop_checksum=True)
    push(zarr_trace, url, verify=False, force=True)
    got = stored(s3, "t.zarr/")
    assert got[key] != (zarr_trace / key).read_bytes() and len(got[key]) == len(
        (zarr_trace / key).read_bytes())
    # A rerun compares what is there (size and SHA-256 read back) and replaces the bad object.
    proxy.clear_faults()
    done = push(zarr_trace, url, force=True)
    assert done["uploaded"] == [key, "zarr.json"]
    assert stored(s3, "t.zarr/") == local_files(zarr_trace)


def test_a_corrupted_upload_with_its_checksum_is_caught_too(proxy, s3, h5_trace) -> None:
    # botocore sends a CRC32 with each upload; this store keeps it without checking, and the
    # read-back fails on it (real S3 refuses such an upload outright).
    proxy.inject("corrupt", "*/t.h5.partial")
    with pytest.raises(PushError, match=r"t\.h5\.partial differs from .* after upload \(the "
                                        r"store's own checksum does not match its bytes\)"):
        push(h5_trace, f"s3://{BUCKET}/t.h5")
    listed = s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]
    assert [o["Key"] for o in listed] == ["t.h5.partial"]  # not at its final key
    push(h5_trace, f"s3://{BUCKET}/t.h5")  # the bad temporary object is replaced
    assert stored(s3, "") == {"t.h5": h5_trace.read_bytes()}


def test_an_existing_trace_is_replaced_only_with_force(proxy, s3, tmp_path, lean_zarr) -> None:
    """Also: objects of the same key and size, but other bytes, are replaced (valid zarr chunk
    files all have the same whole-file crc32c: comparing that would keep the old ones)."""
    zarr_trace = tmp_path / "other.zarr"
    tracegen.write_synthetic(zarr_trace, tracegen.small_plan(captured=()), seed=6)
    url = f"s3://{BUCKET}/t.zarr"
    push(lean_zarr, url)
    with pytest.raises(TraceExistsError, match="a trace already exists there"):
        push(zarr_trace, url)
    assert stored(s3, "t.zarr/") == local_files(lean_zarr)
    same_size = [k for k, b in local_files(zarr_trace).items()
                 if k != "zarr.json" and len(local_files(lean_zarr).get(k, b"")) == len(b)
                 and local_files(lean_zarr)[k] != b]
    assert "commit/c.0" in same_size
    push(zarr_trace, url, force=True)  # objects of the old trace not in the new one go
    assert stored(s3, "t.zarr/") == local_files(zarr_trace)


def test_leftovers_of_another_push_are_not_silently_mixed_in(proxy, s3, lean_zarr) -> None:
    zarr_trace = lean_zarr
    s3.client().put_object(Bucket=BUCKET, Key="t.zarr/other/c.0", Body=b"x")
    with pytest.raises(PushError, match=r"holds 1 object\(s\) that are not part of this "
                                        r"trace \(e\.g\. other/c\.0\); use --force"):
        push(zarr_trace, f"s3://{BUCKET}/t.zarr")
    push(zarr_trace, f"s3://{BUCKET}/t.zarr", force=True)
    assert stored(s3, "t.zarr/") == local_files(zarr_trace)
    # Something that is no part of any trace is never deleted, even with --force.
    s3.client().put_object(Bucket=BUCKET, Key="t.zarr/notes.txt", Body=b"mine")
    with pytest.raises(PushError, match=r"holds 1 object\(s\) that are not part of a zarr "
                                        r"trace \(e\.g\. notes\.txt\); push to a prefix of "
                                        r"its own"):
        push(zarr_trace, f"s3://{BUCKET}/t.zarr", force=True)
    assert stored(s3, "t.zarr/")["notes.txt"] == b"mine"


def test_a_trace_being_recorded_is_refused(proxy, s3, tmp_path) -> None:
    path = tmp_path / "live.zarr"
    writer = tracegen.create_synthetic(path, tracegen.small_plan(captured=()), seed=2)
    try:
        tracegen.feed_synthetic(writer, writer.plan, 2, 5, [5])
        writer.flush()
        with pytest.raises(PushError, match="still being recorded.*--allow-incomplete"):
            push(path, f"s3://{BUCKET}/live.zarr")
        assert stored(s3, "") == {}
        done = push(path, f"s3://{BUCKET}/live.zarr", allow_incomplete=True)
        assert done["status"] == "recording"
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["zarr", "h5"])
def test_file_url_is_a_plain_copy(tmp_path, zarr_trace, h5_trace, kind) -> None:
    src = zarr_trace if kind == "zarr" else h5_trace
    dst = tmp_path / "out" / "deep" / src.name
    push(src, dst.as_uri())
    if kind == "zarr":
        assert local_files(dst) == local_files(src)
    else:
        assert filecmp.cmp(src, dst, shallow=False)
        assert sorted(p.name for p in dst.parent.iterdir()) == [src.name]
    with tracekit.open(dst) as t:
        assert t.status == "complete"
    with pytest.raises(TraceExistsError):
        push(src, dst.as_uri())


def test_a_trace_is_never_pushed_onto_itself(zarr_trace) -> None:
    before = local_files(zarr_trace)
    for target in (zarr_trace, zarr_trace / "inside", zarr_trace.parent):
        with pytest.raises(PushError, match="itself, or inside or around it"):
            push(zarr_trace, target.as_uri(), force=True)
    assert local_files(zarr_trace) == before


def test_memory_url(zarr_trace) -> None:
    import fsspec

    push(zarr_trace, "memory://pushed/t.zarr")
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/pushed/t.zarr/zarr.json") == (zarr_trace / "zarr.json").read_bytes()
    fs.rm("/pushed", recursive=True)


def test_missing_fsspec_names_the_extra(zarr_trace, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(TraceError, match=r"pip install 'tracekit\[remote\]'"):
        push(zarr_trace, "s3://traces/t.zarr")


def test_redact_strips_userinfo_and_signatures() -> None:
    text = ("s3://AKIAX:s3cret@bucket/t.zarr failed; see https://u:p@host/a/b?X-Amz-Signature"
            "=abc&X-Amz-Credential=AKIAX%2F2026 now")
    assert redact(text) == "s3://bucket/t.zarr failed; see https://host/a/b now"


# -- the command line --------------------------------------------------------------------------

def run(*args: str):
    return CliRunner().invoke(main, ["push", *args])


def test_cli_pushes_and_reports(s3, lean_zarr) -> None:
    s3.client().create_bucket(Bucket=BUCKET)
    zarr_trace = lean_zarr
    n = len(local_files(zarr_trace))
    size = tracekit._cliutil.human_bytes(sum(len(b) for b in local_files(zarr_trace).values()))
    result = run(str(zarr_trace), f"s3://{BUCKET}/t.zarr", "--jobs", "3")
    assert result.exit_code == 0, result.output
    assert result.output == (f"pushed {zarr_trace} to s3://{BUCKET}/t.zarr ({n} objects, "
                             f"{size}; verified)\n")
    result = run(str(zarr_trace), f"s3://{BUCKET}/t.zarr")
    assert result.exit_code == 1
    assert result.output == (f"Error: s3://{BUCKET}/t.zarr: a trace already exists there "
                             f"(use --force to replace it)\n")
    result = run(str(zarr_trace), f"s3://{BUCKET}/t.zarr", "--force", "--no-verify")
    assert result.exit_code == 0
    assert result.output == (f"pushed {zarr_trace} to s3://{BUCKET}/t.zarr ({n} objects, "
                             f"{size}, {n - 1} already there; not verified)\n")


def test_cli_errors_are_one_line_without_secrets(proxy, s3, lean_zarr) -> None:
    zarr_trace = lean_zarr
    result = run(str(zarr_trace), "s3://no-such-bucket/t.zarr")
    assert result.exit_code == 1
    assert result.output.startswith("Error: s3://no-such-bucket/t.zarr")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    result = run(str(zarr_trace), "s3://AKIAX:s3cret@traces/t.zarr")
    assert result.exit_code == 1
    assert result.output == ("Error: s3://traces/t.zarr: credentials in a URL are not used "
                             "(they would show in logs); give them through the environment "
                             "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or storage_options\n")
    result = run(str(zarr_trace), f"s3://{BUCKET}")
    assert result.output == (f"Error: s3://{BUCKET}: name the trace's own key or prefix under "
                             f"the bucket (e.g. s3://bucket/traces/lean.zarr)\n")
    result = run(str(zarr_trace), "s3://traces/t.zarr", "--jobs", "0")
    assert result.exit_code == 2


def test_cli_interrupted_says_how_to_resume(lean_zarr, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(push_module, "push", interrupted)
    result = run(str(lean_zarr), "s3://traces/t.zarr")
    assert result.exit_code == 1
    assert result.output == ("Error: interrupted: s3://traces/t.zarr is not a complete trace; "
                             "run the same command again to resume\n")


def test_cli_refuses_a_recording_trace(tmp_path) -> None:
    path = tmp_path / "live.h5"
    writer = tracegen.create_synthetic(path, tracegen.small_plan(), seed=2)
    try:
        tracegen.feed_synthetic(writer, writer.plan, 2, 5, [5])
        writer.flush()
        result = run(str(path), (tmp_path / "out.h5").as_uri())
    finally:
        writer.close()
    assert result.exit_code == 1
    assert result.output == (f"Error: {path}: still being recorded (status 'recording'); wait "
                             f"until it is finalized, or push it anyway with --allow-incomplete\n")
    assert not os.path.exists(tmp_path / "out.h5")
