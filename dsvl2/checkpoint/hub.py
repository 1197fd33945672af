"""Model names -> local checkpoint folders.

A name is, in this order: an existing folder; ``demo`` (the small random checkpoint
shipped inside the package); a Hugging Face model id such as
``deepseek-ai/deepseek-vl2-tiny``, looked up first in the local Hugging Face cache and
then downloaded with ``huggingface_hub`` when the hub is reachable. When it is not, the
error says so and how to use a local folder instead.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from ..errors import CheckpointError

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"
KNOWN = ("deepseek-ai/deepseek-vl2-tiny", "deepseek-ai/deepseek-vl2-small", "deepseek-ai/deepseek-vl2")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


def resolve_model(name: str | Path, offline: bool | None = None) -> Path:
    """Return the local folder of a checkpoint, downloading it by id if needed.

    ``offline``: never download (None: huggingface_hub's ``HF_HUB_OFFLINE`` setting)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a model folder (no config.json in it)")
        return path
    if text == "demo":
        return DEMO
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the model's folder (the one with config.json)")
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder not found: {text} (pass a checkpoint folder with config.json, "
                              f"or a Hugging Face id such as {KNOWN[0]})")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError  # noqa: F401  (import check only)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{text}: huggingface_hub is not installed; download the model and pass its folder") from None
    try:
        return Path(snapshot_download(text, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not in the local cache: try the hub
    if offline is None:
        from huggingface_hub import constants
        offline = bool(constants.HF_HUB_OFFLINE)
    local_copy = (f"download it on a machine with internet access (hf download {text} --local-dir DIR), "
                  "copy the folder here and pass the folder instead of the id: dsvl2 chat -m DIR.")
    if offline:
        raise CheckpointError(f"{text} is not in the local Hugging Face cache and offline mode is on "
                              "(HF_HUB_OFFLINE), so it cannot be downloaded. Unset HF_HUB_OFFLINE to download "
                              f"it, or {local_copy}")
    try:
        return Path(snapshot_download(text, allow_patterns=_PATTERNS))
    except Exception as e:  # network errors come in many types (requests, httpx, OSError, hub errors)
        if _unreachable(e):
            raise CheckpointError(f"cannot download {text}: the Hugging Face hub cannot be reached from this "
                                  f"machine ({_reason(_root(e))}). To use a local copy instead, {local_copy}") from None
        raise CheckpointError(f"cannot download {text}: the Hugging Face hub refused or failed the download "
                              f"({_reason(e)}). Check the id (the released models are {', '.join(KNOWN)}); "
                              f"to use a local copy instead, {local_copy}") from None


def _root(e: BaseException) -> BaseException:
    """The innermost exception (e.g. the socket error under the hub's and httpx's wrappers)."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return e


def _reason(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, cut at a word (never mid-word), no errno prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text).rstrip(". ")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def _unreachable(e: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says the network / hub was not reachable."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if (isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or "Connect" in name
                or "Timeout" in name or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")):
            return True
        e = e.__cause__ or e.__context__
    return False
