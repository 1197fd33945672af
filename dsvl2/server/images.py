"""Where a request's images may come from, and how big they may be.

An ``image_url`` is turned into encoded image bytes here, before the processor sees it:

* ``data:image/<format>;base64,...``: decoded (bad base64 -> 400). Always allowed.
* ``http(s)://``: refused unless the server runs with ``--allow-fetch``; then fetched
  with a timeout and a size limit, following redirects to http(s) only. Fetching lets a
  client make the server request any URL it can reach (its own network included), which
  is why it is off by default.
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
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import APIError, bad_request
from .schema import ImageRef

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass
class ImagePolicy:
    allow_fetch: bool = False
    allowed_local_dir: Path | None = None
    max_image_pixels: int = 2 * Image.MAX_IMAGE_PIXELS
    max_image_bytes: int = 32 << 20  # of one fetched or local file
    fetch_timeout_s: float = 10.0

    def load(self, ref: ImageRef) -> bytes:
        """The encoded image of one ``image_url``, checked against the pixel limit."""
        url = ref.url
        m = _SCHEME.match(url)
        scheme = m.group(1).lower() if m else ""
        if scheme == "data":
            data = _data_url(ref)
        elif scheme in ("http", "https"):
            data = self._fetch(ref)
        elif scheme in ("file", "") or len(scheme) == 1:  # a path (a one-letter scheme: a Windows drive)
            data = self._local(ref)
        else:
            raise bad_request(f"{ref.param}: URL scheme {scheme!r} is not supported; send the image as a "
                              "data:image/<format>;base64,... URL", param=ref.param, code="invalid_image_url")
        self._check_pixels(data, ref)
        return data

    def _fetch(self, ref: ImageRef) -> bytes:
        if not self.allow_fetch:
            raise bad_request(f"{ref.param}: this server does not fetch remote images ({ref.url[:80]!r}); send "
                              "the image as a data:image/<format>;base64,... URL, or start the server with "
                              "--allow-fetch", param=ref.param, code="invalid_image_url")
        opener = urllib.request.build_opener(_HTTPOnlyRedirects)
        req = urllib.request.Request(ref.url, headers={"User-Agent": "dsvl2-server"})
        try:
            with opener.open(req, timeout=self.fetch_timeout_s) as resp:
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_image_bytes:
                    raise self._too_big(ref, int(declared))
                data = resp.read(self.max_image_bytes + 1)
        except APIError:
            raise
        except urllib.error.HTTPError as e:
            raise bad_request(f"{ref.param}: fetching {ref.url[:80]!r} failed with HTTP {e.code}",
                              param=ref.param, code="image_fetch_failed") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise bad_request(f"{ref.param}: fetching {ref.url[:80]!r} failed ({reason})",
                              param=ref.param, code="image_fetch_failed") from None
        if len(data) > self.max_image_bytes:
            raise self._too_big(ref, len(data))
        return data

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


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http URL {newurl[:80]!r} refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
