"""A threaded HTTP server on loopback that logs every request and injects faults on demand: the
common part of the test servers in ``servers.py`` (the file server and the S3 fault proxy).

Each request is logged (method, path, query, Range, when it arrived and was answered, status,
whether it uploads an object's bytes); the server counts the body bytes it sent and the most
requests it served at once. A fault (see :data:`FAULT_KINDS`) answers the requests whose path
matches a glob, optionally only object uploads and only after letting some through.
"""

from __future__ import annotations

import contextlib
import fnmatch
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Faults a server can inject: an HTTP status, a body cut short (Content-Length promises more,
#: then the connection closes), a connection reset (TCP RST), a delay before answering, an
#: upload corrupted (one byte of the request body flipped before it is forwarded; proxy only).
FAULT_KINDS = ("status", "truncate", "reset", "delay", "corrupt")


@dataclass
class Fault:
    """What to break. ``match``: a glob on the request path; ``times``: how many requests to
    break; ``after``: matching requests to let through first; ``uploads``: only object uploads
    match (always so for ``corrupt``); ``status``/``seconds``: of a status/delay fault;
    ``drop_checksum``: a corrupted upload also loses the checksum its client sent
    (``x-amz-checksum-*``), as a store that keeps none would, so only a read-back can notice."""

    kind: str
    match: str = "*"
    times: int = 1
    status: int = 503
    seconds: float = 0.0
    after: int = 0
    uploads: bool = False
    drop_checksum: bool = False


@dataclass
class Request:
    """One request a server saw: method, path (unquoted; ``/bucket/key`` through the proxy),
    query, Range header, when it arrived and when it was answered (``time.monotonic()``; the
    answer counts from when the response was ready, before the client could have it), the
    status answered (0: none, the connection was dropped), and whether it is an object upload
    (an object's bytes or a part of them; not a server-side copy, not a bucket)."""

    method: str
    path: str
    query: str = ""
    range: str | None = None
    started: float = 0.0
    ended: float = 0.0
    status: int = 0
    upload: bool = False


@dataclass
class ServerStats:
    """What a loopback server saw: every request in the order it arrived, the body bytes it
    sent, and the most requests it served at the same time."""

    requests: list[Request] = field(default_factory=list)
    bytes_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def count(self) -> int:
        return len(self.requests)

    def uploads(self) -> list[Request]:
        """The object uploads the store accepted (200), in the order they arrived."""
        return [r for r in self.requests if r.upload and r.status == 200]


class _Dropped(Exception):
    """The handler closed the connection on purpose (a fault)."""


class FaultHandler(BaseHTTPRequestHandler):
    """Shared request handling: latency, faults, logging, counting. Subclasses answer
    :meth:`respond` with (status, headers, body); ``self.body`` is the request's body (after a
    ``corrupt`` fault), ``self.fault`` the fault applied (or None)."""

    protocol_version = "HTTP/1.1"
    server: _FaultyHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def handle(self) -> None:
        with contextlib.suppress(_Dropped, ConnectionError, TimeoutError):
            super().handle()

    def _serve(self) -> None:
        owner = self.server.owner
        parts = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else None  # read before any fault
        request = Request(self.command, urllib.parse.unquote(parts.path), parts.query,
                          self.headers.get("Range"), time.monotonic())
        request.upload = owner.is_upload(request, self.body)
        with owner.lock:
            owner.stats.requests.append(request)
            owner.stats.in_flight += 1
            owner.stats.max_in_flight = max(owner.stats.max_in_flight, owner.stats.in_flight)
        try:
            if owner.latency:
                time.sleep(owner.latency)
            self.fault = fault = owner.take_fault(request)
            kind = fault.kind if fault is not None else None
            if kind == "delay":
                time.sleep(fault.seconds)
            if kind == "reset":
                request.ended = time.monotonic()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self._drop()
            if kind == "corrupt" and self.body:
                middle = len(self.body) // 2
                self.body = (self.body[:middle] + bytes([self.body[middle] ^ 0x01])
                             + self.body[middle + 1:])
            if kind == "status":
                body = owner.error_body(fault.status)
                status, headers = fault.status, {"Content-Type": "application/xml"}
            else:
                status, headers, body = self.respond()
            request.ended, request.status = time.monotonic(), status
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:  # (a proxied HEAD keeps the upstream one)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if kind == "truncate" and body:
                body = body[: len(body) // 2]
            with owner.lock:  # counted before sending: a client may be done before we are
                owner.stats.bytes_sent += len(body)
            self.wfile.write(body)
            if kind == "truncate":
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
    owner: LoopbackServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (time-out tests) is expected


class LoopbackServer:
    """A threaded HTTP server on a free port of 127.0.0.1 (``url``) with a request log and
    counters (``stats``) and injectable faults. ``latency``: seconds added to every request."""

    handler: type[FaultHandler]

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
               seconds: float = 0.0, *, after: int = 0, uploads: bool = False,
               drop_checksum: bool = False) -> None:
        """Break the ``times`` requests whose path matches the glob ``match`` that come after
        the first ``after`` such ones, only object uploads if ``uploads``, with a fault of
        ``kind`` (see FAULT_KINDS and :class:`Fault`). Faults apply in the order injected."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self.lock:
            self._faults.append(Fault(kind, match, times, status, seconds, after,
                                      uploads or kind == "corrupt", drop_checksum))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def take_fault(self, request: Request) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if not fnmatch.fnmatchcase(request.path, fault.match) or (
                        fault.uploads and not request.upload):
                    continue
                if fault.after > 0:
                    fault.after -= 1  # this one goes through (unless another fault takes it)
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def is_upload(self, request: Request, body: bytes | None) -> bool:
        """Whether ``request`` uploads an object's bytes (only the S3 proxy sees any)."""
        return False

    def reset_stats(self) -> ServerStats:
        """The log and counters so far, and empty ones from now on."""
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
