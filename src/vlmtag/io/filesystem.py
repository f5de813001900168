"""Where dataset files live: local paths through plain `open`/`os`, remote URLs through fsspec.

A remote path is any `scheme://...` other than `file://` (`s3://`, `gs://`, `https://`, `memory://`, ...).
fsspec is optional (`pip install fsspec`, plus the backend for the scheme: `s3fs`, `gcsfs`, `aiohttp` for
http(s)); without it a remote path is refused with one line naming what to install.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import IO, Any, Iterator

from vlmtag.errors import ConfigError
from vlmtag.urls import is_remote, scheme_of


class RemoteUnavailable(ConfigError):
    """A remote path was given but fsspec (or its backend for that scheme) is not installed."""


def local_path(path: str) -> str:
    """`file:///x` as the local path `/x`; anything else unchanged."""
    if scheme_of(path) == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    return path


def url_path(path: str) -> str:
    """The part of a path that names the file: for http(s) URLs, without the query (`?sig=...`)."""
    if scheme_of(path) in ("http", "https"):
        return urllib.parse.urlsplit(path).path
    return path


def basename(path: str) -> str:
    return url_path(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path: str) -> str:
    """The folder of a file: a local absolute path, or the URL up to the last `/`."""
    if is_remote(path):
        if scheme_of(path) in ("http", "https"):
            path = path.split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def filesystem(path: str) -> tuple[Any, str]:
    """`(fs, path inside fs)` for a remote URL, or a clear error naming the package to install."""
    try:
        import fsspec.core
    except ImportError:
        raise RemoteUnavailable(
            f"{path}: reading {scheme_of(path)}:// paths needs fsspec; please install it (`pip install fsspec`, "
            "or `pip install vlmtag[remote]`)"
        ) from None
    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as e:  # fsspec knows the scheme but its backend (s3fs, gcsfs, aiohttp...) is missing
        raise RemoteUnavailable(f"{path}: {e}") from None
    except ValueError as e:  # an unknown scheme
        raise RemoteUnavailable(f"{path}: {e}") from None


def open_input(path: str, mode: str = "rb") -> IO:
    """A file opened for reading (use it as a context manager): plain `open` locally, fsspec for URLs."""
    encoding = None if "b" in mode else "utf-8"
    if not is_remote(path):
        return open(local_path(path), mode, encoding=encoding)
    fs, inner = filesystem(path)
    return fs.open(inner, mode, encoding=encoding) if encoding else fs.open(inner, mode)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def remote_glob(pattern: str) -> list[str]:
    """The files matching a remote glob, as full URLs, sorted."""
    fs, inner = filesystem(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(inner) if fs.isfile(p))


def remote_kind(path: str) -> str:
    """"file", "directory" or "missing" for a remote URL."""
    fs, inner = filesystem(path)
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return "missing"
    return "directory" if info.get("type") == "directory" else "file"


def remote_listdir(path: str) -> list[tuple[str, bool]]:
    """`(full URL, is_dir)` for the entries of a remote folder, sorted by name."""
    fs, inner = filesystem(path)
    entries = fs.ls(inner, detail=True)
    return sorted(
        ((fs.unstrip_protocol(e["name"]), e.get("type") == "directory") for e in entries
         if e["name"].rstrip("/") != inner.rstrip("/")),
        key=lambda t: t[0],
    )


def remote_walk_files(path: str) -> Iterator[str]:
    """Every file under a remote folder as a full URL: a folder's files (sorted), then its subfolders."""
    entries = remote_listdir(path)
    for url, is_dir in entries:
        if not is_dir:
            yield url
    for url, is_dir in entries:
        if is_dir:
            yield from remote_walk_files(url)
