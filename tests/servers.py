"""Real servers on loopback for the remote-trace and push tests, started and stopped by the tests.

``HTTPFileServer``: serves a folder over HTTP with byte ranges; ``FaultProxy``: a reverse proxy
(in front of the S3 server) adding latency. Both log every request, count bytes and inject
faults on demand (HTTP status, truncated body, connection reset, delay; the proxy also refuses
or corrupts object uploads): see ``loopback.py``.

``S3Server``: moto's S3-protocol server in its own process (``moto_server``), on a free port of
127.0.0.1. Tests point tracekit at it through ``AWS_ENDPOINT_URL`` and dummy credentials, the
standard places a user's own endpoint and keys come from.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from loopback import FaultHandler, LoopbackServer, Request

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


class _FileHandler(FaultHandler):
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


class HTTPFileServer(LoopbackServer):
    """Serves the files under ``root`` (no directory listings), honouring single byte ranges
    (206 with Content-Range, 416 past the end) unless ``ignore_ranges``."""

    handler = _FileHandler

    def __init__(self, root: str | os.PathLike[str], latency: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.ignore_ranges = False  # True: answer every GET with the whole file (200)
        super().__init__(latency)


#: Headers not forwarded: hop-by-hop ones, the length (set anew), and ``Expect`` (the proxy
#: answered ``100 Continue`` itself and has the whole body).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length", "expect",
               "proxy-connection"}


class _ProxyHandler(FaultHandler):
    def respond(self) -> tuple[int, dict[str, str], bytes]:
        owner: FaultProxy = self.server.owner  # type: ignore[assignment]
        drop = self.fault is not None and self.fault.kind == "corrupt" and \
            self.fault.drop_checksum
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                   and not (drop and k.lower().startswith("x-amz-checksum-"))}
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


class FaultProxy(LoopbackServer):
    """A reverse proxy in front of ``upstream`` (e.g. the moto S3 server) that adds
    ``latency`` seconds to each request, logs and counts requests and bytes, and injects the
    same faults as HTTPFileServer (status answers carry an S3 error document: 403 is
    AccessDenied) and corrupted uploads. E.g. refuse the 2nd object upload:
    ``inject("status", status=403, uploads=True, after=1)``; flip a byte of the next upload of
    a key, with its checksum dropped: ``inject("corrupt", "*/c.0", drop_checksum=True)``."""

    handler = _ProxyHandler

    def __init__(self, upstream: str, latency: float = 0.0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        super().__init__(latency)

    def is_upload(self, request: Request, body: bytes | None) -> bool:
        """A PUT of an object's bytes (or a multipart part) to ``/bucket/key``: not a
        server-side copy (no body), not a bucket."""
        return request.method == "PUT" and request.path.count("/") >= 2 and (
            bool(body) or "partNumber=" in request.query)

    def error_body(self, status: int) -> bytes:
        code = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError",
                503: "SlowDown"}.get(status, "InternalError")
        return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected</Message></Error>").encode()
