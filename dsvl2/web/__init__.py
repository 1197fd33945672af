"""The browser chat page of ``dsvl2 serve``: ``mount(app)`` adds it to the API's FastAPI app.

The page is a small static client of the API itself (``index.html``, ``style.css`` and
the JavaScript modules ``*.js``, entry ``app.js``, which lists the others; no build step,
nothing from a CDN): it posts to ``/v1/chat/completions`` and reads the server-sent
events, so browser users and API users are requests of ONE engine and share its
continuous batch. Notable choices:

* Own page, not Gradio: Gradio would be a second server framework (its own queue,
  process model and event protocol) beside the API, a heavy install, and its history
  state and share links are what the official demo got wrong. A page over the API
  needs nothing but the API.
* Each browser tab is its own conversation: the history lives in the tab's JavaScript
  memory only and is sent with each request (the server keeps no chat state), so two
  people can never see each other's messages.
* Files are served from an allow-list (the page's files in this folder and the bundled
  example images), never a directory listing; every response carries a
  Content-Security-Policy that allows only this origin's scripts and styles, so even a
  bug that put model output into HTML could not run script (the page renders model
  output as text anyway). ``script-src 'self'`` covers the page's module imports too.
* ``/web/config`` tells the page the sampling defaults (from ``SamplingParams``, so the
  defaults shown are the engine's), the image limits the page checks before sending,
  and the examples.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.sampling import SamplingParams

__all__ = ["mount", "EXAMPLES", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_IMAGES_PER_MESSAGE"]

HERE = Path(__file__).resolve().parent

# Checked in the browser before an image is attached, so that a user gets a plain
# message at once instead of uploading a huge file. 20 MB holds any photo or scan;
# 40 megapixels is far more than the model sees (it tiles to at most a few 384 px crops)
# and keeps the browser's own decoding of thumbnails bounded.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGES_PER_MESSAGE = 8

# (file in examples/, button title, prompt): one photo, one grounding request, one diagram.
EXAMPLES = [
    ("monday.jpg", "Describe a photo", "Describe this image."),
    ("watermelon.jpg", "Find objects (grounding)", "<|grounding|>Find <|ref|>the watermelon slices<|/ref|>."),
    ("stages.jpg", "Read a diagram", "What are the three training stages in this diagram?"),
]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".jpg": "image/jpeg", ".png": "image/png"}

# data: and blob: images are the user's uploads and their thumbnails; connect-src 'self'
# is the API. Nothing else, from nowhere else.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def static_files() -> dict[str, Path]:
    """URL name under /static/ -> file: the allow-list of what the page may load."""
    files = {"style.css": HERE / "style.css"}
    for path in sorted(HERE.glob("*.js")):  # app.js and the modules it imports
        files[path.name] = path
    for name, _, _ in EXAMPLES:
        files[f"examples/{name}"] = HERE / "examples" / name
    return files


def page_config() -> dict:
    d = SamplingParams()
    return {
        "defaults": {"temperature": d.temperature, "top_p": d.top_p, "max_new_tokens": d.max_new_tokens},
        "limits": {"max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS,
                   "max_images_per_message": MAX_IMAGES_PER_MESSAGE},
        "examples": [{"url": f"/static/examples/{name}", "title": title, "prompt": prompt}
                     for name, title, prompt in EXAMPLES],
    }


def mount(app) -> None:
    """Serve the chat page at ``/``, its files under ``/static/`` and ``/web/config``."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse, JSONResponse

    files = static_files()
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

    def send(path: Path) -> FileResponse:
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=headers)

    @app.get("/", include_in_schema=False)
    def index():
        return send(HERE / "index.html")

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str):
        path = files.get(name)
        if path is None:
            raise HTTPException(status_code=404, detail=f"no file {name!r} here")
        return send(path)

    @app.get("/web/config", include_in_schema=False)
    def config():
        return JSONResponse(page_config(), headers=headers)
