"""Image and video cells that hold an http(s) URL: fetched with bounded time and size.

The CPU stage fetches a batch's URLs concurrently, in threads (the work is waiting on
servers, not computing), before it decodes any of them. Each attempt waits at most
`timeout` seconds to connect, at most `timeout` for the response to start, and stops
reading the body `timeout` seconds after it began: a server that never answers costs about
`timeout` times the attempts, one that trickles bytes cannot hold a worker either. What a
retry may cure (a timeout, a dropped connection, HTTP 408, 429 and 5xx) is retried with
exponential backoff; anything else (a 404, a body over the byte limit, too many redirects,
a malformed URL) fails at once. A failure is a `FetchError` naming the URL and the HTTP
status or reason, which becomes the row's error.

Redirects are followed (at most `MAX_REDIRECTS`). A body is refused above `MAX_IMAGE_BYTES`
(64 MiB) for an image or `MAX_VIDEO_BYTES` (512 MiB) for a video: from its Content-Length
before any byte is read, and while streaming when the server sends none (or lies). The
decoder's pixel limit (--max-image-pixels) then applies as to any other image.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

DEFAULT_FETCH_TIMEOUT = 10.0  # seconds, per attempt
DEFAULT_FETCH_RETRIES = 2  # attempts after the first
MAX_IMAGE_BYTES = 64 << 20  # a 40 MP JPEG is ~10-20 MiB; PNGs of the pixel limit fit too
MAX_VIDEO_BYTES = 512 << 20
MAX_REDIRECTS = 10
FETCH_THREADS = 32  # concurrent fetches per worker: each mostly waits on a socket
BACKOFF = 0.25  # seconds before the first retry, doubling after each
_CHUNK = 1 << 16
_RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
_USER_AGENT = "vlm-pruner-pipeline (python-requests)"  # some hosts refuse requests' default agent


class FetchError(ValueError):
    """A URL cell's body could not be fetched; the message goes to the row's `error` column."""


class _Transient(Exception):
    """An attempt failed for a reason a retry may cure."""


@dataclass(frozen=True)
class Body:
    """What a URL answered: its bytes, and what the server said they are."""

    url: str
    data: bytes
    content_type: str | None

    @property
    def source(self) -> str:
        """Where the bytes came from, to add to a decoding error (the URL cell itself is not in
        the output, and a 200 with an HTML page is the usual reason)."""
        kind = f", Content-Type {self.content_type}" if self.content_type else ""
        return f"fetched from {self.url}{kind}"


def is_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def url_of(cell: Any) -> str | None:
    """The URL an image or video cell holds (a string, or a `datasets` struct with only a
    path), else None."""
    if isinstance(cell, dict) and cell.get("bytes") is None:
        cell = cell.get("path")
    return cell if is_url(cell) else None


def fetch(url: str, timeout: float = DEFAULT_FETCH_TIMEOUT, retries: int = DEFAULT_FETCH_RETRIES,
          max_bytes: int = MAX_IMAGE_BYTES) -> Body:
    """The body of `url` (after redirects); raises FetchError with the status or reason."""
    attempts = retries + 1
    for attempt in range(attempts):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            return _attempt(url, timeout, max_bytes)
        except _Transient as e:
            reason = str(e)
    raise FetchError(f"cannot fetch {url}: {reason} ({attempts} attempt{'s' * (attempts > 1)})")


class Fetcher:
    """A worker's fetches: its settings and a thread pool, so that a batch's URLs are fetched
    at once rather than one after another."""

    def __init__(self, timeout: float = DEFAULT_FETCH_TIMEOUT, retries: int = DEFAULT_FETCH_RETRIES,
                 max_bytes: int = MAX_IMAGE_BYTES, threads: int = FETCH_THREADS):
        self.timeout, self.retries, self.max_bytes = timeout, retries, max_bytes
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None  # started on the first URL

    def fetch_all(self, cells: list[Any]) -> list[Any]:
        """The cells, each URL cell replaced by its `Body` or by the `FetchError` it raised;
        other cells unchanged. Never raises for a row."""
        urls = {i: u for i, u in enumerate(map(url_of, cells)) if u is not None}
        if not urls:
            return cells
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fetch")
        out = list(cells)
        for i, body in zip(urls, self._pool.map(self._fetch, urls.values())):
            out[i] = body
        return out

    def _fetch(self, url: str) -> Body | FetchError:
        try:
            return fetch(url, self.timeout, self.retries, self.max_bytes)
        except FetchError as e:
            return e
        except Exception as e:  # never fail the batch for one row
            return FetchError(f"cannot fetch {url}: {type(e).__name__}: {_reason(e)}")


_local = threading.local()


def _session() -> requests.Session:
    """This thread's session: connections to a host are reused across its rows."""
    if not hasattr(_local, "session"):
        session = requests.Session()
        session.max_redirects = MAX_REDIRECTS
        session.headers["User-Agent"] = _USER_AGENT
        _local.session = session
    return _local.session


def _attempt(url: str, timeout: float, max_bytes: int) -> Body:
    """One GET. Raises _Transient for what a retry may cure, FetchError for the rest."""
    deadline = time.monotonic() + timeout
    timed_out = f"timed out after {timeout:g} s"
    fail = f"cannot fetch {url}: "
    try:
        with _session().get(url, stream=True, timeout=(timeout, timeout)) as resp:
            if not 200 <= resp.status_code < 300:
                status = f"HTTP {resp.status_code} {resp.reason or ''}".rstrip()
                if resp.status_code in _RETRIED_STATUS:
                    raise _Transient(status)
                raise FetchError(fail + status)
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(fail + f"body of {int(declared):,} bytes (Content-Length) is above the limit "
                                        f"of {_size(max_bytes)}")
            chunks, size = [], 0
            while chunk := resp.raw.read1(_CHUNK, decode_content=True):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(fail + f"body is above the limit of {_size(max_bytes)}")
                if time.monotonic() > deadline:
                    raise _Transient(timed_out)
                chunks.append(chunk)
            content_type = resp.headers.get("Content-Type")
    except (requests.Timeout, urllib3.exceptions.TimeoutError):
        raise _Transient(timed_out) from None
    except requests.TooManyRedirects:
        raise FetchError(fail + f"more than {MAX_REDIRECTS} redirects") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema) as e:
        raise FetchError(fail + f"invalid URL: {_reason(e)}") from None
    except urllib3.exceptions.DecodeError as e:
        raise FetchError(fail + f"cannot decode the body's Content-Encoding: {_reason(e)}") from None
    except requests.exceptions.SSLError as e:  # a certificate or protocol mismatch: a retry changes nothing
        raise FetchError(fail + f"TLS error: {_reason(e)}") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError) as e:
        raise _Transient(_reason(e)) from None
    if size == 0:
        raise FetchError(fail + "empty body")
    return Body(url, b"".join(chunks), content_type)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n:,} bytes"


def _reason(e: BaseException) -> str:
    """The innermost useful words of a requests / urllib3 error ("Connection refused",
    "Name or service not known"), not its nested reprs of connection pools."""
    text = str(e)
    if m := re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text):
        return m[-1].strip()
    if m := re.search(r"\[SSL: \w+\] (.+?) \(_ssl", text):
        return m.group(1)
    if m := re.search(r"IncompleteRead\(([^)]+)\)", text):
        return f"body cut short: {m.group(1)}"
    if m := re.search(r"Caused by \w+\('?([^'(]+)", text):
        return m.group(1).strip().rstrip(".")
    return text.splitlines()[0] if text.strip() else type(e).__name__
