"""Traces on HTTP(S) and object stores (``s3://``, ``gs://``, ``az://``, any fsspec URL): a
:class:`~tracekit.storage._source.Source` over fsspec.

Every read is one ranged request for exactly the bytes asked for (no read-ahead blocks, no
directory listings); the reads of one :meth:`RemoteSource.fetch` go out concurrently on one
event loop (fsspec's), at most ``concurrency`` at a time. Each attempt is bounded by connect
and read time-outs; 5xx, 429, time-outs, resets and truncated bodies are retried with
exponential backoff and jitter, then reported as one-line :class:`RemoteError`; 401/403 and
missing credentials are :class:`RemoteAccessError`; 404 is an absent key. Messages name the
URL without credentials. fsspec, aiohttp and s3fs are imported here only, when a URL is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from ..errors import CorruptTraceError, RemoteAccessError, RemoteError
from ._remote_cache import DEFAULT_CACHE_BYTES, RangeCache
from ._remote_errors import (
    ABSENT,
    ACCESS,
    EMPTY,
    FATAL,
    HTTPStatusError,
    Redactor,
    ServerProtocolError,
    classify,
    public_url,
)
from ._source import Read, Source

T = TypeVar("T")

#: Defaults of the options tracekit takes out of ``storage_options`` (not passed to fsspec).
DEFAULTS: dict[str, float] = {"connect_timeout": 10.0, "read_timeout": 30.0, "retries": 4,
                              "concurrency": 64}
#: The slowest transfer an attempt is allowed, on top of the time-outs (a stalled body is
#: caught by the read time-out first; this only bounds libraries that have none).
_MIN_RATE = 256 * 1024
_HTTP = ("http", "https")


def _require(module: str, url: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RemoteError(f"reading {public_url(url)} needs the remote-access packages "
                          f"({exc.name or module} is missing): pip install 'tracekit[remote]'"
                          ) from None


def open_remote(url: str, storage_options: dict[str, Any] | None = None,
                cache_dir: str | os.PathLike[str] | None = None,
                cache_bytes: int | None = None, *, connect_timeout: float | None = None,
                read_timeout: float | None = None, retries: int | None = None,
                concurrency: int | None = None) -> RemoteSource:
    """A Source over the trace at ``url`` (a zarr folder or a single HDF5/pack file).

    ``storage_options`` go to the fsspec filesystem (``anon``, ``key``, ``secret``,
    ``endpoint_url``, ``headers``, ...), except tracekit's own ``connect_timeout``,
    ``read_timeout`` (seconds), ``retries`` (attempts per request) and ``concurrency``
    (requests in flight), which the keyword arguments override. ``cache_dir``: keep the bytes
    read there, at most ``cache_bytes`` (1 GiB by default), so reading them again is free."""
    options = dict(storage_options or {})
    settings = {name: options.pop(name, default) for name, default in DEFAULTS.items()}
    for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout),
                        ("retries", retries), ("concurrency", concurrency)):
        if value is not None:
            settings[name] = value
    for name, value in settings.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise RemoteError(f"{name} must be a positive number, not {value!r}")
    cache = None
    if cache_dir is not None:
        if cache_bytes is not None and cache_bytes <= 0:
            raise RemoteError(f"cache_bytes must be positive, not {cache_bytes}")
        try:
            cache = RangeCache(cache_dir, cache_bytes or DEFAULT_CACHE_BYTES)
        except OSError as exc:
            raise RemoteError(f"cache folder {cache_dir}: {os.strerror(exc.errno or 0)}"
                              ) from None
    return RemoteSource(url, options, settings, cache, storage_options)


class RemoteSource(Source):
    """A trace behind a URL. The empty key is the URL itself (a single-file trace); other keys
    are paths under it (a folder trace)."""

    remote = True

    def __init__(self, url: str, options: dict[str, Any], settings: dict[str, float],
                 cache: RangeCache | None, given_options: dict[str, Any] | None) -> None:
        _require("fsspec.asyn", url)  # the event loop and its sync helper
        self._fsspec = _require("fsspec", url)
        self.location = public_url(url)
        self._redact = Redactor(url, given_options)
        self._connect = float(settings["connect_timeout"])
        self._read_timeout = float(settings["read_timeout"])
        self._tries = max(1, int(settings["retries"]))
        self._concurrency = max(1, int(settings["concurrency"]))
        self._cache = cache
        self._pool: ThreadPoolExecutor | None = None
        self._sem: asyncio.Semaphore | None = None
        parts = urlsplit(url)
        self.protocol = parts.scheme.lower() if "::" not in url else url.split("::")[-1].split(
            "://")[0]
        try:
            if self.protocol in _HTTP and "::" not in url:
                self._init_http(url, parts, options)
            else:
                self._init_fsspec(url, options)
        except RemoteError:
            raise
        except ImportError as exc:  # fsspec knows the protocol, its package is missing
            raise RemoteError(f"{self.location}: {self._redact(str(exc))}") from None
        except Exception as exc:  # an unknown protocol, bad storage_options
            text = self._redact(f"{type(exc).__name__}: {exc}")
            raise RemoteError(f"{self.location}: cannot open ({text})") from None

    # -- set-up -------------------------------------------------------------------------------

    def _init_http(self, url: str, parts: Any, options: dict[str, Any]) -> None:
        aiohttp = _require("aiohttp", url)
        client_kwargs = dict(options.pop("client_kwargs", None) or {})
        client_kwargs.setdefault("timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect, sock_read=self._read_timeout))
        self._fs = self._fsspec.filesystem("http", skip_instance_cache=True,
                                           client_kwargs=client_kwargs, **options)
        self._loop = self._fs.loop
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._query = parts.query
        self._is_async = True
        self._attempt_range = self._http_range
        self._attempt_size = self._http_size

    def _init_fsspec(self, url: str, options: dict[str, Any]) -> None:
        if self.protocol in ("s3", "s3a"):
            _require("s3fs", url)
            config = dict(options.pop("config_kwargs", None) or {})
            config.setdefault("connect_timeout", self._connect)
            config.setdefault("read_timeout", self._read_timeout)
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})  # ours
            config.setdefault("max_pool_connections", self._concurrency)
            options["config_kwargs"] = config
        options.setdefault("skip_instance_cache", True)
        fs, path = self._fsspec.core.url_to_fs(url, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retry loop: tracekit's replaces it
        self._fs, self._root = fs, str(path).rstrip("/")
        self._is_async = bool(getattr(fs, "async_impl", False))
        self._loop = fs.loop if self._is_async else self._fsspec.asyn.get_loop()
        if not self._is_async:
            self._pool = ThreadPoolExecutor(min(self._concurrency, 32),
                                            thread_name_prefix="tracekit-remote")
        self._attempt_range = self._fs_range
        self._attempt_size = self._fs_size

    # -- one attempt of each request ----------------------------------------------------------

    def _url(self, key: str) -> str:
        url = f"{self._base}/{quote(key, safe='/')}" if key else self._base
        return f"{url}?{self._query}" if self._query else url

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    async def _http_get(self, key: str, first: int, last: int) -> Any:
        """A GET of bytes ``first..last`` of ``key`` with the filesystem's own request options
        (headers, auth), uncompressed (a ``Content-Length`` must count the object's bytes)."""
        import yarl

        session = await self._fs.set_session()
        kwargs = dict(self._fs.kwargs)
        headers = dict(kwargs.pop("headers", None) or {})
        headers.update({"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"})
        return session.get(yarl.URL(self._url(key), encoded=True), headers=headers, **kwargs)

    async def _http_range(self, key: str, start: int, end: int) -> bytes | None:
        async with await self._http_get(key, start, end - 1) as r:
            if r.status == 206:
                first = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if first.strip() != str(start):
                    raise ServerProtocolError("the server answered another range than asked")
                data = await r.read()
                if len(data) > end - start:
                    raise ServerProtocolError("the server sent more bytes than the range asked")
                return data
            if r.status == 200:  # the server ignores Range: read no further than needed
                data = bytearray()
                while len(data) < end:
                    piece = await r.content.read(end - len(data))
                    if not piece:
                        break
                    data += piece
                return bytes(data[start:end])
            if r.status in (404, 410):
                return None
            if r.status == 416:
                return b""
            raise HTTPStatusError(r.status, r.reason or "")

    async def _http_size(self, key: str) -> int | None:
        """The size from a one-byte ranged GET (``Content-Range: bytes 0-0/N``): unlike HEAD it
        works with pre-signed URLs, which sign the method."""
        async with await self._http_get(key, 0, 0) as r:
            if r.status in (404, 410):
                return None
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if r.status in (206, 416) and total.isdigit():
                return int(total)
            length = r.headers.get("Content-Length")
            if r.status == 200 and length is not None and length.isdigit() and \
                    r.headers.get("Content-Encoding", "identity") == "identity":
                return int(length)  # the server ignores Range; its body is left unread
            if r.status in (200, 206, 416):
                raise ServerProtocolError("the server gives no object size")
            raise HTTPStatusError(r.status, r.reason or "")

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._is_async:
            return await getattr(self._fs, f"_{method}")(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(getattr(self._fs, method),
                                                              *args, **kwargs))

    async def _fs_range(self, key: str, start: int, end: int) -> bytes | None:
        return await self._call("cat_file", self._path(key), start=start, end=end)

    async def _fs_size(self, key: str) -> int | None:
        info = await self._call("info", self._path(key))
        if info.get("type") == "directory" or info.get("size") is None:
            return None
        return int(info["size"])

    async def _fs_list(self, prefix: str) -> list[str]:
        path = self._path(prefix.strip("/"))
        self._fs.invalidate_cache(path)
        names = await self._call("ls", path, detail=False)
        path = path.rstrip("/")
        out = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in names
               if str(n).rstrip("/") != path}  # a file lists as itself
        out.discard("")
        return sorted(out)

    # -- retries --------------------------------------------------------------------------------

    async def _retrying(self, key: str, attempt: Callable[[], Awaitable[T]], nbytes: int,
                        absent: Any = None, empty: Any = b"") -> T:
        """``attempt()`` until it succeeds, a bounded number of times; classified failures
        become ``absent``/``empty`` results or one-line errors naming ``key``."""
        bound = self._connect + self._read_timeout + min(nbytes, 1 << 30) / _MIN_RATE
        for i in range(self._tries):
            try:
                return await asyncio.wait_for(attempt(), bound)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = classify(exc, self.protocol)
                if failure.kind == ABSENT:
                    return absent
                if failure.kind == EMPTY:
                    return empty
                text = self._redact(failure.text)
                if failure.kind == ACCESS:
                    raise RemoteAccessError(f"{self.describe(key)}: {text}") from None
                if failure.kind == FATAL:
                    raise RemoteError(f"{self.describe(key)}: {text}") from None
                if i == self._tries - 1:
                    if text == "timed out":
                        text = (f"timed out (connect {self._connect:g} s, read "
                                f"{self._read_timeout:g} s)")
                    raise RemoteError(f"{self.describe(key)}: {text} after {self._tries} "
                                      f"tries") from None
                await asyncio.sleep(min(4.0, 0.1 * 2 ** i) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _run(self, coro: Awaitable[T]) -> T:
        return self._fsspec.asyn.sync(self._loop, lambda: coro)

    async def _gather(self, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """Every job, at most ``concurrency`` in flight (over all threads' calls); the first
        error once all have finished."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._concurrency)  # on the loop's own thread
        sem = self._sem

        async def one(job: Callable[[], Awaitable[T]]) -> T:
            async with sem:
                return await job()

        results = await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def _range(self, key: str, start: int, end: int) -> Callable[[], Awaitable[bytes | None]]:
        return lambda: self._retrying(key, lambda: self._attempt_range(key, start, end),
                                      end - start)

    # -- Source ---------------------------------------------------------------------------------

    def get(self, key: str, cap: int) -> bytes | None:
        data = self._run(self._range(key, 0, cap + 1)())
        if data is not None and len(data) > cap:
            raise CorruptTraceError(f"{self.describe(key)} is larger than the limit of {cap} "
                                    f"bytes")
        return data

    def fetch(self, reads: Sequence[Read]) -> None:
        plans = []  # (read, end asked, whether the object's size is checked, cache entry)
        jobs = []
        for read in reads:
            n = read.out.nbytes
            check = read.whole is not None and read.offset + n >= read.whole
            end = read.offset + n + 1 if check or n == 0 else read.offset + n
            name = None
            if self._cache is not None:
                name = self._cache.entry_name(self.location, read.key, read.offset,
                                              end - read.offset, read.whole if check else None)
                data = self._cache.get(name)
                if data is not None and self._apply(read, data, check):
                    continue
            plans.append((read, check, name))
            jobs.append(self._range(read.key, read.offset, end))
        if not jobs:
            return
        results = self._run(self._gather(jobs))
        for (read, check, name), data in zip(plans, results, strict=True):
            if data is None:
                read.found = False
                continue
            self._apply(read, data, check, strict=True)
            if name is not None:
                self._cache.put(name, data)  # type: ignore[union-attr]

    def _apply(self, read: Read, data: bytes, check: bool, strict: bool = False) -> bool:
        """Copy ``data`` (the bytes asked for, plus one when ``check``) into ``read.out``.
        A short or oversized answer is a CorruptTraceError when ``strict`` (from the server),
        False otherwise (from the cache: fetched again)."""
        n = read.out.nbytes
        got = len(data)
        problem = None
        if check and got > n:
            problem = (f"chunk {self.describe(read.key)} has more than {read.whole} bytes, "
                       f"expected {read.whole} (corrupt)")
        elif check and read.offset + got != read.whole:
            problem = (f"chunk {self.describe(read.key)} has {read.offset + got} bytes, "
                       f"expected {read.whole} (truncated or corrupt)")
        elif got < n:
            problem = (f"{self.describe(read.key)} is truncated ({read.offset + got} bytes, "
                       f"reading {n} from {read.offset})")
        if problem is not None:
            if strict:
                raise CorruptTraceError(problem)
            return False
        if n:
            memoryview(read.out).cast("B")[:n] = data[:n]
        return True

    def size(self, key: str) -> int | None:
        return self.sizes([key])[0]

    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        jobs = [partial(self._retrying, k, partial(self._attempt_size, k), 0, None, None)
                for k in keys]
        return self._run(self._gather(jobs))

    def list(self, prefix: str = "") -> list[str] | None:
        if self._attempt_range == self._http_range:
            return None  # plain HTTP has no listing (HTML index pages are not one)
        return self._run(self._retrying(prefix, partial(self._fs_list, prefix), 0,
                                        absent=[]))

    def close(self) -> None:
        fs = getattr(self, "_fs", None)
        with contextlib.suppress(Exception):
            if getattr(fs, "_session", None) is not None:  # HTTP
                type(fs).close_session(self._loop, fs._session)
                fs._session = None
            elif getattr(fs, "_s3", None) is not None:  # S3
                type(fs).close_session(self._loop, fs._s3)
                fs._s3 = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
