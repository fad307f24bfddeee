"""A loopback HTTP server with generated high-res images and a zoo of bad inputs.

``ZOO_EXPECTED`` says what the crawl must make of each path (with :data:`ZOO_CRAWL_OVERRIDES`).
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ps3_engine.pipeline.samples import synthetic_scene

GOOD_SIZE = (2048, 1536)

# Crawl settings the zoo's expectations assume (fast retries, short read timeout, small size cap).
ZOO_CRAWL_OVERRIDES = [
    "crawl.http.allow_private_addresses=true",
    "crawl.http.max_retries=2",
    "crawl.http.backoff_base_s=0.01",
    "crawl.http.read_timeout_s=0.5",
    "crawl.http.total_timeout_s=20",
    "crawl.http.max_bytes=8000000",
    "crawl.min_short_side=1024",
    "crawl.shard_size=8",
]

# path -> (category, reason); category "kept" means an image row survives dedup.
ZOO_EXPECTED: dict[str, tuple[str, str]] = {
    **{f"/good/{i}.jpg": ("kept", "") for i in range(6)},
    "/good/cmyk.jpg": ("kept", ""),
    "/good/rgba.png": ("kept", ""),
    "/good/palette.png": ("kept", ""),
    "/good/gray16.png": ("kept", ""),
    "/good/rotated.jpg": ("kept", ""),
    "/good/flaky-503.jpg": ("kept", ""),
    "/good/flaky-429.jpg": ("kept", ""),
    "/redirect-to-good": ("kept", ""),
    "/dup/exact.jpg": ("filtered", "duplicate_exact"),
    "/dup/near.jpg": ("filtered", "near_duplicate"),
    "/small.jpg": ("filtered", "too_small"),
    "/optout.jpg": ("filtered", "opt_out"),
    "/optout-agent.jpg": ("filtered", "opt_out"),
    "/missing.jpg": ("failed", "http_404"),
    "/error500.jpg": ("failed", "http_500"),
    "/slow.jpg": ("failed", "timeout"),
    "/page.html": ("failed", "not_an_image"),
    "/truncated.jpg": ("failed", "truncated"),
    "/empty.jpg": ("failed", "empty_body"),
    "/huge-headers.jpg": ("failed", "bad_headers"),
    "/loop-a": ("failed", "redirect_loop"),
    "/image.svg": ("failed", "unsupported_format"),
    "/anim.gif": ("failed", "unsupported_format"),
    "/bomb.png": ("failed", "decompression_bomb"),
    "/too-big.jpg": ("failed", "too_large"),
    # issue 14: one instance per kind (see also tests/stages/test_crawl_inputs.py for URL-list lines)
    "/big-xmp.png": ("failed", "oversized_metadata"),  # 2 MB zipped iTXt: Pillow raises a plain ValueError
    "/corrupt-mid.jpg": ("failed", "corrupt"),  # 400 bytes overwritten mid-scan: Pillow decodes it "fine"
    "/float01.tif": ("kept", ""),  # float32 in [0, 1]: must not become black
    "/anim.webp": ("failed", "animated"),
    "/anim.png": ("failed", "animated"),  # APNG
    "/anim-real.gif": ("failed", "animated"),
    "/redirect-metadata": ("failed", "blocked_address"),  # -> 169.254.169.254 despite allow_private_addresses
    "/creds.jpg": ("kept", ""),  # listed as http://user:secret@host/creds.jpg: stored without the credentials
}

# Issue 14 instances and siblings that only the full-pipeline input zoo lists (tests/pipeline/test_input_zoo.py),
# kept apart so the crawl tests' counts over ZOO_EXPECTED stay as they are. path -> crawl (category, reason).
ZOO_EXTRA_EXPECTED: dict[str, tuple[str, str]] = {
    "/thrice.jpg": ("kept", ""),  # kind 2: listed three times; the two repeats are duplicate_exact
    "/blank-white.jpg": ("kept", ""),  # kind 5: a plain white 2048x1536 JPEG; segment: no_salient_region
    "/sparse-7999.png": ("kept", ""),  # kind 8: a ~190 KB PNG of 7999x7999, validated within the pixel budget
    "/low16-a.png": ("kept", ""),  # 16-bit PNGs holding 8-bit values: their pHashes were both 0, so
    "/low16-b.png": ("kept", ""),  # the second was dropped as a near-duplicate of the first. Like
    # /good/gray16.png they render black on the 16-bit scale, so segment ends them as no_salient_region.
    "/truncated.webp": ("failed", "truncated"),  # kind 3/10: libwebp refused it at open ("corrupt")
    "/bad-exif.jpg": ("kept", ""),  # garbage EXIF IFD, intact pixels
    "/from-parquet.jpg": ("kept", ""),  # listed only by the zoo's Parquet list (large_string url column)
    "/redirect-file": ("failed", "invalid_url"),  # kind 7: a redirect to file:///etc/passwd
    "/redirect-metadata-v6": ("failed", "blocked_address"),  # -> http://[::ffff:169.254.169.254]/
}

# Paths listed with credentials in the URL; nothing stored or logged may contain CREDENTIAL_SECRET.
CREDENTIAL_SECRET = "s3cr3t-zoo-password"
CREDENTIAL_PATHS = frozenset({"/creds.jpg"})


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with a tiny (incomplete) body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def corrupt_mid_stream(jpeg: bytes, num_bytes: int = 400, seed: int = 1) -> bytes:
    """``jpeg`` with ``num_bytes`` random bytes written over the middle of its entropy-coded data.

    With the default seed Pillow decodes the zoo's result without any error (garbled rows, no exception).
    """
    rng = np.random.default_rng(seed)
    data = bytearray(jpeg)
    middle = len(data) // 2
    data[middle : middle + num_bytes] = rng.integers(0, 256, num_bytes, dtype=np.uint8).tobytes()
    return bytes(data)


def big_text_chunk_png(size: tuple[int, int] = (1300, 1100)) -> bytes:
    """A PNG whose zip-compressed iTXt (XMP) chunk inflates to 2 MB, past Pillow's 1 MB text limit."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", " " * (2 << 20), zip=True)
    return _encode(Image.new("RGB", size, "teal"), "PNG", pnginfo=info)


def float_tiff(scene: Image.Image) -> bytes:
    """A float32 TIFF of ``scene``'s grey levels scaled to [0, 1]."""
    grey = np.asarray(scene.convert("L"), dtype=np.float32) / 255.0
    return _encode(Image.fromarray(grey, mode="F"), "TIFF")


def animation(fmt: str, size: tuple[int, int] = (96, 64), frames: int = 3) -> bytes:
    """A small animation of ``frames`` solid colours (GIF, WebP or APNG)."""
    images = [Image.new("RGB", size, colour) for colour in ("red", "green", "blue")[:frames]]
    return _encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


def build_assets(cache: Path) -> dict[str, bytes]:
    """Bytes for every static path; cached on disk because encoding 2K images takes a while."""
    cache.mkdir(parents=True, exist_ok=True)

    def cached(name: str, make) -> bytes:
        path = cache / name
        if not path.exists():
            path.write_bytes(make())
        return path.read_bytes()

    scene = lambda seed, size=GOOD_SIZE: synthetic_scene(size[0], size[1], seed)  # noqa: E731
    assets = {
        f"/good/{i}.jpg": cached(
            f"good{i}.jpg",
            lambda i=i: _encode(scene(i, GOOD_SIZE if i % 2 == 0 else GOOD_SIZE[::-1]), "JPEG", quality=90),
        )
        for i in range(6)
    }
    assets["/good/cmyk.jpg"] = cached("cmyk.jpg", lambda: _encode(scene(10).convert("CMYK"), "JPEG", quality=90))
    assets["/good/rgba.png"] = cached("rgba.png", lambda: _encode(scene(11).convert("RGBA"), "PNG", compress_level=1))
    assets["/good/palette.png"] = cached(
        "palette.png", lambda: _encode(scene(12).quantize(64), "PNG", compress_level=1)
    )
    assets["/good/gray16.png"] = cached(
        "gray16.png", lambda: _encode(scene(13).convert("L").convert("I;16"), "PNG", compress_level=1)
    )

    def rotated() -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6
        return _encode(scene(14), "JPEG", quality=90, exif=exif.tobytes())

    assets["/good/rotated.jpg"] = cached("rotated.jpg", rotated)
    assets["/good/flaky-503.jpg"] = cached("flaky503.jpg", lambda: _encode(scene(15), "JPEG", quality=90))
    assets["/good/flaky-429.jpg"] = cached("flaky429.jpg", lambda: _encode(scene(16), "JPEG", quality=90))
    assets["/good/redirect-target.jpg"] = cached("target.jpg", lambda: _encode(scene(17), "JPEG", quality=90))
    assets["/error500.jpg"] = cached("healed500.jpg", lambda: _encode(scene(18), "JPEG", quality=90))
    assets["/dup/exact.jpg"] = assets["/good/0.jpg"]
    assets["/dup/near.jpg"] = cached(
        "near.jpg",
        lambda: _encode(Image.open(io.BytesIO(assets["/good/1.jpg"])).resize((1440, 1920)), "JPEG", quality=75),
    )
    assets["/small.jpg"] = cached("small.jpg", lambda: _encode(scene(20, (800, 600)), "JPEG", quality=90))
    assets["/optout.jpg"] = cached("optout.jpg", lambda: _encode(scene(21), "JPEG", quality=90))
    assets["/optout-agent.jpg"] = cached("optout2.jpg", lambda: _encode(scene(22), "JPEG", quality=90))
    assets["/truncated.jpg"] = assets["/good/2.jpg"][: len(assets["/good/2.jpg"]) // 2]
    assets["/empty.jpg"] = b""
    assets["/page.html"] = b"<!doctype html><html><body>not an image</body></html>"
    assets["/image.svg"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="4096" height="4096"></svg>'
    assets["/anim.gif"] = cached("anim.gif", lambda: _encode(scene(23).convert("P"), "GIF"))
    assets["/bomb.png"] = _png_bomb(30000, 30000)
    assets["/big-xmp.png"] = cached("big-xmp.png", big_text_chunk_png)
    assets["/corrupt-mid.jpg"] = corrupt_mid_stream(assets["/good/3.jpg"])
    assets["/float01.tif"] = cached("float01.tif", lambda: float_tiff(scene(24, (1280, 1024))))
    assets["/anim.webp"] = animation("WEBP")
    assets["/anim.png"] = animation("PNG")
    assets["/anim-real.gif"] = animation("GIF")
    assets["/creds.jpg"] = cached("creds.jpg", lambda: _encode(scene(25), "JPEG", quality=90))
    assets.update(_extra_assets(cached, scene))
    return assets


def low_bit_depth_png(scene: Image.Image) -> bytes:
    """A 16-bit grey PNG whose values are ``scene``'s 8-bit grey levels (max <= 255), as careless tools write."""
    return _encode(Image.fromarray(np.asarray(scene.convert("L"), dtype=np.uint16)), "PNG", compress_level=1)


def bad_exif_jpeg(scene: Image.Image) -> bytes:
    """A good JPEG with an APP1 Exif segment whose IFD entries are random bytes."""
    jpeg = _encode(scene, "JPEG", quality=90)
    noise = np.random.default_rng(7).integers(0, 256, 60, dtype=np.uint8).tobytes()
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05" + noise
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:]


def _extra_assets(cached, scene) -> dict[str, bytes]:
    """Bytes for :data:`ZOO_EXTRA_EXPECTED`."""
    webp = cached("cut.webp", lambda: _encode(scene(31, (1280, 1024)), "WEBP", quality=80))
    return {
        "/thrice.jpg": cached("thrice.jpg", lambda: _encode(scene(26), "JPEG", quality=90)),
        "/blank-white.jpg": cached("white.jpg", lambda: _encode(Image.new("RGB", GOOD_SIZE, "white"), "JPEG")),
        "/sparse-7999.png": cached("sparse.png", lambda: _encode(Image.new("RGB", (7999, 7999), "teal"), "PNG")),
        "/low16-a.png": cached("low16a.png", lambda: low_bit_depth_png(scene(27, (1280, 1024)))),
        "/low16-b.png": cached("low16b.png", lambda: low_bit_depth_png(scene(28, (1280, 1024)))),
        "/truncated.webp": webp[: len(webp) // 2],
        "/bad-exif.jpg": cached("badexif.jpg", lambda: bad_exif_jpeg(scene(29))),
        "/from-parquet.jpg": cached("parquet.jpg", lambda: _encode(scene(30), "JPEG", quality=90)),
    }


CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}


class ZooServer:
    def __init__(self, assets: dict[str, bytes]) -> None:
        self.assets = assets
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.healed = False  # flips /error500.jpg to a good image (for --retry-failed tests)
        self.authorization_headers: list[str] = []  # any Authorization a request carried (must stay empty)
        self.base_url = ""

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def urls(self) -> list[str]:
        """The zoo's list lines; :data:`CREDENTIAL_PATHS` carry a user and password in the URL."""
        return [self.url_with_credentials(p) if p in CREDENTIAL_PATHS else self.url(p) for p in ZOO_EXPECTED]

    def url_with_credentials(self, path: str) -> str:
        return self.url(path).replace("://", f"://zoo-user:{CREDENTIAL_SECRET}@", 1)

    def reset(self) -> None:
        """Forget request counts so flaky routes fail once again (one crawl = one fresh server)."""
        with self.lock:
            self.requests.clear()

    def path_of(self, url: str) -> str:
        return url.removeprefix(self.base_url)

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests[path]


def _handler(zoo: ZooServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with zoo.lock:
                zoo.requests[path] += 1
                seen = zoo.requests[path]
                if self.headers.get("Authorization"):
                    zoo.authorization_headers.append(self.headers["Authorization"])
            suffix = Path(path).suffix
            ctype = {"Content-Type": CONTENT_TYPES.get(suffix, "application/octet-stream")}
            if path == "/good/flaky-503.jpg" and seen == 1:
                return self._send(503, b"busy", {"Retry-After": "1"})
            if path == "/good/flaky-429.jpg" and seen == 1:
                return self._send(429, b"slow down", {"Retry-After": "1"})
            if path == "/error500.jpg" and not zoo.healed:
                return self._send(500, b"oops")
            if path == "/slow.jpg":
                time.sleep(1.5)
                return self._send(200, zoo.assets["/good/0.jpg"], ctype)
            if path == "/huge-headers.jpg":
                self.send_response(200)
                for i in range(150):
                    self.send_header(f"X-Filler-{i}", "x" * 20)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if path == "/loop-a":
                return self._send(302, b"", {"Location": "/loop-b"})
            if path == "/loop-b":
                return self._send(302, b"", {"Location": "/loop-a"})
            if path == "/redirect-metadata":
                return self._send(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
            if path == "/redirect-file":
                return self._send(302, b"", {"Location": "file:///etc/passwd"})
            if path == "/redirect-metadata-v6":
                return self._send(302, b"", {"Location": "http://[::ffff:169.254.169.254]/latest/meta-data/"})
            if path == "/redirect-to-good":
                return self._send(301, b"", {"Location": "/good/redirect-target.jpg"})
            if path == "/too-big.jpg":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(50_000_000))
                self.end_headers()
                self.wfile.write(b"\xff\xd8" + b"\0" * 1024)
                self.close_connection = True
                return None
            if path == "/optout.jpg":
                return self._send(200, zoo.assets[path], {**ctype, "X-Robots-Tag": "noai"})
            if path == "/optout-agent.jpg":
                return self._send(200, zoo.assets[path], {**ctype, "X-Robots-Tag": "examplebot: noimageai, nofollow"})
            if path in zoo.assets:
                return self._send(200, zoo.assets[path], ctype)
            return self._send(404, b"not found", {"Content-Type": "text/plain"})

    return Handler


@contextmanager
def serve_zoo(cache: Path) -> Iterator[ZooServer]:
    zoo = ZooServer(build_assets(cache))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(zoo))
    server.daemon_threads = True
    zoo.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield zoo
    finally:
        server.shutdown()
        server.server_close()
