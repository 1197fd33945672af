"""The text tokenizer: a thin wrapper around the ``tokenizers`` library.

The checkpoints ship a ``LlamaTokenizerFast`` (``tokenizer.json`` plus
``tokenizer_config.json`` / ``special_tokens_map.json``); its encode / decode are those of
the underlying ``tokenizers.Tokenizer``, so we read ``tokenizer.json`` directly and never
import transformers.

Notable choices:

* ``encode`` never adds special tokens (the processor places bos / eos itself, as the
  reference does with ``add_special_tokens=False``). Special tokens written in the text
  (``<|ref|>``, ``<|grounding|>`` ...) are still recognised as single ids, except, with
  ``image_tag_is_text``, ``<image>``: then it is its characters' ids (an OpenAI-style
  message's text, ``processing/conversation.py``).
* ``decode`` drops ids outside ``[0, len(tokenizer))`` silently: the model's vocabulary
  (129280 real, 2688 golden) is larger than the tokenizer's, and a random or badly
  trained model can emit those ids. They decode to nothing, as in the reference.
* Like the reference processor, the pad token, the image token and the grounding / role
  tokens are added when the tokenizer lacks them (a no-op for the real tokenizer, which
  has them all; adding them would give ids the model never saw).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from ..errors import CheckpointError

__all__ = ["Tokenizer"]

DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"
# Tokens the reference processor registers as special (no-ops for the real tokenizer).
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")


def _token_name(value) -> str | None:
    """A token entry of tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Byte-level BPE tokenizer of a DeepSeek-VL2 checkpoint.

    Example::

        tok = Tokenizer.from_dir("checkpoints/deepseek-vl2-tiny")
        ids = tok.encode("<|User|>: hi")          # [2631, 28, ...] no bos added
        tok.decode([tok.bos_id] + ids)            # '<｜begin▁of▁sentence｜><|User|>: hi'
    """

    def __init__(self, hf_tokenizer: _HFTokenizer, *, bos_token: str = DEFAULT_BOS,
                 eos_token: str = DEFAULT_EOS, pad_token: str = DEFAULT_PAD,
                 image_token: str = "<image>"):
        self._tok = hf_tokenizer
        # Same order as the reference processor: pad, image, grounding tokens, roles.
        missing = [t for t in (pad_token, image_token, *GROUNDING_TOKENS, *ROLE_TOKENS)
                   if hf_tokenizer.token_to_id(t) is None]
        if missing:
            hf_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        for what, token in (("bos", bos_token), ("eos", eos_token)):
            if hf_tokenizer.token_to_id(token) is None:
                raise CheckpointError(f"tokenizer has no {what} token {token!r}")
        self.bos_token, self.eos_token, self.pad_token, self.image_token = bos_token, eos_token, pad_token, image_token
        self.bos_id: int = hf_tokenizer.token_to_id(bos_token)
        self.eos_id: int = hf_tokenizer.token_to_id(eos_token)
        self.pad_id: int = hf_tokenizer.token_to_id(pad_token)
        self.image_id: int = hf_tokenizer.token_to_id(image_token)
        self._len = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        added = hf_tokenizer.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, t in added.items() if t.special}
        self._added_ids = frozenset(added)
        self._plain: _HFTokenizer | None = None  # special tokens off (encode_special_tokens), made when needed
        self._plain_lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | Path, *, image_token: str = "<image>", pad_token: str | None = None) -> "Tokenizer":
        """Read ``tokenizer.json`` (required) and the bos / eos / pad names from
        ``tokenizer_config.json`` or ``special_tokens_map.json`` (optional) in ``path``."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json in this folder (a DeepSeek-VL2 checkpoint "
                                  "folder holds tokenizer.json, tokenizer_config.json and special_tokens_map.json)")
        try:
            hf = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust library raises a bare Exception on malformed files
            raise CheckpointError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
        names = {}
        for source in (_read_json(path / "special_tokens_map.json"), _read_json(path / "tokenizer_config.json")):
            for key in ("bos_token", "eos_token", "pad_token"):
                name = _token_name(source.get(key))
                if name is not None:
                    names[key] = name  # tokenizer_config.json wins, as it is read last
        return cls(hf, bos_token=names.get("bos_token", DEFAULT_BOS), eos_token=names.get("eos_token", DEFAULT_EOS),
                   pad_token=pad_token or names.get("pad_token", DEFAULT_PAD), image_token=image_token)

    def __len__(self) -> int:
        return self._len

    def encode(self, text: str, image_tag_is_text: bool = False) -> list[int]:
        """Token ids of ``text``; no bos / eos added. ``image_tag_is_text``: an ``<image>``
        in ``text`` is encoded as the characters it is made of, not as the image token (the
        other special tokens are still recognised)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        if not image_tag_is_text or self.image_id not in enc.ids:
            return enc.ids
        # The added tokens cut the text into stretches that are encoded on their own. Each
        # stretch between two other added tokens that holds an <image> is encoded again with
        # the special tokens off: it holds no other added token, so that turns only the
        # <image> into text, and its neighbours keep their ids.
        ids, offsets = enc.ids, enc.offsets
        out: list[int] = []
        start_tok, start_char = 0, 0
        for k in [k for k, i in enumerate(ids) if i in self._added_ids and i != self.image_id] + [len(ids)]:
            end_char = offsets[k][0] if k < len(ids) else len(text)
            stretch = ids[start_tok:k]
            if self.image_id in stretch:
                stretch = self._plain_tokenizer().encode(text[start_char:end_char], add_special_tokens=False).ids
            out.extend(stretch)
            if k < len(ids):
                out.append(ids[k])
                start_tok, start_char = k + 1, offsets[k][1]
        return out

    def _plain_tokenizer(self) -> _HFTokenizer:
        with self._plain_lock:
            if self._plain is None:
                plain = _HFTokenizer.from_str(self._tok.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the tokenizer (model-only vocabulary rows) are dropped."""
        n = self._len
        kept = [int(i) for i in ids if 0 <= int(i) < n]
        return self._tok.decode(kept, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None if the tokenizer does not have it."""
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        """Token string of one id (byte-level form, e.g. 'Ġthe'), or None if out of range."""
        if not 0 <= int(id) < self._len:
            return None
        return self._tok.id_to_token(int(id))

    def __repr__(self) -> str:
        return f"Tokenizer(len={self._len}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, image={self.image_id})"
