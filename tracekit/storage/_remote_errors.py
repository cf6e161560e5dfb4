"""How a failed remote request is read: absent, worth retrying, refused, or final; and how
messages about it are kept free of credentials.

Every HTTP client and object-store library raises its own exceptions (aiohttp, botocore
through s3fs, gcsfs, adlfs, ...), often chained behind an ``OSError``. They are recognised by
the HTTP status they carry or by their class names, so that none of those packages is imported
here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

#: What a failure means to the caller.
ABSENT, EMPTY, RETRY, ACCESS, FATAL = "absent", "empty", "retry", "access", "fatal"

#: Class names (anywhere in an exception's chain and MRO) of transient network failures.
_TIMEOUTS = {"TimeoutError", "ServerTimeoutError", "ReadTimeoutError", "ConnectTimeoutError",
             "ConnectTimeout", "ReadTimeout", "FSTimeoutError", "SocketTimeoutError"}
_TRUNCATED = {"ClientPayloadError", "IncompleteReadError", "IncompleteRead",
              "ResponseStreamingError", "ContentLengthError", "TransferEncodingError"}
_CONNECTION = {"ConnectionError", "ClientConnectionError", "ClientOSError",
               "ServerDisconnectedError", "EndpointConnectionError", "ConnectionClosedError",
               "HTTPClientError", "ProxyConnectionError", "ResponseParserError",
               "ServiceRequestError", "ServiceResponseError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "ProfileNotFound", "TokenRetrievalError", "SSOTokenLoadError",
                   "UnauthorizedSSOTokenError", "ClientAuthenticationError",
                   "DefaultCredentialsError", "RefreshError"}
_NOT_STATUS = _TIMEOUTS | _TRUNCATED | _CONNECTION | {"HttpProcessingError"}
#: Storage option names whose values are secrets (matched as substrings, case-insensitive).
_SECRET_NAMES = ("key", "secret", "token", "password", "passwd", "credential", "sas",
                 "auth", "signature", "session")

_HINTS = {
    "s3": "check AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
          "storage_options (key, secret; anon=True for a public bucket)",
    "gs": "check GOOGLE_APPLICATION_CREDENTIALS or storage_options (token)",
    "gcs": "check GOOGLE_APPLICATION_CREDENTIALS or storage_options (token)",
    "az": "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY or a SAS token, or "
          "storage_options",
    "abfs": "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY or a SAS token, or "
            "storage_options",
    "http": "check the URL's token or the headers given in storage_options",
    "https": "check the URL's token or the headers given in storage_options",
}


def access_hint(protocol: str) -> str:
    return _HINTS.get(protocol, "check the credentials given in storage_options")


@dataclass
class Failure:
    """One classified failure: ``kind`` (see the constants above) and a short, credential-free
    description (``HTTP 503``, ``timed out``, ``connection reset``)."""

    kind: str
    text: str


class HTTPStatusError(Exception):
    """A plain HTTP response with an unexpected status (raised by the HTTP reader itself)."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(status, reason)
        self.status, self.reason = status, reason


class ServerProtocolError(Exception):
    """The server answered in a way no correct one does (a range other than the one asked,
    no size): final, not retried."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _status(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status an exception carries (aiohttp, botocore, azure, gcsfs), and the
    service's error code when it gives one (``SlowDown``, ``AccessDenied``)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata") or {}
        code = str((response.get("Error") or {}).get("Code") or "")
        status = meta.get("HTTPStatusCode")
        if isinstance(status, int):
            return status, code
        if code.isdigit():
            return int(code), ""
        return None, code
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, ""
    return None, ""


def classify(exc: BaseException, protocol: str) -> Failure:
    """What ``exc`` (raised by one request attempt) means."""
    if isinstance(exc, ServerProtocolError):
        return Failure(FATAL, str(exc))
    chain = list(_chain(exc))
    for e in chain:
        if _names(e) & _NOT_STATUS:
            continue  # aiohttp's payload errors carry a ``code`` of 400 that no server sent
        status, code = _status(e)
        if status is None:
            continue
        label = f"HTTP {status}" + (f" {code}" if code and not code.isdigit() else "")
        if status in (404, 410):
            return Failure(ABSENT, label)
        if status == 416:
            return Failure(EMPTY, label)
        if status in (401, 403):
            return Failure(ACCESS, f"access denied ({label}): {access_hint(protocol)}")
        if status in (408, 429) or status >= 500 or code in ("SlowDown", "RequestTimeout"):
            return Failure(RETRY, label)
        return Failure(FATAL, label)
    names = set().union(*(_names(e) for e in chain))
    if names & _NO_CREDENTIALS:
        return Failure(ACCESS, f"no usable credentials: {access_hint(protocol)}")
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return Failure(ABSENT, "not found")
    if any(isinstance(e, PermissionError) for e in chain):
        return Failure(ACCESS, f"access denied: {access_hint(protocol)}")
    if names & _TIMEOUTS:
        return Failure(RETRY, "timed out")
    if names & _TRUNCATED:
        return Failure(RETRY, "truncated response (the connection closed early)")
    if "ConnectionResetError" in names or "ServerDisconnectedError" in names:
        return Failure(RETRY, "connection reset")
    if "ConnectionRefusedError" in names:
        return Failure(RETRY, "connection refused")
    if names & _CONNECTION:
        return Failure(RETRY, f"connection failed ({type(exc).__name__})")
    return Failure(FATAL, f"{type(exc).__name__}: {exc}")


class Redactor:
    """Removes credentials from text: the URL's user info and query values, secret-looking
    storage options, and any ``user:pass@`` or ``?query`` left in a quoted URL."""

    _USERINFO = re.compile(r"(?<=://)[^/@\s'\"]*@")
    _QUERY = re.compile(r"\?[^\s'\"]*")

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        secrets: set[str] = set()
        parts = urlsplit(url)
        for piece in (parts.username, parts.password):
            if piece:
                secrets.update((piece, unquote(piece)))
        for _, value in parse_qsl(parts.query, keep_blank_values=False):
            secrets.add(value)
        secrets.update(_secret_values(storage_options or {}, secret=False))
        self._secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = self._USERINFO.sub("", text)
        text = self._QUERY.sub("", text)
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


def _secret_values(value: Any, secret: bool) -> Iterable[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            name = str(k).lower()
            yield from _secret_values(v, secret or any(s in name for s in _SECRET_NAMES))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _secret_values(v, secret)
    elif isinstance(value, str | bytes) and secret:
        yield value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    elif secret and value is not None and not isinstance(value, bool | int | float):
        yield str(value)  # e.g. aiohttp.BasicAuth: its repr holds the password


def public_url(url: str) -> str:
    """``url`` without user info, query string or fragment: what messages may show."""
    if "::" in url:  # a chained fsspec URL: each link redacted
        return "::".join(public_url(u) for u in url.split("::"))
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
