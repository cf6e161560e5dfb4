"""An HTTP proxy on loopback in front of the test S3 server that logs requests and injects
faults: refuse the Nth object upload, or flip one byte of an upload on its way to the store.

Clients are pointed at it through ``AWS_ENDPOINT_URL`` exactly as at the server itself. Each
request is forwarded on a fresh connection and the whole response relayed.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied (injected)</Message></Error>")


@dataclass
class Request:
    """One request the proxy saw: method, object path (``/bucket/key``), query, times, status."""

    method: str
    path: str
    query: str
    started: float
    ended: float = 0.0
    status: int = 0
    upload: bool = False  #: an object's bytes (or a part of them), not a copy or a bucket


@dataclass
class Faults:
    """What to break. ``refuse_upload``: the number (1-based) of the object upload (PUT) to
    answer with AccessDenied. ``corrupt``: a key suffix whose first upload gets one byte
    flipped before it reaches the store. ``drop_checksum``: also remove the checksum the
    client sent with that upload (``x-amz-checksum-*``), as a store that keeps none would, so
    nothing but the pusher's own check can notice."""

    refuse_upload: int | None = None
    corrupt: str | None = None
    drop_checksum: bool = False
    uploads: int = 0
    corrupted: list[str] = field(default_factory=list)


class FaultProxy:
    """The proxy; ``endpoint`` is its URL, ``log`` the requests it relayed, ``faults`` what it
    breaks (change it between pushes)."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.faults = Faults()
        self.log: list[Request] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                record = Request(self.command, path, parts.query, time.monotonic())
                with proxy._lock:
                    proxy.log.append(record)
                    refuse, tampered = proxy._tamper(self.command, path, self.path, body)
                drop = tampered != body and proxy.faults.drop_checksum
                body = tampered
                if refuse:
                    status, headers, data = 403, [("Content-Type", "application/xml")], _DENIED
                else:
                    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                    try:
                        fwd = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_HEADERS and k.lower() != "expect"
                               and not (drop and k.lower().startswith("x-amz-checksum-"))}
                        conn.request(self.command, self.path, body=body, headers=fwd)
                        resp = conn.getresponse()
                        data = resp.read()
                        status, headers = resp.status, resp.getheaders()
                    finally:
                        conn.close()
                record.ended, record.status = time.monotonic(), status  # the store answered
                head = self.command == "HEAD"  # its Content-Length is the object's: keep it
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP_HEADERS and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _tamper(self, method: str, path: str, raw: str, body: bytes) -> tuple[bool, bytes]:
        """(refuse?, body to forward) for one request; called under the lock."""
        is_object = path.count("/") >= 2  # /bucket/key, not /bucket
        if not (method == "PUT" and is_object and (body or "partNumber" in raw)):
            return False, body
        self.log[-1].upload = True
        self.faults.uploads += 1
        if self.faults.refuse_upload == self.faults.uploads:
            return True, body
        target = self.faults.corrupt
        if target and path.endswith(target) and target not in self.faults.corrupted:
            self.faults.corrupted.append(target)
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1:]
        return False, body

    def uploads(self) -> list[Request]:
        """Object uploads the store accepted, in the order they were sent."""
        return [r for r in self.log if r.upload and r.status == 200]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
