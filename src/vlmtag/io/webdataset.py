"""WebDataset `.tar` shards, as img2dataset writes them, read front to back as a stream (never extracted).

A sample is the run of consecutive members that share a key: the member's path up to the first dot of its
file name (`000000001.jpg`, `000000001.json`, `000000001.txt` are sample `000000001`; `a/x.seg.png` belongs to
`a/x`). Each sample becomes one row:

- the fields of `KEY.json` when there is one (img2dataset puts `caption`, `url`, `key`, `status`, `width`,
  `height`, ... there);
- `text`: kept if the json has a `text` field; otherwise the content of `KEY.txt`; otherwise the json's
  `caption` (a string). No `text` field when there is none of these;
- `images`: one entry per image member (by extension, `IMAGE_EXTENSIONS`), in tar order, saying where it came
  from: `"<tar file name>#<member name>"`, e.g. `00000.tar#000000001.jpg`. A sample without an image member
  keeps the json's own `images` (paths or URLs) if it has them, else gets `images: []`;
- the image bytes under `BYTES_KEY`, a list aligned with `images` (only when the sample has image members).
  The operator tags those bytes; writers drop the key.
Members of other kinds (`.cls`, `.npy`, ...) are ignored. A `KEY.json` that is not a JSON object does not cost
the row: the row keeps its images and gets `INVALID_ROW_KEY` with the member and the reason.

Members of a sample must be next to each other, as WebDataset requires; a tar made with a plain `tar -cf`
(directory order) scatters them, and a key seen again among the last few thousand samples is an error that
says how to rebuild the tar, rather than rows silently split in two.

A truncated or corrupt tar: every sample finished before the damage is yielded, then `CorruptTar` (a
`ShardReadError`) names the tar and the member being read (the dataset layer records it as an unreadable row and
goes on). `.txt` members are UTF-8 (a byte-order mark is skipped); one that is not is said in the row's
`INVALID_ROW_KEY`, and `.json` members are read as `json` reads bytes (UTF-8, -16 or -32, BOM or not). The sample being read is not yielded, since it may be
missing members. A tar must end with its end-of-archive marker (every tar writer puts one), so a tar cut
exactly between two members is an error too, not a shorter shard.
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
import zlib
from typing import Iterator

from vlmtag.io import filesystem
from vlmtag.io.base import IMAGE_EXTENSIONS, ShardReadError
from vlmtag.rowkeys import BYTES_KEY, INVALID_ROW_KEY


class CorruptTar(ShardReadError):
    pass


def _split(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.ext2` -> (`dir/KEY`, `ext.ext2`)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def webdataset_rows(path: str) -> Iterator[dict]:
    """Rows of one WebDataset tar (plain or compressed), one per sample."""
    return _samples(path, filesystem.basename(path))


def _samples(path: str, tar_name: str) -> Iterator[dict]:
    key: str | None = None
    done = 0  # samples yielded
    members: list[tuple[str, str, bytes]] = []  # (member name, extension, data) of the current sample
    recent = _RecentKeys(4096)
    current = "(the tar header)"
    with filesystem.open_input(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode=_mode(path, f), tarinfo=_StrictTarInfo) as tar:
                while (info := tar.next()) is not None:
                    current = info.name
                    # A TarFile remembers every member it has seen; forget them, or memory grows with the shard.
                    tar.members = []
                    if not info.isfile():
                        continue
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    sample_key, ext = _split(name)
                    if not ext or os.path.basename(name).startswith("."):
                        continue
                    if sample_key != key:  # a new key starts: the previous sample is whole
                        if members:
                            yield _row(tar_name, members)
                            done += 1
                        if sample_key in recent:
                            raise _NotAdjacent(
                                f"{path}: the members of sample {sample_key!r} are not next to each other (at "
                                f"{info.name}); WebDataset needs each sample's files together: build the tar with "
                                "`tar --sort=name -cf ...` or a WebDataset writer"
                            )
                        recent.remember(sample_key)
                        key, members = sample_key, []
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members.append((name, ext.lower(), data))
                    current = f"(the header after {info.name})"
        except _NotAdjacent as e:
            raise CorruptTar(str(e)) from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            # `members` may be incomplete; everything yielded before is whole.
            raise CorruptTar(
                f"{path}: corrupt or truncated tar at member {current} ({done} whole samples read before it): {e}"
            ) from None
    if members:
        yield _row(tar_name, members)


class _NotAdjacent(Exception):
    pass


class _RecentKeys:
    """The last `size` sample keys, to catch a tar whose samples are scattered (`tar -cf` in directory order)
    without remembering every key of a large shard."""

    def __init__(self, size: int) -> None:
        self._order: collections.deque[str] = collections.deque()
        self._keys: set[str] = set()
        self._size = size

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def remember(self, key: str) -> None:
        self._order.append(key)
        self._keys.add(key)
        if len(self._order) > self._size:
            self._keys.discard(self._order.popleft())


class _StrictTarInfo(tarfile.TarInfo):
    """`tarfile` takes a missing, cut or garbled header after the first member for the end of the archive, so a
    tar cut between two members would read as a shorter, whole one. Only the end-of-archive marker (a block of
    zeros) ends it here; anything else is an error."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError("the file ends without the end-of-archive marker") from None
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"bad header: {e}") from None


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _mode(path: str, f) -> str:
    """How to read the tar, front to back either way. A local uncompressed tar: "r:" (tarfile parses headers
    about twice as fast when it may seek forward over data it has read). A compressed or remote one: the stream
    mode "r|*" (decompressors and remote files cannot seek back cheaply)."""
    if filesystem.is_remote(path):
        return "r|*"
    head = f.read(6)
    f.seek(0)
    return "r|*" if head.startswith(_COMPRESSED_MAGIC) else "r:"


def _row(tar_name: str, members: list[tuple[str, str, bytes]]) -> dict:
    row: dict = {}
    text: str | None = None
    images: list[str] = []
    data: list[bytes] = []
    for name, ext, payload in members:
        if ext == "json":
            try:
                fields = json.loads(payload)
            except ValueError as e:
                fields, reason = None, f"invalid JSON: {e}"
            else:
                reason = "not a JSON object"
            if isinstance(fields, dict):
                row.update(fields)
            else:
                row[INVALID_ROW_KEY] = {"member": f"{tar_name}#{name}", "error": reason}
        elif ext == "txt":
            try:
                text = payload.decode("utf-8-sig")  # a byte-order mark is skipped
            except UnicodeDecodeError as e:  # kept out of the prompt, and said, rather than guessed
                row[INVALID_ROW_KEY] = {"member": f"{tar_name}#{name}", "error": (
                    f"not UTF-8: byte 0x{payload[e.start]:02x} at byte offset {e.start} of the member")}
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            images.append(f"{tar_name}#{name}")
            data.append(payload)
    if "text" not in row:
        if text is None and isinstance(row.get("caption"), str):
            text = row["caption"]
        if text is not None:
            row["text"] = text
    if images:
        row["images"] = images
        row[BYTES_KEY] = data
    elif not isinstance(row.get("images"), list):
        row["images"] = []
    return row
