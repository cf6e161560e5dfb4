"""Real servers on loopback for the remote-trace tests, started and stopped by the tests.

``HTTPFileServer``: serves a folder over HTTP with byte ranges; ``FaultProxy``: a reverse proxy
(in front of the S3 server) adding latency. Both count requests and bytes and inject faults on
demand (HTTP status, truncated body, connection reset, delay).

``S3Server``: moto's S3-protocol server in its own process (``moto_server``), on a free port of
127.0.0.1. Tests point tracekit at it through ``AWS_ENDPOINT_URL`` and dummy credentials, the
standard places a user's own endpoint and keys come from.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Dummy credentials moto accepts (never real ones: the server is a local process).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class S3Server:
    """moto's S3 server on loopback. ``endpoint``: its URL; :meth:`env` the variables that
    point boto/s3fs (and so tracekit) at it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()",
             "-H", "127.0.0.1", "-p", str(self.port)] if not os.path.exists(exe) else
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, proc=self._proc)
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        """A boto3 client of this server (to create buckets and inspect objects)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]})

    def reset(self) -> None:
        """Forget every bucket (moto's reset endpoint), between tests."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10).close()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


# -- HTTP file server and fault proxy ---------------------------------------------------------


#: Faults a server can inject: an HTTP status, a body cut short (Content-Length promises more,
#: then the connection closes), a connection reset (TCP RST), a delay before answering.
FAULT_KINDS = ("status", "truncate", "reset", "delay")


@dataclass
class Fault:
    kind: str
    match: str = "*"
    times: int = 1
    status: int = 503
    seconds: float = 0.0


@dataclass
class ServerStats:
    """What a loopback server saw: every request (method, path, Range header), the body bytes
    it sent, and the most requests it served at the same time."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    bytes_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def count(self) -> int:
        return len(self.requests)


class _Dropped(Exception):
    """The handler closed the connection on purpose (a fault)."""


class _FaultHandler(BaseHTTPRequestHandler):
    """Shared request handling: latency, faults, counting. Subclasses answer
    :meth:`respond` with (status, headers, body)."""

    protocol_version = "HTTP/1.1"
    server: _FaultyHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def handle(self) -> None:
        with contextlib.suppress(_Dropped, ConnectionError, TimeoutError):
            super().handle()

    def _serve(self) -> None:
        owner = self.server.owner
        path = urllib.parse.urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else None  # read before any fault
        with owner.lock:
            owner.stats.requests.append((self.command, path, self.headers.get("Range")))
            owner.stats.in_flight += 1
            owner.stats.max_in_flight = max(owner.stats.max_in_flight, owner.stats.in_flight)
        try:
            if owner.latency:
                time.sleep(owner.latency)
            fault = owner.take_fault(path)
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self._drop()
            if fault is not None and fault.kind == "status":
                body = owner.error_body(fault.status)
                status, headers = fault.status, {"Content-Type": "application/xml"}
            else:
                status, headers, body = self.respond()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:  # (a proxied HEAD keeps the upstream one)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault is not None and fault.kind == "truncate" and body:
                body = body[: len(body) // 2]
            with owner.lock:  # counted before sending: a client may be done before we are
                owner.stats.bytes_sent += len(body)
            self.wfile.write(body)
            if fault is not None and fault.kind == "truncate":
                self._drop()
        finally:
            with owner.lock:
                owner.stats.in_flight -= 1

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        raise _Dropped

    def respond(self) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _serve


class _FaultyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # many concurrent connections (the default backlog is 5)
    owner: _LoopbackServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (time-out tests) is expected


class _LoopbackServer:
    """A threaded HTTP server on a free port of 127.0.0.1 with counters and injectable
    faults. ``latency``: seconds added to every request."""

    handler: type[_FaultHandler]

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.stats = ServerStats()
        self._faults: list[Fault] = []
        self._server = _FaultyHTTPServer(("127.0.0.1", 0), self.handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def inject(self, kind: str, match: str = "*", times: int = 1, status: int = 503,
               seconds: float = 0.0) -> None:
        """Answer the next ``times`` requests whose path matches the glob ``match`` with a
        fault (see FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self.lock:
            self._faults.append(Fault(kind, match, times, status, seconds))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fnmatch.fnmatchcase(path, fault.match):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def reset_stats(self) -> ServerStats:
        """The counters so far, and zero ones from now on."""
        with self.lock:
            old, self.stats = self.stats, ServerStats()
        return old

    def error_body(self, status: int) -> bytes:
        return f"HTTP {status}".encode()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _FileHandler(_FaultHandler):
    def respond(self) -> tuple[int, dict[str, str], bytes]:
        root: Path = self.server.owner.root  # type: ignore[attr-defined]
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        target = (root / rel).resolve()
        if (root not in target.parents and target != root) or not target.is_file():
            return 404, {}, b"not found"
        size = target.stat().st_size
        spec = self.headers.get("Range")
        if spec is None or "," in spec or not spec.startswith("bytes=") or \
                self.server.owner.ignore_ranges:  # type: ignore[attr-defined]
            return 200, {"Accept-Ranges": "bytes"}, target.read_bytes()
        first, _, last = spec.removeprefix("bytes=").partition("-")
        if first == "":  # the last N bytes
            start, end = max(0, size - int(last)), size
        else:
            start, end = int(first), min(size, int(last) + 1 if last else size)
        if start >= size:
            return 416, {"Content-Range": f"bytes */{size}"}, b""
        with open(target, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        return 206, {"Content-Range": f"bytes {start}-{end - 1}/{size}"}, body


class HTTPFileServer(_LoopbackServer):
    """Serves the files under ``root`` (no directory listings), honouring single byte ranges
    (206 with Content-Range, 416 past the end) unless ``ignore_ranges``."""

    handler = _FileHandler

    def __init__(self, root: str | os.PathLike[str], latency: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.ignore_ranges = False  # True: answer every GET with the whole file (200)
        super().__init__(latency)


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length"}


class _ProxyHandler(_FaultHandler):
    def respond(self) -> tuple[int, dict[str, str], bytes]:
        owner: FaultProxy = self.server.owner  # type: ignore[assignment]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=self.body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            headers = {k: v for k, v in r.getheaders() if k.lower() not in _HOP_BY_HOP}
            if self.command == "HEAD" and r.getheader("Content-Length") is not None:
                headers["Content-Length"] = r.getheader("Content-Length")
            return r.status, headers, data
        finally:
            conn.close()


class FaultProxy(_LoopbackServer):
    """A reverse proxy in front of ``upstream`` (e.g. the moto S3 server) that adds
    ``latency`` seconds to each request, counts requests and bytes, and injects the same faults
    as HTTPFileServer (status answers carry an S3 error document)."""

    handler = _ProxyHandler

    def __init__(self, upstream: str, latency: float = 0.0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        super().__init__(latency)

    def error_body(self, status: int) -> bytes:
        code = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError",
                503: "SlowDown"}.get(status, "InternalError")
        return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected</Message></Error>").encode()
