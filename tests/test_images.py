"""Loading images the way a user's dataset holds them: paths, URLs, odd modes, rotated phone photos, broken files."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import jpeg_bytes, photo
from vlmtag.images import (
    EncodedImage,
    FetchLimits,
    ImageError,
    load_image,
    max_pixels_for_short_side,
    prepare_image,
    read_source,
)

RED = (255, 0, 0)


def decode(enc: EncodedImage) -> Image.Image:
    """Decode what would be sent, checking that the label tells the truth about the bytes."""
    im = Image.open(io.BytesIO(enc.data))
    assert enc.mime == Image.MIME[im.format]
    assert im.size == (enc.width, enc.height)
    im.load()
    return im


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * np.log10(255**2 / max(np.mean((x - y) ** 2), 1e-9))


def encoded(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def with_red_corner(im: Image.Image, size: int = 60) -> Image.Image:
    im = im.copy()
    im.paste(RED, (0, 0, size, size))
    return im


def exif_with(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# ---------------------------------------------------------------------------------------------- size and format


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_photo_is_downscaled_within_max_pixels_keeping_aspect(photo_dir, name):
    src = Image.open(photo_dir / f"{name}.jpg")
    enc = load_image(str(photo_dir / f"{name}.jpg"), max_pixels=50_000)

    out = decode(enc)
    assert out.format == "JPEG" and out.mode == "RGB"
    assert enc.width * enc.height <= 50_000
    assert enc.width * enc.height > 0.95 * 50_000  # as large as allowed, not needlessly small
    assert enc.width / enc.height == pytest.approx(src.width / src.height, rel=0.01)


def test_relative_path_resolves_against_base_dir_and_home_is_expanded(photo_dir, monkeypatch):
    by_base = load_image("coffee.jpg", base_dir=str(photo_dir))
    monkeypatch.setenv("HOME", str(photo_dir.parent))
    by_home = load_image(f"~/{photo_dir.name}/coffee.jpg")
    assert by_base.data == by_home.data
    assert by_base.source_sha256 == hashlib.sha256((photo_dir / "coffee.jpg").read_bytes()).hexdigest()


def test_small_image_is_never_upscaled(photo_dir):
    enc = load_image(str(photo_dir / "coffee.jpg"), max_pixels=10_000_000)
    assert (enc.width, enc.height) == Image.open(photo_dir / "coffee.jpg").size


def test_big_camera_jpeg_matches_a_careful_pillow_resize():
    raw = jpeg_bytes(photo("chelsea").resize((4032, 3024), Image.Resampling.BICUBIC))
    max_pixels = max_pixels_for_short_side(4032, 3024, 448)

    enc = prepare_image(raw, max_pixels=max_pixels)

    assert min(enc.width, enc.height) == 448
    assert enc.width * enc.height <= max_pixels
    reference = Image.open(io.BytesIO(raw)).convert("RGB").resize((enc.width, enc.height), Image.Resampling.LANCZOS)
    assert psnr(decode(enc).convert("RGB"), reference) > 30


def test_short_side_helper_gives_the_requested_short_side():
    for w, h in [(1920, 1080), (1080, 1920), (4032, 3024), (1000, 1000), (999, 451)]:
        raw = jpeg_bytes(Image.new("RGB", (w, h), (90, 120, 200)))
        enc = prepare_image(raw, max_pixels=max_pixels_for_short_side(w, h, 448))
        assert min(enc.width, enc.height) == 448


def test_data_url_carries_the_bytes_and_their_mime(photo_dir):
    enc = load_image(str(photo_dir / "rocket.jpg"))
    assert enc.data_url().startswith("data:image/jpeg;base64,")
    assert load_image(enc.data_url()).data == enc.data  # a data: URI is also accepted as a source


def test_repr_does_not_dump_the_bytes(photo_dir):
    enc = load_image(str(photo_dir / "rocket.jpg"))
    assert len(repr(enc)) < 300


# ---------------------------------------------------------------------------------------------- pass-through


def test_small_plain_jpeg_is_sent_unchanged(photo_dir):
    raw = (photo_dir / "astronaut.jpg").read_bytes()
    enc = prepare_image(raw)
    assert enc.data == raw
    assert enc.source_sha256 == hashlib.sha256(raw).hexdigest()
    # a caller that hashed the bytes already passes the digest on; the image comes out the same
    again = prepare_image(raw, sha256=enc.source_sha256)
    assert again == enc


def test_small_jpeg_with_exif_is_reencoded_without_metadata():
    exif = Image.Exif()
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS latitude: where the user lives
    exif[0x010F] = "PhoneMaker"
    raw = encoded(photo("coffee"), "JPEG", quality=90, exif=exif.tobytes())

    enc = prepare_image(raw)

    assert enc.data != raw
    out = decode(enc)
    assert not out.getexif() and "exif" not in out.info


def test_multi_picture_jpeg_sends_only_the_first_picture():
    first, second = photo("astronaut"), photo("coffee").resize((512, 512))
    raw = encoded(first, "MPO", save_all=True, append_images=[second])

    enc = prepare_image(raw)

    out = decode(enc)
    assert len(enc.data) < 0.7 * len(raw)
    assert psnr(out.convert("RGB"), first) > 30


# ---------------------------------------------------------------------------------------------- EXIF orientation


def test_phone_photo_with_orientation_6_is_turned_upright():
    stored = with_red_corner(photo("astronaut").resize((1200, 800)))  # landscape as stored by the sensor
    raw = encoded(stored, "JPEG", quality=95, exif=exif_with(6))

    enc = prepare_image(raw, max_pixels=200_000)

    assert enc.height > enc.width  # displayed upright: portrait
    out = np.asarray(decode(enc).convert("RGB"), dtype=int)
    top_right, top_left = out[5, -5], out[5, 5]
    assert abs(top_right - RED).max() < 40  # the stored top-left corner is now the top-right one
    assert abs(top_left - RED).max() > 100


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation, fmt):
    stored = with_red_corner(photo("chelsea").resize((900, 600)))
    raw = encoded(stored, fmt, exif=exif_with(orientation), **({"quality": 95} if fmt == "JPEG" else {}))

    enc = prepare_image(raw, max_pixels=150_000)

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")
    assert enc.width / enc.height == pytest.approx(upright.width / upright.height, rel=0.02)
    reference = upright.resize((enc.width, enc.height), Image.Resampling.LANCZOS)
    assert psnr(decode(enc).convert("RGB"), reference) > 28


# ---------------------------------------------------------------------------------------------- colour modes


def _rgba_with_hole() -> Image.Image:
    im = photo("coffee").convert("RGBA").resize((200, 150))
    im.paste((0, 0, 0, 0), (0, 0, 50, 50))  # fully transparent black: must come out white, not black
    return im


def _palette_with_transparency() -> bytes:
    im = photo("rocket").resize((160, 120)).quantize(16)
    im.paste(3, (0, 0, 50, 50))
    return encoded(im, "PNG", transparency=3)


MODE_CASES = {
    "RGBA PNG": lambda: encoded(_rgba_with_hole(), "PNG"),
    "LA PNG": lambda: encoded(_rgba_with_hole().convert("LA"), "PNG"),
    "P PNG with transparency": _palette_with_transparency,
    "P GIF": lambda: encoded(photo("rocket").resize((160, 120)).quantize(64), "GIF"),
    "CMYK JPEG": lambda: encoded(photo("coffee").convert("CMYK"), "JPEG", quality=90),
    "CMYK TIFF": lambda: encoded(photo("coffee").convert("CMYK"), "TIFF"),
    "16-bit gray PNG": lambda: encoded(
        Image.fromarray((np.asarray(photo("astronaut").convert("L"), dtype=np.uint16) * 257)), "PNG"
    ),
    "1-bit PNG": lambda: encoded(photo("chelsea").convert("1"), "PNG"),
    "L JPEG": lambda: encoded(photo("chelsea").convert("L"), "JPEG"),
    "float TIFF": lambda: encoded(
        Image.fromarray(np.asarray(photo("astronaut").convert("L"), dtype=np.float32) / 255), "TIFF"
    ),
    "32-bit int TIFF": lambda: encoded(photo("astronaut").convert("I"), "TIFF"),
    "WebP": lambda: encoded(photo("coffee"), "WEBP"),
    "BMP": lambda: encoded(photo("coffee"), "BMP"),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_any_mode_comes_out_as_an_rgb_jpeg(case):
    raw = MODE_CASES[case]()
    enc = prepare_image(raw, max_pixels=40_000)
    out = decode(enc)
    assert out.format == "JPEG" and out.mode == "RGB"
    assert enc.width * enc.height <= 40_000
    # Not washed out or blacked out: a real photo keeps a wide range of tones.
    gray = np.asarray(out.convert("L"))
    assert gray.std() > 20


def test_transparent_pixels_become_white():
    out = np.asarray(decode(prepare_image(MODE_CASES["RGBA PNG"]())), dtype=int)
    assert (out[5:40, 5:40] > 240).all()
    out = np.asarray(decode(prepare_image(_palette_with_transparency())), dtype=int)
    assert (out[5:40, 5:40] > 240).all()


def test_16_bit_levels_are_scaled_not_clipped():
    gray16 = np.full((64, 64), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    out = np.asarray(decode(prepare_image(encoded(Image.fromarray(gray16), "PNG"))).convert("L"), dtype=int)
    assert abs(out.mean() - 128) < 4


def test_cmyk_jpeg_keeps_its_colours():
    src = photo("coffee")
    enc = prepare_image(encoded(src.convert("CMYK"), "JPEG", quality=95))
    assert psnr(decode(enc).convert("RGB"), src.convert("CMYK").convert("RGB")) > 28


# ---------------------------------------------------------------------------------------------- broken inputs


def _bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A real 1-bit all-black PNG of width x height: ~100 KB on disk, 900 megapixels once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    raw = bytearray(jpeg_bytes(Image.new("RGB", (64, 64), (10, 200, 30))))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def test_decompression_bomb_png_is_refused_before_decoding():
    bomb = _bomb_png()
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match=r"image too large: .*900000000 pixels.*decompression bomb"):
        prepare_image(bomb)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_oversized_jpeg_header_is_refused():
    with pytest.raises(ImageError, match=r"image too large: 12000x12000 = 144000000 pixels"):
        prepare_image(_jpeg_claiming(12_000, 12_000))
    with pytest.raises(ImageError, match="image too large"):
        prepare_image(_jpeg_claiming(30_000, 30_000))


@pytest.mark.parametrize("size", [(512, 512), (3000, 2000)], ids=["small", "large"])
def test_truncated_jpeg_is_reported(size):
    raw = jpeg_bytes(photo("astronaut").resize(size))
    with pytest.raises(ImageError, match="^truncated image$"):
        prepare_image(raw[: len(raw) // 2])


def test_truncated_png_is_reported():
    raw = encoded(photo("astronaut"), "PNG")
    with pytest.raises(ImageError, match="truncated image"):
        prepare_image(raw[: len(raw) // 2])


def test_empty_file_is_reported(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="^empty file: empty.jpg"):
        load_image("empty.jpg", base_dir=str(tmp_path))
    with pytest.raises(ImageError, match="^empty file$"):
        prepare_image(b"")


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are my holiday notes, not a picture\n")
    with pytest.raises(ImageError, match=r"^not an image \(cannot identify format\)$"):
        load_image(str(tmp_path / "notes.jpg"))


def test_missing_file_and_directory_are_reported(tmp_path):
    with pytest.raises(ImageError, match="^file not found: images/x.jpg"):
        load_image("images/x.jpg", base_dir=str(tmp_path))
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path))


def test_file_over_max_bytes_is_refused_before_reading(photo_dir):
    with pytest.raises(ImageError, match="too large: .* exceeds the limit of 1000 bytes"):
        read_source(str(photo_dir / "astronaut.jpg"), limits=FetchLimits(max_bytes=1000))


def test_a_file_that_grew_after_its_size_was_read_is_read_whole_and_still_bounded(photo_dir, monkeypatch):
    path = photo_dir / "astronaut.jpg"
    whole = path.read_bytes()
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size as it was before a writer appended the rest
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 100,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(os, "fstat", stale_fstat)
    assert read_source(str(path)) == whole
    with pytest.raises(ImageError, match="too large: .*exceeds the limit of 1000 bytes"):
        read_source(str(path), limits=FetchLimits(max_bytes=1000))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_is_read_to_its_end(tmp_path, photo_dir):
    whole = (photo_dir / "astronaut.jpg").read_bytes()
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(whole,))
    writer.start()
    try:
        assert read_source("photo.jpg", base_dir=str(tmp_path)) == whole
    finally:
        writer.join(timeout=10)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "s3://bucket/a.jpg"])
def test_unsupported_url_schemes_are_named(url):
    scheme = url.split(":")[0]
    with pytest.raises(ImageError, match=rf"^unsupported URL scheme '{scheme}' \(only http and https\)$"):
        load_image(url)


def test_malformed_data_uri_is_reported():
    with pytest.raises(ImageError, match="invalid base64"):
        read_source("data:image/png;base64,@@@not base64@@@")


# ---------------------------------------------------------------------------------------------- URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    photo: bytes = b""
    release: threading.Event

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def _route(self):
        path = self.path.split("?")[0]
        if path == "/photo.jpg":
            self._send(200, self.photo, {"Content-Type": "image/jpeg"})
        elif path == "/slow.jpg":  # headers at once, then silence
            self._send(200, b"", {"Content-Length": str(len(self.photo))})
            self.wfile.flush()
            self.release.wait(10)
        elif path == "/trickle.jpg":  # one byte at a time: never silent for long, never done
            self._send(200, b"", {"Content-Length": str(len(self.photo))})
            for b in self.photo[:200]:
                if self.release.wait(0.05):
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()
        elif path == "/big.jpg":  # no Content-Length: only counting tells it is too big
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\xff" * 65536)
        elif path == "/big-declared.jpg":
            self._send(200, b"\xff" * 10, {"Content-Length": str(10**9)})
        elif path == "/to-file":
            self._send(302, b"", {"Location": "file:///etc/passwd"})
        elif path == "/to-photo":
            self._send(301, b"", {"Location": "/photo.jpg"})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/unavailable":
            self._send(503, b"try later")
        elif path == "/empty.jpg":
            self._send(200, b"")
        else:
            self._send(404, b"no such thing")


@pytest.fixture(scope="module")
def server():
    _Handler.photo = jpeg_bytes(photo("chelsea"))
    _Handler.release = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_photo_url_is_fetched_and_prepared(server):
    enc = load_image(f"{server}/photo.jpg", max_pixels=50_000)
    assert decode(enc).format == "JPEG"
    assert enc.width * enc.height <= 50_000
    assert enc.source_sha256 == hashlib.sha256(_Handler.photo).hexdigest()


def test_redirect_to_http_is_followed(server):
    assert read_source(f"{server}/to-photo") == _Handler.photo


def test_relative_path_against_a_dataset_served_over_http(server, tmp_path):
    """A dataset read from https://host/data/rows.jsonl names its images relative to that folder."""
    assert read_source("photo.jpg", base_dir=server) == _Handler.photo
    assert read_source("../../photo.jpg", base_dir=f"{server}/data/rows") == _Handler.photo  # stops at the host
    with pytest.raises(ImageError, match=rf"^HTTP 404 fetching {server}/data/missing.jpg$"):
        read_source("missing.jpg", base_dir=f"{server}/data")
    with pytest.raises(ImageError, match="^path leaves the dataset's storage: other.host:80/a.jpg$"):
        read_source("other.host:80/a.jpg", base_dir=f"{server}/data")
    (tmp_path / "local.jpg").write_bytes(b"local bytes")
    assert read_source(str(tmp_path / "local.jpg"), base_dir=server) == b"local bytes"  # an absolute path is local


def test_a_storage_failure_beside_a_remote_dataset_is_retryable_and_shows_no_credentials(monkeypatch):
    fsspec = pytest.importorskip("fsspec")

    def unreachable(url, mode):
        raise ConnectionError(f"failed to reach {url}")

    monkeypatch.setattr(fsspec, "open", unreachable)
    with pytest.raises(ImageError) as info:
        read_source("a.jpg", base_dir="s3://user:secret@bucket/data")
    assert str(info.value) == ("cannot read s3://bucket/data/a.jpg: ConnectionError: failed to reach "
                               "s3://bucket/data/a.jpg")
    assert info.value.retryable


def test_other_schemes_written_in_the_data_stay_refused_next_to_a_remote_dataset(server):
    with pytest.raises(ImageError, match="unsupported URL scheme 's3'"):
        read_source("s3://bucket/a.jpg", base_dir="s3://bucket/data")


def test_404_names_the_status_and_url(server):
    with pytest.raises(ImageError, match=rf"^HTTP 404 fetching {server}/missing.jpg$") as info:
        load_image(f"{server}/missing.jpg")
    assert not info.value.retryable


def test_503_is_marked_retryable(server):
    with pytest.raises(ImageError, match="HTTP 503") as info:
        load_image(f"{server}/unavailable")
    assert info.value.retryable


def test_credentials_in_the_url_never_reach_the_message(server):
    host = server.removeprefix("http://")
    with pytest.raises(ImageError) as info:
        load_image(f"http://alice:s3cr3t@{host}/missing.jpg?X-Amz-Signature=abcdef&size=large")
    message = str(info.value)
    assert "HTTP 404" in message and "size=large" in message
    assert "s3cr3t" not in message and "alice" not in message and "abcdef" not in message


def test_redirect_to_file_url_is_refused(server):
    with pytest.raises(ImageError, match="redirect to unsupported URL scheme 'file'"):
        load_image(f"{server}/to-file")


def test_redirect_loop_stops(server):
    with pytest.raises(ImageError, match=r"too many redirects \(more than 3\)"):
        load_image(f"{server}/loop", limits=FetchLimits(max_redirects=3))


def test_download_over_max_bytes_is_aborted(server):
    limits = FetchLimits(max_bytes=1024 * 1024)
    with pytest.raises(ImageError, match=r"too large: .*exceeds the limit of 1048576 bytes"):
        load_image(f"{server}/big.jpg", limits=limits)
    with pytest.raises(ImageError, match=r"too large: 1000000000 bytes exceeds the limit"):
        load_image(f"{server}/big-declared.jpg", limits=limits)


def test_silent_server_hits_the_read_timeout(server):
    with pytest.raises(ImageError, match=r"read timeout \(no data for 0.5s\)") as info:
        load_image(f"{server}/slow.jpg", limits=FetchLimits(read_timeout=0.5))
    assert info.value.retryable


def test_trickling_server_hits_the_total_timeout(server):
    with pytest.raises(ImageError, match="download took longer than 0.3s"):
        load_image(f"{server}/trickle.jpg", limits=FetchLimits(read_timeout=5, total_timeout=0.3))


def test_empty_body_is_reported(server):
    with pytest.raises(ImageError, match="empty response body"):
        load_image(f"{server}/empty.jpg")


def test_refused_connection_is_reported():
    with pytest.raises(ImageError, match="cannot connect") as info:
        load_image("http://127.0.0.1:9/photo.jpg", limits=FetchLimits(connect_timeout=2))
    assert info.value.retryable


def test_many_threads_share_one_client(server):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: load_image(f"{server}/photo.jpg?i={i}"), range(40)))
    assert len({r.source_sha256 for r in results}) == 1
    assert all(r.data == results[0].data for r in results)



# ---------------------------------------------------------------------------------------------- light path


def small(name: str = "coffee", size: tuple[int, int] = (160, 120)) -> Image.Image:
    return photo(name).resize(size, Image.Resampling.LANCZOS)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_png_chunk_before_iend(raw: bytes, kind: bytes, body: bytes) -> bytes:
    """`raw` with one more chunk after the pixel data, where a PNG writer may put its eXIf chunk."""
    iend = png_chunk(b"IEND", b"")
    assert raw.endswith(iend)
    return raw[: -len(iend)] + png_chunk(kind, body) + iend


def gps_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS latitude
    return exif.tobytes()


def png_16bit_rgb() -> bytes:
    """A 16-bit RGB PNG: Pillow opens it as mode "RGB", only IHDR tells its depth."""
    arr = np.asarray(small(), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def rgba_webp() -> bytes:
    im = small().convert("RGBA")
    im.paste((0, 0, 0, 0), (0, 0, 40, 40))
    return encoded(im, "WEBP")


XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description photoshop:City="Home"/></rdf:RDF></x:xmpmeta>'
JUNK = bytes(range(256)) * 160  # 40 KiB: past 1 byte per pixel (+ 16 KiB) for a 160x120 JPEG

LIGHT_CASES = {
    "RGB PNG": lambda: encoded(small(), "PNG"),
    "L PNG": lambda: encoded(small().convert("L"), "PNG"),
    "lossy RGB WebP": lambda: encoded(small(), "WEBP", quality=80),
    "lossless RGB WebP": lambda: encoded(small(), "WEBP", lossless=True),
    "L JPEG": lambda: encoded(small().convert("L"), "JPEG", quality=90),
    "progressive JPEG": lambda: encoded(small(), "JPEG", quality=90, progressive=True),
    "JPEG with EXIF holding only Orientation=1": lambda: encoded(small(), "JPEG", quality=90, exif=exif_with(1)),
    "PNG with eXIf Orientation=1 after the pixels": lambda: with_png_chunk_before_iend(
        encoded(small(), "PNG"), b"eXIf", exif_with(1)[6:]),
    "WebP with EXIF holding only Orientation=1": lambda: encoded(small(), "WEBP", exif=exif_with(1)),
    "JPEG with zero padding after EOI": lambda: encoded(small(), "JPEG", quality=90) + bytes(20),
}


@pytest.mark.parametrize("case", LIGHT_CASES)
def test_image_that_needs_no_work_is_sent_as_its_own_bytes(case):
    raw = LIGHT_CASES[case]()
    enc = prepare_image(raw)
    assert enc.data == raw
    src = Image.open(io.BytesIO(raw))
    assert enc.mime == Image.MIME[src.format] == {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[
        src.format]
    assert (enc.width, enc.height) == src.size
    assert enc.source_sha256 == hashlib.sha256(raw).hexdigest()
    decode(enc)


REENCODED_CASES = {
    "RGBA PNG": lambda: encoded(_rgba_with_hole(), "PNG"),
    "opaque RGBA PNG": lambda: encoded(small().convert("RGBA"), "PNG"),
    "P PNG": lambda: encoded(small().quantize(64), "PNG"),
    "16-bit RGB PNG": png_16bit_rgb,
    "16-bit grey PNG": lambda: encoded(Image.fromarray(np.asarray(small().convert("L"), dtype=np.uint16) * 257), "PNG"),
    "PNG with a tRNS chunk": lambda: encoded(small(), "PNG", transparency=(255, 255, 255)),
    "APNG": lambda: encoded(small(), "PNG", save_all=True, append_images=[small("rocket")]),
    "animated WebP": lambda: encoded(small(), "WEBP", save_all=True, append_images=[small("rocket")]),
    "WebP with alpha": rgba_webp,
    "CMYK JPEG": lambda: encoded(small().convert("CMYK"), "JPEG", quality=90),
    "RGB-coded JPEG": lambda: encoded(small(), "JPEG", quality=90, keep_rgb=True),
    "JPEG with orientation 6": lambda: encoded(small(), "JPEG", quality=90, exif=exif_with(6)),
    "JPEG with GPS in its EXIF": lambda: encoded(small(), "JPEG", quality=90, exif=gps_exif()),
    "JPEG with XMP": lambda: encoded(small(), "JPEG", quality=90, xmp=XMP),
    "PNG with GPS in an eXIf chunk after the pixels": lambda: with_png_chunk_before_iend(
        encoded(small(), "PNG"), b"eXIf", gps_exif()[6:]),
    "PNG with orientation 6 in an eXIf chunk after the pixels": lambda: with_png_chunk_before_iend(
        encoded(small(), "PNG"), b"eXIf", exif_with(6)[6:]),
    "PNG with XMP": lambda: with_png_chunk_before_iend(
        encoded(small(), "PNG"), b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + XMP),
    "WebP with GPS in its EXIF": lambda: encoded(small(), "WEBP", exif=gps_exif()),
    "JPEG with junk after EOI": lambda: encoded(small(), "JPEG", quality=90) + JUNK,
    "JPEG stuffed past 1 byte per pixel": lambda: encoded(small(), "JPEG", quality=90, comment=JUNK),
    "PNG stuffed past its raw pixel size": lambda: with_png_chunk_before_iend(
        encoded(small(), "PNG"), b"juNk", JUNK * 2),
}


@pytest.mark.parametrize("case", REENCODED_CASES)
def test_image_that_needs_work_or_carries_metadata_is_reencoded(case):
    raw = REENCODED_CASES[case]()
    enc = prepare_image(raw)
    assert enc.data != raw and enc.mime == "image/jpeg"
    out = decode(enc)
    assert out.format == "JPEG" and out.mode == "RGB"
    assert not out.getexif() and "exif" not in out.info and "xmp" not in out.info
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    assert out.size == upright.size
    assert np.asarray(out.convert("L")).std() > 20  # a photo, not a blank


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_image_over_max_pixels_is_reencoded_to_a_jpeg(fmt):
    raw = encoded(photo("coffee"), fmt)
    enc = prepare_image(raw, max_pixels=50_000)
    assert enc.mime == "image/jpeg" and decode(enc).format == "JPEG"
    assert enc.width * enc.height <= 50_000


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_reencode_sends_even_a_light_image_as_a_baseline_jpeg(fmt):
    src = small()
    raw = encoded(src, fmt)
    assert prepare_image(raw).data == raw  # would go the light way

    enc = prepare_image(raw, reencode=True)

    assert enc.data != raw and enc.mime == "image/jpeg"
    out = decode(enc)
    assert out.format == "JPEG" and "progressive" not in out.info
    assert out.size == src.size
    assert psnr(out.convert("RGB"), Image.open(io.BytesIO(raw)).convert("RGB")) > 30
    assert load_image(raw, reencode=True) == enc


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "JPEG"])
@pytest.mark.parametrize("cut", ["half", "last byte", "end marker"])
def test_truncated_small_image_is_never_sent_as_is(fmt, cut):
    raw = encoded(small(), fmt)
    keep = {"half": len(raw) // 2, "last byte": len(raw) - 1, "end marker": len(raw) - (12 if fmt == "PNG" else 2)}
    bad = raw[: keep[cut]]
    try:
        enc = prepare_image(bad)
    except ImageError:
        return
    assert enc.data != bad and enc.mime == "image/jpeg"


def test_arithmetic_coded_jpeg_is_not_sent_as_is():
    """Browsers and other decoders lack arithmetic coding: the frame marker says SOF9, not a light path."""
    raw = bytearray(encoded(small(), "JPEG", quality=90))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 1] = 0xC9
    raw = bytes(raw)
    try:
        enc = prepare_image(raw)
    except ImageError:
        return
    assert enc.data != raw and enc.mime == "image/jpeg"
