"""``tracekit push``: upload a finished trace to object storage (or any writable fsspec URL).

A zarr trace is a folder of files; it becomes one object per file under the URL's prefix. An
HDF5 trace or a pack is one file; it becomes one object at the URL. Uploads run concurrently
(``jobs`` objects at a time). On S3 a file of at least 2 x :data:`PART_SIZE` goes up as a
multipart upload, :data:`PARTS_IN_FLIGHT` parts at a time, each read from disk when it is
sent: a multi-GB file is never held in memory (smaller files go up in one request each).

Integrity: the SHA-256 of every local file is computed while pushing; after an object is
uploaded it is read back and its SHA-256 compared (``verify``). This works on every store,
whatever checksums it keeps, and catches corruption anywhere between the local disk and the
stored object. Not a CRC: a zarr chunk file ends in the crc32c of its bytes, and the crc32c of
any such file is one constant (0x48674bc7, the CRC's residue), so a whole-object crc32c (S3's
``ChecksumCRC32C`` included) cannot tell two chunk files of the same size apart.

Crash safety: nothing at the URL looks like a complete trace before the push is complete. A
zarr trace's root ``zarr.json`` (the file that makes a folder a trace) goes up last, after
every other object is uploaded and verified. A single file goes up under a temporary key
(``<url>.partial``), is verified there, and only then is moved to its final key (on S3 a
server-side copy, which creates the object atomically, then a delete of the temporary key; a
local file is renamed). An S3 multipart upload is invisible until completed as well, but
only the temporary key lets the object be verified before anything is at its final key.
Re-running an interrupted push completes it: an object already present with the local file's
size is read back and kept when its SHA-256 is the local one, uploaded again otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TraceError, TraceExistsError, one_line

Progress = Callable[[int, int], None]

#: Part size of multipart uploads (S3). A file under twice this size goes up in one request
#: (s3fs's rule), so at most ``jobs`` x 2 x PART_SIZE bytes are in memory at once.
PART_SIZE = 64 * 2**20
#: Most parts S3 accepts in one multipart upload.
MAX_PARTS = 10_000
#: Parts of one file in flight at once: bounds a multipart file's memory to this x PART_SIZE.
PARTS_IN_FLIGHT = 4
#: Block of the local and read-back digests; objects up to this size are read back in one
#: request.
READ_BLOCK = 8 * 2**20
#: Seconds s3fs waits for an S3 answer (its default, 15, is shorter than a large copy).
S3_READ_TIMEOUT = 900
#: The file that makes a zarr folder a trace: uploaded last.
ROOT_KEY = "zarr.json"
#: Keys a zarr trace's objects have (metadata, chunks with either key encoding): the only
#: stale objects ``force`` removes.
_ZARR_KEY = re.compile(r"^(?:[^/]+/)*(?:zarr\.json|c(?:[./]\d+)*)$")
#: Suffix of the key a single file is uploaded under before it is moved into place.
PARTIAL_SUFFIX = ".partial"

INSTALL_HINT = "pip install 'tracekit[remote]'"


class PushError(TraceError):
    """A push failed (unreachable store, access denied, checksum mismatch); what is at the
    URL does not look like a complete trace, and re-running the push completes it."""


# -- naming URLs without their secrets -------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"(?P<url>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)\?[^\s#]*")


def redact(text: str) -> str:
    """``text`` with every URL's userinfo (``user:secret@``) and query string (pre-signed URLs
    carry their signature and credential there) removed: messages never show credentials."""
    return _QUERY.sub(r"\g<url>", _USERINFO.sub(r"\g<scheme>", text))


# -- what is pushed -------------------------------------------------------------------------

@dataclass
class _File:
    """One local file and the key (relative to the URL) it goes to."""

    path: Path
    key: str
    size: int


def _local_files(src: Path) -> list[_File]:
    """The files of a zarr folder (root ``zarr.json`` last), or the single file ``src``."""
    if src.is_file():
        return [_File(src, "", src.stat().st_size)]
    files: list[_File] = []
    for folder, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                raise PushError(f"{path}: not a regular file (a trace folder holds only files)")
            files.append(_File(path, path.relative_to(src).as_posix(), path.stat().st_size))
        for name in dirs:
            if Path(folder, name).is_symlink():
                raise PushError(f"{Path(folder, name)}: a link (a trace folder holds no links)")
    root = [f for f in files if f.key == ROOT_KEY]
    if not root:
        raise PushError(f"{src}: not a zarr trace (no {ROOT_KEY})")
    return [f for f in files if f.key != ROOT_KEY] + root


def trace_status(src: Path) -> str:
    """The ``status`` of the trace at ``src`` (``recording``, ``complete``, ...), read locally.
    A pack (a zip of a zarr trace) is read through its root ``zarr.json`` member."""
    from .reader import open_or_error

    try:
        with open_or_error(src) as trace:
            return trace.status
    except TraceError:
        if not (src.is_file() and zipfile.is_zipfile(src)):
            raise
    try:
        with zipfile.ZipFile(src) as pack, pack.open(ROOT_KEY) as f:
            meta = json.loads(f.read(2**24))
        return str(meta["attributes"]["tracekit"]["status"])
    except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise PushError(f"{src}: a zip file but not a packed trace ({exc})") from None


def file_digest(path: Path) -> str:
    """SHA-256 of a local file (hex), read in blocks: a multi-GB file is never in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -- the destination ------------------------------------------------------------------------

def _filesystem(url: str, storage_options: dict[str, Any] | None):
    """(fsspec filesystem, path) of ``url``. fsspec is imported only here (the remote extra)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise TraceError(f"pushing to a URL needs fsspec: {INSTALL_HINT}") from None
    try:
        # A fresh filesystem: fsspec's instance cache would keep one made before the
        # environment (endpoint, credentials) changed.
        from fsspec.utils import get_protocol

        options = {"skip_instance_cache": True, **(storage_options or {})}
        if get_protocol(url) in ("s3", "s3a"):
            # s3fs waits 15 s for an answer; a server-side copy of a multi-GB object (the last
            # step of a single-file push) takes longer, and a retry while it runs fails.
            options["config_kwargs"] = {"read_timeout": S3_READ_TIMEOUT,
                                        **options.get("config_kwargs", {})}
        fs, path = url_to_fs(url, **options)
    except ImportError as exc:
        raise TraceError(
            f"{redact(url)}: {one_line(str(exc).splitlines()[0] if str(exc) else 'missing')}"
            f" ({INSTALL_HINT})") from None
    except (ValueError, TypeError) as exc:
        raise PushError(f"{redact(url)}: {redact(str(exc))}") from None
    return fs, path.rstrip("/")


def _is_s3(fs) -> bool:
    return "s3" in _protocols(fs)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _reason(exc: BaseException) -> str:
    """A store error as a short reason, without credentials."""
    if isinstance(exc, FileNotFoundError):
        return "not found (does the bucket exist?)"
    if isinstance(exc, PermissionError):
        return "access denied (check the credentials)"
    return redact(f"{type(exc).__name__}: {exc}")


def _sent_callback(advance: Callable[[int], None]):
    """An fsspec callback passing the bytes a store reports as sent on to ``advance``;
    ``.value`` is their total."""
    from fsspec.callbacks import Callback

    class Sent(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            pass

        def relative_update(self, inc: int = 1) -> None:
            self.value += inc
            advance(inc)

        def absolute_update(self, value: int) -> None:
            self.relative_update(value - self.value)

    return Sent()


class _Push:
    """One push: local files, the destination filesystem, and the bookkeeping between them."""

    def __init__(self, fs, root: str, url: str, files: list[_File], *, single: bool,
                 progress: Progress | None, verify: bool, jobs: int) -> None:
        self.fs, self.root, self.url, self.files = fs, root, url, files
        self.single, self.verify, self.jobs = single, verify, max(1, jobs)
        self._progress = progress
        self._done = 0
        self._total = sum(f.size for f in files) * (2 if verify else 1)
        self._lock = threading.Lock()
        #: Keys in the order their upload finished (tests and curious callers read it).
        self.uploaded: list[str] = []
        self.skipped: list[str] = []

    def remote(self, key: str) -> str:
        """The store path of ``key``: a file under the prefix, or (single file) a suffix."""
        if self.single or not key:
            return self.root + key
        return f"{self.root}/{key}"

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            done = self._done
        if self._progress:
            self._progress(done, self._total)

    # -- store operations, every failure a PushError naming the key without secrets --

    def where(self, key: str) -> str:
        """The URL of ``key``, without credentials."""
        sep = "" if self.single or not key else "/"
        return redact(self.url.rstrip("/") + sep + key)

    def _fail(self, key: str, exc: BaseException) -> PushError:
        return PushError(f"{self.where(key)}: {_reason(exc)}")

    def listing(self) -> dict[str, int]:
        """Keys (relative to the URL) and sizes of the objects already there."""
        try:
            self.fs.invalidate_cache()
            if self.single:
                found = {}
                for key in ("", PARTIAL_SUFFIX):
                    path = self.root + key
                    if self.fs.exists(path) and not self.fs.isdir(path):
                        found[key] = int(self.fs.info(path)["size"])
                return found
            if not self.fs.exists(self.root):
                return {}
            if not self.fs.isdir(self.root):
                raise PushError(f"{redact(self.url)}: an object already exists there "
                                f"(a zarr trace is pushed to a prefix)")
            out = self.fs.find(self.root, detail=True)
        except PushError:
            raise
        except Exception as exc:
            raise self._fail("", exc) from None
        prefix = self.root + "/"
        return {p[len(prefix):]: int(info["size"]) for p, info in out.items()
                if p.startswith(prefix) and info.get("type") != "directory"}

    def remote_digest(self, key: str, size: int) -> str | None:
        """SHA-256 of the stored object (hex), read back; ``"N bytes"`` when a large object's
        size is not ``size``; None when the store's own checksum of it (botocore checks one
        where S3 returns it) does not match its bytes. Objects above READ_BLOCK are read in
        blocks, PARTS_IN_FLIGHT at a time, hashed in order."""
        path, digest = self.remote(key), hashlib.sha256()
        try:
            if size <= READ_BLOCK:  # the whole object, whatever its size
                return hashlib.sha256(self.fs.cat_file(path)).hexdigest()
            stored = int(self.fs.info(path)["size"])
            if stored != size:
                return f"{stored} bytes"
            step = READ_BLOCK * PARTS_IN_FLIGHT
            for lo in range(0, size, step):
                starts = list(range(lo, min(size, lo + step), READ_BLOCK))
                ends = [min(size, s + READ_BLOCK) for s in starts]
                for block in self.fs.cat_ranges([path] * len(starts), starts, ends,
                                                on_error="raise"):
                    digest.update(block)
        except Exception as exc:
            if type(exc).__name__ == "FlexibleChecksumError":
                return None
            raise self._fail(key, exc) from None
        return digest.hexdigest()

    def _differs(self, key: str, detail: str) -> PushError:
        f = self.files[0] if self.single else next(f for f in self.files if f.key == key)
        return PushError(f"{self.where(key)} differs from {f.path} after upload ({detail}); "
                         f"run the push again")

    def put(self, f: _File, key: str) -> None:
        path, options = self.remote(key), {}
        if _is_s3(self.fs):
            part = max(PART_SIZE, -(-f.size // MAX_PARTS))  # S3 takes at most 10,000 parts
            options = {"chunksize": part, "max_concurrency": PARTS_IN_FLIGHT}
        elif "file" in _protocols(self.fs) or "local" in _protocols(self.fs):
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # no auto_mkdir there
        sent = _sent_callback(self.advance)
        try:
            self.fs.put_file(str(f.path), path, callback=sent, **options)
        except Exception as exc:
            raise self._fail(key, exc) from None
        self.advance(f.size - sent.value)  # stores that report no progress, or only part

    def delete(self, keys: list[str]) -> None:
        """Remove objects (S3: up to 1000 per request)."""
        try:
            self.fs.rm([self.remote(key) for key in keys])
        except Exception as exc:
            raise self._fail(keys[0] if keys else "", exc) from None

    # -- one file: skip when already there and equal, else upload; then verify --

    def send(self, f: _File, key: str, present: int | None) -> None:
        local = file_digest(f.path)
        if present == f.size and self.remote_digest(key, f.size) == local:
            with self._lock:
                self.skipped.append(key)
            self.advance(f.size * (2 if self.verify else 1))
            return
        self.put(f, key)
        if self.verify:
            got = self.remote_digest(key, f.size)
            if got is None:
                raise self._differs(key, "the store's own checksum does not match its bytes")
            if got != local:
                raise self._differs(key, f"sha256 {got[:16]}..., expected {local[:16]}..."
                                    if len(got) == len(local) else f"{got}, expected {f.size}")
            self.advance(f.size)
        with self._lock:
            self.uploaded.append(key)

    def send_all(self, items: list[tuple[_File, str, int | None]]) -> None:
        """Send ``items`` concurrently; the first failure cancels what has not started."""
        if not items:
            return
        pool = ThreadPoolExecutor(min(self.jobs, len(items)))
        try:
            futures = [pool.submit(self.send, *item) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and not fut.cancelled() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
        finally:  # on failure or Ctrl-C, start nothing more; let running uploads end
            pool.shutdown(wait=True, cancel_futures=True)


def push(src: str | os.PathLike[str], url: str, storage_options: dict[str, Any] | None = None,
         progress: Progress | None = None, jobs: int = 8, verify: bool = True, *,
         force: bool = False, allow_incomplete: bool = False) -> dict[str, Any]:
    """Upload the trace ``src`` (a zarr folder, an HDF5 file, a pack) to ``url`` (``s3://``,
    ``gs://``, ``az://``, ``file://``, any writable fsspec URL). Returns a summary: ``url``
    (without credentials), ``objects``, ``bytes``, ``uploaded`` and ``skipped`` (keys, in the
    order their upload finished; the root ``zarr.json`` last), ``verified``.

    Refuses a trace still being recorded (``allow_incomplete`` to push it anyway) and an
    existing trace at ``url`` (``force`` to replace it). ``storage_options`` go to fsspec
    (endpoint, credentials, ...); without them s3fs/botocore take them from the usual places
    (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``)."""
    if _USERINFO.search(url):
        raise PushError(f"{redact(url)}: credentials in a URL are not used (they would show in "
                        f"logs); give them through the environment (AWS_ACCESS_KEY_ID, "
                        f"AWS_PROFILE, ...) or storage_options")
    src = Path(src)
    if not src.exists():
        raise PushError(f"{src}: no such file or folder")
    status = trace_status(src)
    if status == "recording" and not allow_incomplete:
        raise PushError(f"{src}: still being recorded (status 'recording'); wait until it is "
                        f"finalized, or push it anyway with --allow-incomplete")
    files = _local_files(src)
    single = src.is_file()
    fs, root = _filesystem(url, storage_options)
    local = {"file", "local"} & set(_protocols(fs))
    if not root.strip("/") or (not local and "/" not in root.strip("/")):
        raise PushError(f"{redact(url)}: name the trace's own key or prefix under the bucket "
                        f"(e.g. s3://bucket/traces/{src.name})")
    if local and _overlaps(Path(root), src):
        raise PushError(f"{redact(url)}: is {src} itself, or inside or around it")
    job = _Push(fs, root, url, files, single=single, progress=progress, verify=verify,
                jobs=jobs)
    present = job.listing()
    final_key = "" if single else ROOT_KEY
    if final_key in present and not force:
        raise TraceExistsError(f"{redact(url)}: a trace already exists there "
                               f"(use --force to replace it)")
    if single:
        _push_single(job, files[0], present)
    else:
        _push_folder(job, files, present, force)
    return {"url": redact(url), "objects": len(files), "bytes": sum(f.size for f in files),
            "uploaded": job.uploaded, "skipped": job.skipped, "verified": verify,
            "status": status}


def _overlaps(a: Path, b: Path) -> bool:
    """Whether one of two local paths is the other or inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _push_single(job: _Push, f: _File, present: dict[str, int]) -> None:
    """Upload under ``<url>.partial``, verify there, then move into place."""
    job.send(f, PARTIAL_SUFFIX, present.get(PARTIAL_SUFFIX))
    try:
        job.fs.mv(job.remote(PARTIAL_SUFFIX), job.root)
        job.fs.invalidate_cache()
        size = int(job.fs.info(job.root)["size"])
    except Exception as exc:
        raise job._fail("", exc) from None
    if size != f.size:
        raise PushError(f"{redact(job.url)}: {size} bytes after the move, expected {f.size}")
    # Name the object by its final key in the summary.
    job.uploaded = [""] * len(job.uploaded)
    job.skipped = [""] * len(job.skipped)


def _push_folder(job: _Push, files: list[_File], present: dict[str, int], force: bool) -> None:
    """Every file but the root ``zarr.json`` concurrently, then the root alone."""
    local = {f.key for f in files}
    stale = sorted(set(present) - local)
    foreign = [k for k in stale if not _ZARR_KEY.match(k)]
    if foreign:  # never deleted, even with --force: the URL may name someone's folder
        raise PushError(
            f"{redact(job.url)}: holds {len(foreign)} object(s) that are not part of a zarr "
            f"trace (e.g. {foreign[0]}); push to a prefix of its own")
    if stale and not force:
        raise PushError(
            f"{redact(job.url)}: holds {len(stale)} object(s) that are not part of this trace "
            f"(e.g. {stale[0]}); use --force to replace them")
    if ROOT_KEY in present:  # --force: from here on the prefix is no longer a complete trace
        job.delete([ROOT_KEY])
        del present[ROOT_KEY]
    if stale:
        job.delete(stale)
    *body, root = files
    job.send_all([(f, f.key, present.get(f.key)) for f in body])
    try:
        job.send(root, root.key, None)
    except PushError:
        _discard_root(job)
        raise


def _discard_root(job: _Push) -> None:
    """Remove a root ``zarr.json`` that failed verification, so the prefix does not look like
    a complete trace (best effort: the push fails either way)."""
    with contextlib.suppress(Exception):  # the original failure is what the user must see
        job.fs.rm_file(job.remote(ROOT_KEY))
