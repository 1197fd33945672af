"""Where a request's images may come from, and how big they may be.

An ``image_url`` is turned into encoded image bytes here, before the processor sees it:

* ``data:image/<format>;base64,...``: decoded (bad base64 -> 400). Always allowed.
* ``http(s)://``: refused unless the server runs with ``--allow-fetch``; then fetched by
  ``fetch.Fetcher``: public addresses only (``--allow-fetch-private`` adds loopback and
  private networks; link-local and cloud metadata never), the address checked is the one
  connected to, one deadline for the whole image (``--fetch-timeout``), a size limit, at
  most 3 redirects, each checked the same way. The server fetches in its own thread pool
  (``app.py``), so slow URLs never hold the workers that prepare other requests.
* a local path (absolute, or relative to the directory) or ``file://`` URL: only under
  ``--allowed-local-dir``; symlinks are resolved first, so neither ``..`` nor a link can
  leave the directory.

Each image's declared size is read from its header (no decoding) and refused with 413
beyond ``max_image_pixels``, so a decompression bomb costs nothing. Decoding itself (and
its errors: not an image, truncated) is the processor's.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request
from .fetch import DEFAULT_TIMEOUT_S, MAX_REDIRECTS, Connector, Fetcher, FetchError, Resolver
from .schema import ImageRef

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass
class ImagePolicy:
    allow_fetch: bool = False
    allowed_local_dir: Path | None = None
    max_image_pixels: int = 2 * Image.MAX_IMAGE_PIXELS
    max_image_bytes: int = 32 << 20  # of one fetched or local file
    fetch_timeout_s: float = DEFAULT_TIMEOUT_S  # the whole fetch of one image, redirects included
    allow_fetch_private: bool = False  # loopback and private networks too
    max_redirects: int = MAX_REDIRECTS
    resolve: Resolver | None = None    # tests inject these; None: the system's lookup / connect
    connect: Connector | None = None

    def load(self, ref: ImageRef, data: bytes | None = None) -> bytes:
        """The encoded image of one ``image_url`` (``data``: its bytes, already fetched),
        checked against the pixel limit."""
        if data is None:
            scheme = url_scheme(ref.url)
            if scheme == "data":
                data = _data_url(ref)
            elif scheme in ("http", "https"):
                data = self.fetch(ref)
            elif scheme in ("file", "") or len(scheme) == 1:  # a path (a one-letter scheme: a Windows drive)
                data = self._local(ref)
            else:
                raise bad_request(f"{ref.param}: URL scheme {scheme!r} is not supported; send the image as a "
                                  "data:image/<format>;base64,... URL", param=ref.param, code="invalid_image_url")
        self._check_pixels(data, ref)
        return data

    def fetches(self, ref: ImageRef) -> bool:
        """Whether ``ref`` is one this policy would fetch over the network."""
        return self.allow_fetch and url_scheme(ref.url) in ("http", "https")

    def fetch(self, ref: ImageRef) -> bytes:
        """The bytes at an http(s) ``ref``, or the 400 / 413 that says why not."""
        if not self.allow_fetch:
            raise bad_request(f"{ref.param}: this server does not fetch remote images ({ref.url[:80]!r}); send "
                              "the image as a data:image/<format>;base64,... URL, or start the server with "
                              "--allow-fetch", param=ref.param, code="invalid_image_url")
        fetcher = Fetcher(allow_private=self.allow_fetch_private, timeout_s=self.fetch_timeout_s,
                          max_bytes=self.max_image_bytes, max_redirects=self.max_redirects,
                          resolve=self.resolve, connect=self.connect)
        try:
            return fetcher.fetch(ref.url)
        except FetchError as e:
            raise APIError(e.status, f"{ref.param}: fetching {ref.url[:80]!r} failed: {e}", param=ref.param,
                           code=e.code) from None

    def _local(self, ref: ImageRef) -> bytes:
        if self.allowed_local_dir is None:
            raise bad_request(f"{ref.param}: this server does not read local files ({ref.url[:80]!r}); send the "
                              "image as a data:image/<format>;base64,... URL, or start the server with "
                              "--allowed-local-dir DIR", param=ref.param, code="invalid_image_url")
        raw = ref.url
        if raw.lower().startswith("file:"):
            parsed = urllib.parse.urlparse(raw)
            if parsed.netloc not in ("", "localhost"):
                raise bad_request(f"{ref.param}: file URLs must name a local path (file:///...), got {raw[:80]!r}",
                                  param=ref.param, code="invalid_image_url")
            raw = urllib.parse.unquote(parsed.path)
        root = self.allowed_local_dir.resolve()
        try:
            path = (root / raw).resolve(strict=True)  # an absolute raw replaces root
        except (OSError, RuntimeError):
            path = None
        if path is None or not path.is_relative_to(root):
            # One message for "missing" and "outside": the answer must not tell what exists elsewhere.
            raise bad_request(f"{ref.param}: {raw[:80]!r} is not a file under the allowed directory {str(root)!r}",
                              param=ref.param, code="invalid_image_url")
        if not path.is_file():
            raise bad_request(f"{ref.param}: {raw[:80]!r} is not a file", param=ref.param, code="invalid_image_url")
        size = path.stat().st_size
        if size > self.max_image_bytes:
            raise self._too_big(ref, size)
        return path.read_bytes()

    def _too_big(self, ref: ImageRef, size: int) -> APIError:
        return APIError(413, f"{ref.param}: the image file has {size} bytes; at most {self.max_image_bytes} "
                        "are allowed", param=ref.param, code="image_too_large")

    def _check_pixels(self, data: bytes, ref: ImageRef) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:  # reads the header only
                    w, h = img.size
        except Image.DecompressionBombError:
            w = h = None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise bad_request(f"{ref.param}: the data is not an image this server can read (use JPEG, PNG, "
                              "WebP, GIF, BMP or TIFF)", param=ref.param, code="invalid_image") from None
        if w is None or w * h > self.max_image_pixels:
            size = "more than Pillow's limit of" if w is None else f"{w}x{h} = {w * h}"
            raise APIError(413, f"{ref.param}: the image has {size} pixels; at most {self.max_image_pixels} "
                           "are allowed", param=ref.param, code="image_too_large")


def url_scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _data_url(ref: ImageRef) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise bad_request(f"{ref.param}: expected a data URL 'data:image/<format>;base64,<data>', got "
                          f"{ref.url[:40]!r}", param=ref.param, code="invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{ref.param}: the data URL's payload is not valid base64 ({e})",
                          param=ref.param, code="invalid_image") from None
