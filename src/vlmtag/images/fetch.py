"""Reading raw image bytes from a local path, an http(s) URL or a ``data:`` URI, within limits.

What a source string may be:

- a local path; ``~`` is expanded and a relative path is resolved against ``base_dir``;
- an ``http://`` or ``https://`` URL, fetched with one shared ``httpx.Client`` (streaming, aborted past
  ``max_bytes``, connect/read timeouts and a total deadline, at most ``max_redirects`` redirects and only to
  http(s));
- a ``data:[<mime>][;base64],<payload>`` URI, decoded in place (common in datasets exported from web pages).

Any other ``scheme://`` (``file://``, ``s3://``, ``ftp://``, ...) written in the data is refused with an
``ImageError`` naming the scheme. The one way to other storage is a relative path when ``base_dir`` (the
dataset's folder) is itself remote: ``images/1.jpg`` next to ``s3://bucket/data/rows.jsonl`` is read from
``s3://bucket/data/images/1.jpg`` through fsspec, with the same size cap (an http(s) folder is fetched as
above). The dataset's owner chose that storage, so it is no more open than a local relative path; a path that
climbs out of the dataset's bucket or host is refused. Every failure is an ``ImageError`` whose text is short
enough for an error column and never contains the user:password part of a URL.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Callable

from vlmtag.urls import scheme_of

if TYPE_CHECKING:  # imported where a URL is fetched: a run on local files does without it
    import httpx


class ImageError(ValueError):
    """A per-image failure; ``str(e)`` is a short, clear reason that a user sees in an error column.

    ``retryable`` is True for failures that may pass on a later try (timeouts, refused connections,
    HTTP 408/429/5xx); a missing file or a corrupt image is not.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout: float = 10.0  # seconds to open a connection
    read_timeout: float = 30.0  # seconds of silence allowed between two reads
    max_bytes: int = 50 * 1024 * 1024  # largest body (or local file) accepted
    max_redirects: int = 5
    total_timeout: float = 120.0  # a whole download, so a server trickling bytes cannot hold a worker forever


_SECRET_PARAM = re.compile(r"sig|signature|token|key|secret|password|passwd|credential|auth|session", re.I)
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_SHOWN_URL = 200

_client: httpx.Client | None = None
_client_pid: int | None = None
_client_lock = threading.Lock()


def read_source(source: str, *, base_dir: str | None = None, limits: FetchLimits = FetchLimits()) -> bytes:
    """The raw bytes of one image source (path, http(s) URL or data: URI); ImageError on any failure."""
    if not isinstance(source, str):
        raise ImageError(f"image source must be a string, got {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ImageError("empty image source")
    if text[:5].lower() == "data:":
        return _read_data_uri(text, limits)
    scheme = scheme_of(text)
    if scheme:
        if scheme not in ("http", "https"):
            raise ImageError(f"unsupported URL scheme '{scheme}' (only http and https)")
        return _read_http(text, limits)
    base_scheme = scheme_of(base_dir) if base_dir else None
    if base_scheme and not text.startswith(("/", "~")):
        url = _join_remote(base_dir, text)
        if base_scheme in ("http", "https"):
            return _read_http(url, limits)
        return _read_fsspec(url, source, limits)
    return _read_file(source, base_dir, limits)


def _join_remote(base_dir: str, relative: str) -> str:
    """`relative` inside the remote folder `base_dir`; ".." may go up, but not above the bucket or host."""
    scheme, _, rest = base_dir.partition("://")
    if scheme.lower() in ("http", "https"):
        url = urllib.parse.urljoin(base_dir.rstrip("/") + "/", relative)  # ".." stops at the host
        base, joined = urllib.parse.urlsplit(base_dir), urllib.parse.urlsplit(url)
        if (joined.scheme, joined.netloc) != (base.scheme, base.netloc):  # e.g. "other.host:80/x" reads as a URL
            raise ImageError(f"path leaves the dataset's storage: {relative}")
        return url
    root, _, folder = rest.partition("/")
    parts = [p for p in folder.split("/") if p]
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ImageError(f"path leaves the dataset's storage: {relative}")
            parts.pop()
        else:
            parts.append(part)
    return f"{scheme}://{root}/" + "/".join(parts)


def _read_fsspec(url: str, source: str, limits: FetchLimits) -> bytes:
    """An image next to a remote dataset (s3://, gs://, ...), read through fsspec, within `limits.max_bytes`."""
    try:
        import fsspec
    except ImportError:
        raise ImageError(f"reading {scheme_of(url)}:// needs fsspec (pip install 'vlmtag[remote]')") from None
    shown = redact_url(url)

    def read() -> bytes:
        with fsspec.open(url, "rb") as f:
            return _read_stream(f, source, limits)

    try:
        return _read_bounded(read, source, shown, limits)
    except ImageError:
        raise
    except ImportError as e:  # the scheme's backend (s3fs, gcsfs, ...) is missing
        raise ImageError(f"cannot read {shown}: {e}") from None
    except Exception as e:  # network trouble in the backend: worth another attempt
        detail = _reason(Exception(str(e).replace(url, shown)))  # the backend may quote the URL, credentials too
        raise ImageError(f"cannot read {shown}: {type(e).__name__}: {detail}", retryable=True) from None


def redact_url(url: str) -> str:
    """``url`` fit for a message: no user:password, no values of signature/token-like query parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            urllib.parse.quote(k, safe="") + "=" + _shown_value(k, v)
            for k, v in pairs
        )
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return shown if len(shown) <= _MAX_SHOWN_URL else shown[: _MAX_SHOWN_URL - 1] + "…"


def _shown_value(key: str, value: str) -> str:
    return "***" if _SECRET_PARAM.search(key) else urllib.parse.quote(value, safe="")


# ---------------------------------------------------------------------------------------------- local files


def _read_file(source: str, base_dir: str | None, limits: FetchLimits) -> bytes:
    path = os.path.expanduser(source)
    where = ""
    if base_dir is not None and not os.path.isabs(path):
        base = os.path.expanduser(base_dir)
        path = os.path.join(base, path)
        where = f" (in {base})"
    try:
        return _read_bounded(lambda: _read_path(path, source, limits), source, f"{source}{where}", limits)
    except OSError as e:
        raise ImageError(f"cannot read {source}{where}: {e.strerror or e}") from None


def _read_path(path: str, source: str, limits: FetchLimits) -> bytes:
    """A local file's bytes, by file descriptor: open, fstat, one read and close, where a buffered file object
    makes eight system calls. Each call lets go of the GIL, and with the API engine's thread busy, taking it back
    is most of what a small image's read costs (benchmarks/read_contention.py: 1.6-2.2× faster this way).
    Anything but a regular file (a FIFO, a device) is read as a stream."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            with os.fdopen(fd, "rb", closefd=False) as f:
                return _read_stream(f, source, limits)
        if st.st_size > limits.max_bytes:
            raise ImageError(_too_large(st.st_size, limits, f"file {source}"))
        data = os.read(fd, st.st_size + 1)
        if len(data) != st.st_size:  # it changed since fstat (or the read came short): on to its end, bounded
            with os.fdopen(fd, "rb", closefd=False) as f:
                data += f.read(limits.max_bytes + 1 - len(data))
        return data
    finally:
        os.close(fd)


def _read_stream(f: IO[bytes], source: str, limits: FetchLimits) -> bytes:
    """The bytes of open file `f`, refused past `limits.max_bytes` from its size when it tells, else by counting."""
    size = _declared_size(f)
    if size is not None and size > limits.max_bytes:
        raise ImageError(_too_large(size, limits, f"file {source}"))
    # bounded even for files whose size does not tell; sized when it does (a read of max_bytes would map and unmap
    # that much memory for every small file), and on to the bound should the file have grown
    data = f.read((size if size is not None else limits.max_bytes) + 1)
    if size is not None and len(data) > size:
        data += f.read(limits.max_bytes + 1 - len(data))
    return data


def _read_bounded(read: Callable[[], bytes], source: str, named: str, limits: FetchLimits) -> bytes:
    """What `read()` reads (`_read_path`, `_read_stream`), checked: within `limits.max_bytes`, not empty; `named`
    says which file in messages. A missing, directory or forbidden file is an ImageError here; other failures are
    left to the caller to word."""
    try:
        data = read()
    except FileNotFoundError:
        raise ImageError(f"file not found: {named}") from None
    except IsADirectoryError:
        raise ImageError(f"is a directory, not an image file: {named}") from None
    except PermissionError:
        raise ImageError(f"permission denied: {named}") from None
    if len(data) > limits.max_bytes:
        raise ImageError(_too_large(None, limits, f"file {source}"))
    if not data:
        raise ImageError(f"empty file: {named}")
    return data


def _declared_size(f: IO[bytes]) -> int | None:
    size = getattr(f, "size", None)  # fsspec files
    if isinstance(size, int):
        return size
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it
        return None


# ---------------------------------------------------------------------------------------------- data: URIs


def _read_data_uri(text: str, limits: FetchLimits) -> bytes:
    header, comma, payload = text[5:].partition(",")
    if not comma:
        raise ImageError("malformed data: URI (no comma before the payload)")
    if header.lower().endswith(";base64"):
        payload = "".join(payload.split())  # line breaks and spaces are common in exported data
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise ImageError(_too_large(len(payload) * 3 // 4, limits, "data: URI"))
        payload = payload.replace("-", "+").replace("_", "/")  # tolerate the URL-safe alphabet
        payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("malformed data: URI (invalid base64)") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise ImageError(_too_large(len(data), limits, "data: URI"))
    if not data:
        raise ImageError("empty data: URI")
    return data


# ---------------------------------------------------------------------------------------------- http(s)


def _http_client() -> httpx.Client:
    """The one shared client, created on first use (and again in a forked child: sockets do not survive fork)."""
    global _client, _client_pid
    client = _client
    if client is not None and _client_pid == os.getpid():
        return client
    import httpx

    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            _client = httpx.Client(
                follow_redirects=False,  # followed by hand: bounded, and only to http(s)
                headers={"User-Agent": _user_agent()},
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
            _client_pid = os.getpid()
        return _client


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"vlmtag/{version('vlmtag')} (image tagging; python-httpx)"
    except PackageNotFoundError:
        return "vlmtag (image tagging; python-httpx)"


def _read_http(url: str, limits: FetchLimits) -> bytes:
    import httpx

    shown = redact_url(url)
    timeout = httpx.Timeout(
        connect=limits.connect_timeout,
        read=limits.read_timeout,
        write=limits.read_timeout,
        pool=limits.total_timeout,  # waiting for a free pooled connection
    )
    deadline = time.monotonic() + limits.total_timeout
    client = _http_client()
    current: httpx.URL | str = url
    for _ in range(limits.max_redirects + 1):
        try:
            with client.stream("GET", current, timeout=timeout) as resp:
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    nxt = resp.url.join(resp.headers["location"])
                    if nxt.scheme not in ("http", "https"):
                        raise ImageError(
                            f"redirect to unsupported URL scheme '{nxt.scheme}' (only http and https) from {shown}"
                        )
                    current = nxt
                    continue
                if not 200 <= resp.status_code < 300:
                    code = resp.status_code
                    raise ImageError(
                        f"HTTP {code} fetching {redact_url(str(resp.url))}",
                        retryable=code in (408, 425, 429) or code >= 500,
                    )
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageError(_too_large(int(declared), limits, shown))
                body = bytearray()
                for chunk in resp.iter_bytes():  # as they arrive, decoded: a gzip bomb is bounded too
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise ImageError(_too_large(None, limits, shown))
                    if time.monotonic() > deadline:
                        raise ImageError(
                            f"download took longer than {limits.total_timeout:g}s: {shown}", retryable=True
                        )
        except httpx.ConnectTimeout:
            raise ImageError(f"connect timeout after {limits.connect_timeout:g}s: {shown}", retryable=True) from None
        except (httpx.ReadTimeout, httpx.WriteTimeout):
            raise ImageError(
                f"read timeout (no data for {limits.read_timeout:g}s) fetching {shown}", retryable=True
            ) from None
        except httpx.PoolTimeout:
            raise ImageError(f"no free connection within {limits.total_timeout:g}s: {shown}", retryable=True) from None
        except httpx.ConnectError as e:
            raise ImageError(f"cannot connect ({_reason(e)}): {shown}", retryable=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise ImageError(f"invalid URL: {shown}") from None
        except httpx.RemoteProtocolError as e:
            raise ImageError(f"server broke off the response ({_reason(e)}): {shown}", retryable=True) from None
        except httpx.DecodingError:
            raise ImageError(f"cannot decode the response body (bad content-encoding): {shown}") from None
        except httpx.HTTPError as e:
            raise ImageError(f"network error ({type(e).__name__}) fetching {shown}", retryable=True) from None
        if not body:
            raise ImageError(f"empty response body: {shown}")
        return bytes(body)
    raise ImageError(f"too many redirects (more than {limits.max_redirects}) fetching {shown}")


def _too_large(size: int | None, limits: FetchLimits, what: str) -> str:
    got = f"{size} bytes" if size is not None else "more bytes than allowed"
    return f"too large: {got} exceeds the limit of {limits.max_bytes} bytes ({what})"


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 100 else text[:99] + "…"
