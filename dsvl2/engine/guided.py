"""Guided decoding: outputs that follow a JSON schema, a regular expression, a list of
choices or a grammar.

``Guide`` says what the output must be (hashable, so a request's ``SamplingParams`` stay
hashable and each distinct guide is compiled once). The engine compiles it when the
request is made (``Engine.compile_guide``: errors reach the caller) and gives each
request a matcher that masks, at every step, the tokens that cannot continue a valid
output (``fill_mask``), follows the sampled tokens (``accept``) and says when the output
is complete (``done``).

The grammar library is llguidance (chosen by measurement against xgrammar and
outlines-core: ``benchmarks/bench_guided.py``, numbers in its report); it is imported
when the first guide is compiled, so ``Guide`` itself needs nothing installed. What each
kind means:

* ``json_schema``: JSON that validates against the schema. Enforced while decoding:
  ``type`` (object, array, string, integer, number, boolean, null, or a list of them),
  ``properties``, ``required``, ``additionalProperties`` (false, true or a schema),
  ``patternProperties``, ``enum``, ``const``, ``items``, ``prefixItems`` (and draft-7
  tuple ``items`` / ``additionalItems``), ``minItems`` / ``maxItems``, ``minimum`` /
  ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum``, ``multipleOf``,
  ``minLength`` / ``maxLength``, ``pattern``, ``format`` (date-time, date, time,
  duration, email, hostname, ipv4, ipv6, uuid, uri; another format is an error),
  ``anyOf``, ``oneOf`` (as anyOf), ``allOf``, ``$ref`` / ``$defs``, ``minProperties`` /
  ``maxProperties`` (when every listed property is required), and annotations
  (``title``, ``description``, ``default``, ``examples``, ``$schema`` ...). Properties
  come in the order the schema lists them (``Guide.json_schema`` keeps a dict's order).
  Any other keyword (``uniqueItems``, ``not``, ``if`` / ``then`` / ``else``,
  ``contains``, ``dependentRequired``, ``dependentSchemas``, ``propertyNames``,
  ``unevaluatedProperties`` ...) is refused with a ``GenerationError`` naming it: a
  guided output is never silently less constrained than asked (llguidance's
  ``lenient`` mode is forced off, and a schema's own ``x-guidance`` options cannot turn
  it on). A random or weak model may never close a free string or a number's fraction
  digits; ``maxLength`` / ``maximum`` + ``multipleOf`` bound them.
* ``json_object``: any JSON object (``{"type": "object"}``).
* ``regex``: text that the pattern matches whole (as ``re.fullmatch``), in the syntax of
  Rust's ``regex`` crate (Python's for everything but look-around and back-references,
  which are refused; ``\\w`` / ``\\d`` are Unicode-aware as in Python, with small
  differences in what ``\\w`` counts as a letter).
* ``choice``: exactly one of the strings.
* ``grammar``: a context-free grammar in llguidance's Lark dialect (``start: ...`` rules,
  ``"literal"`` and ``/regex/`` terminals, ``%ignore``, ``%json {...}`` for an embedded
  schema; see the syntax page of llguidance's documentation), or a llama.cpp GBNF grammar (``root ::= ...``),
  which llguidance converts to Lark.

Whitespace in JSON is bounded: at most one space between two JSON tokens and no
newlines (``{"a": 1, "b": [2, 3]}`` and ``{"a":1}`` both pass; ``{"a":  1}`` does not).
A grammar that allowed free whitespace would let a weak model emit spaces until
``max_new_tokens``. A user's ``grammar`` keeps whatever whitespace it says.

Grounding stays available as data. The model's own grounding markup (``<|ref|>label
<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``) is made of special tokens, which a guide
never allows (a schema that spells ``<|ref|>`` in a const gets those characters as
text, not the special id), so ask for the boxes in the JSON instead, keeping the
grounding prompt (``<|grounding|>`` in the conversation) so the model is in its
detection mode: e.g. ``{"type": "object", "properties": {"objects": {"type": "array",
"maxItems": 20, "items": {"type": "object", "properties": {"label": {"type": "string",
"maxLength": 80}, "box": {"type": "array", "items": {"type": "integer", "minimum": 0,
"maximum": 999}, "minItems": 4, "maxItems": 4}}, "required": ["label", "box"],
"additionalProperties": false}}}, "required": ["objects"], "additionalProperties":
false}``. The box is [x1, y1, x2, y2] on the model's 0..999 grid of the original image,
as in its ``<|det|>`` output, so ``dsvl2.grounding.to_pixels(box, width, height)`` turns
it into pixels and ``draw_grounding(image, [Ref(label, [tuple(box)]) ...])`` draws it. Guided output is not parsed for
grounding markup (there is none); the caller reads the boxes from the JSON.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guide:
    """What a guided output must be. ``spec``: the schema as JSON text (json_schema), the
    pattern (regex), the choices as a JSON list (choice), the grammar text (grammar), or
    "" (json_object: any JSON object)."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Guide.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> Guide:
        # keys keep their order: the output lists an object's properties in the schema's order
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Guide:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Guide:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> Guide:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, text: str) -> Guide:
        return cls("grammar", text)


# llguidance's JSON options: no free whitespace (one optional space between JSON tokens),
# unknown keywords are errors whatever the schema's "x-guidance" says (these override it).
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?", "item_separator": ",",
                "key_separator": ":", "lenient": False, "coerce_one_of": True}
CACHE_SIZE = 64


def _error(msg: str):
    from ..errors import GenerationError

    return GenerationError(msg)


# ---- the tokenizer as bytes --------------------------------------------------------------
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character standing for it
    (``Ġ`` for a space, ``Ċ`` for a newline)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for, or None for the tokenizer's added tokens (bos,
    eos, pad, <image>, <|ref|> ...: control tokens, never part of guided text).

    Byte-level BPE (the DeepSeek tokenizers): each character of a token's string is one
    byte (``byte_level_alphabet``). SentencePiece-style vocabularies with byte fallback
    (``<0x0A>``, ``▁`` for a space) are read too; anything else is refused."""
    hf = tokenizer._tok  # the underlying tokenizers.Tokenizer
    n = len(tokenizer)
    vocab = hf.get_vocab(with_added_tokens=True)
    added = set(hf.get_added_tokens_decoder())
    strings: list[str | None] = [None] * n
    for s, i in vocab.items():
        if 0 <= i < n and i not in added:
            strings[i] = s
    decoder = repr(hf.decoder) if hf.decoder is not None else ""
    pre = repr(hf.pre_tokenizer) if hf.pre_tokenizer is not None else ""
    out: list[bytes | None] = [None] * n
    if "ByteLevel" in decoder or "ByteLevel" in pre:
        inv = {c: b for b, c in byte_level_alphabet().items()}
        for i, s in enumerate(strings):
            if s is not None:
                try:
                    out[i] = bytes(inv[c] for c in s)
                except KeyError:  # not a byte-level string: its text
                    out[i] = s.encode("utf-8")
        return out
    if "ByteFallback" in decoder or "Metaspace" in decoder or "<0x0A>" in vocab:
        for i, s in enumerate(strings):
            if s is None:
                continue
            if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                out[i] = bytes([int(s[3:5], 16)])
            else:
                out[i] = s.replace("▁", " ").encode("utf-8")
        return out
    raise _error(f"guided decoding needs a byte-level BPE or byte-fallback tokenizer, not decoder {decoder or None}")


def ll_tokenizer(llg, tb: list[bytes | None], eos_ids, vocab_size: int, encode, texts: dict[int, str]):
    """llguidance's tokenizer from the token bytes: added tokens, and ids past the
    tokenizer up to ``vocab_size``, are special (llguidance never lets grammar text match
    them; the end is allowed by eos id). ``encode`` tokenizes text (llguidance asks for
    the canonical tokens of a grammar's forced text, e.g. a schema's next key); where it
    finds an added token's text (``<|ref|>`` in a const) that text is spelled in
    single-byte tokens instead, as the mask never allows an added token."""
    eos_ids = sorted(eos_ids)
    tb = list(tb[:vocab_size]) + [None] * (vocab_size - len(tb))
    special = {i for i, b in enumerate(tb) if b is None}
    single = {b[0]: i for i, b in enumerate(tb) if b is not None and len(b) == 1}

    def spell(ids: list[int]) -> list[int]:
        if not special.intersection(ids):
            return ids
        out = []
        for i in ids:
            if i in special and i in texts and all(b in single for b in texts[i].encode()):
                out.extend(single[b] for b in texts[i].encode())
            else:
                out.append(i)
        return out

    class Wrapper:  # the duck type llguidance.TokenizerWrapper describes
        is_tokenizer_wrapper = True
        eos_token_id = eos_ids[0]
        bos_token_id = None
        tokens = [b if b is not None else f"<|special {i}|>".encode() for i, b in enumerate(tb)]
        special_token_ids = sorted(special)

        def __call__(self, s):
            return spell(encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s))

    return llg.LLTokenizer(Wrapper(), n_vocab=vocab_size, eos_token=eos_ids, slices=None)


# ---- applying a bitmask to a logits row ---------------------------------------------------
class BitmaskApplier:
    """Sets the logits of the ids whose bit is 0 in an int32 bitmask (bit k of word w is id
    32w + k, llguidance's and xgrammar's layout) to -inf, in place, on the logits' device.

    ``masked_fill_`` with a random bool mask costs ~1.4 ms for 129,280 floats on one CPU
    thread (a data-dependent branch per element); instead each bit becomes the float
    0.0 or -inf by integer ops ((~bits << (31 - k)) >> 31 is 0 or -1; & 0xFF800000 keeps
    -inf's bits) and one ``add_`` applies it: ~0.15 ms, the same ops on a GPU."""

    def __init__(self, vocab_size: int):
        self.vocab = vocab_size
        self.words = (vocab_size + 31) // 32
        self._scratch: dict[torch.device, tuple] = {}
        self._lock = threading.Lock()

    def _buffers(self, device: torch.device):
        b = self._scratch.get(device)
        if b is None:
            shifts = (31 - torch.arange(32, dtype=torch.int32)).to(device)
            b = (shifts, torch.empty(self.words, dtype=torch.int32, device=device),
                 torch.empty((self.words, 32), dtype=torch.int32, device=device))
            self._scratch[device] = b
        return b

    def __call__(self, bits: torch.Tensor, logits: torch.Tensor) -> None:
        with self._lock:
            shifts, inv, bias = self._buffers(logits.device)
            if bits.device == logits.device:
                torch.bitwise_not(bits, out=inv)
            else:  # logits on an accelerator: 16 KiB of bits go over, the rest happens there
                inv.copy_(bits).bitwise_not_()
            torch.bitwise_left_shift(inv.view(-1, 1), shifts, out=bias)
            bias.bitwise_right_shift_(31).bitwise_and_(-8388608)  # 0xFF800000: -inf
            n = logits.shape[-1]
            logits[: min(n, self.vocab)].add_(bias.view(-1)[: min(n, self.vocab)].view(torch.float32))
            if n > self.vocab:
                logits[self.vocab:] = float("-inf")


# ---- compiled guides and their matchers ---------------------------------------------------
class CompiledGuide:
    """A guide compiled for one tokenizer; ``matcher()`` gives a request its own state."""

    def __init__(self, compiler: GuideCompiler, guide: Guide, proto):
        self.compiler, self.guide, self._proto = compiler, guide, proto

    def matcher(self) -> GuideMatcher:
        return GuideMatcher(self.compiler, self._proto.deep_copy())


class GuideMatcher:
    """One request's position in its guide: ``fill_mask`` before each sampling,
    ``accept`` after, ``done`` when nothing but the end may follow."""

    def __init__(self, compiler: GuideCompiler, m):
        self._c, self._m = compiler, m
        self._bits = torch.zeros(compiler.words, dtype=torch.int32)  # this request's bitmask
        self._nbytes = compiler.words * 4

    def fill_mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token that cannot come next to -inf, in place (ids past
        the tokenizer and special tokens always; eos unless the output may end here)."""
        c = self._c
        if self._m.is_error():  # cannot happen when only allowed tokens are accepted: end it
            self._bits.copy_(c.eos_bits)
        else:
            self._m.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._nbytes)
            self._bits.bitwise_and_(c.static)
        c.applier(self._bits, logits)

    def accept(self, token_id: int) -> None:
        if not self._m.consume_token(int(token_id)) and int(token_id) not in self._c.eos_ids:
            log.warning("guided decoding: token %d refused (%s); the output ends here", token_id,
                        self._m.get_error()[:200])

    def done(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (the end is allowed)."""
        return self._m.is_accepting()


class GuideCompiler:
    """Compiles guides for one tokenizer and LM head (``vocab_size`` logits), keeping the
    last ``CACHE_SIZE`` distinct guides; ``compile`` is thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        try:
            import llguidance
        except ImportError as e:
            raise _error("guided decoding needs the llguidance package (pip install llguidance)") from e
        self.llg = llguidance
        self.vocab_size = vocab_size
        self.eos_ids = sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab_size})
        if not self.eos_ids:
            raise _error("guided decoding needs an eos token")
        tb = token_bytes(tokenizer)[:vocab_size]
        self.n_tokens = len(tb)
        texts = {i: t.content for i, t in tokenizer._tok.get_added_tokens_decoder().items()}
        self.tokenizer = ll_tokenizer(llguidance, tb, self.eos_ids, vocab_size, tokenizer.encode, texts)
        self.words = (vocab_size + 31) // 32
        ok = np.zeros(self.words * 32, dtype=bool)  # ids a guide may ever allow
        ok[: self.n_tokens] = [b is not None for b in tb]
        ok[self.eos_ids] = True
        self.static = _pack(ok)
        ends = np.zeros(self.words * 32, dtype=bool)
        ends[self.eos_ids] = True
        self.eos_bits = _pack(ends)  # the mask of a matcher in error: only the end
        self.applier = BitmaskApplier(vocab_size)
        self._cache: OrderedDict[Guide, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, guide: Guide) -> CompiledGuide:
        if not isinstance(guide, Guide):
            raise _error(f"a guide must be a dsvl2.engine.guided.Guide, got {type(guide).__name__}")
        with self._lock:
            hit = self._cache.get(guide)
            if hit is not None:
                self._cache.move_to_end(guide)
                return hit
        compiled = CompiledGuide(self, guide, self._matcher(guide, self._grammar(guide)))
        with self._lock:
            self._cache[guide] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    # what llguidance is given for each kind
    def _grammar(self, guide: Guide) -> str:
        M = self.llg.LLMatcher
        kind, spec = guide.kind, guide.spec
        if kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except (json.JSONDecodeError, TypeError) as e:
                raise _error(f"json_schema: the schema is not valid JSON ({e})") from None
            if not isinstance(schema, dict):
                raise _error(f"json_schema: the schema must be a JSON object, got {type(schema).__name__}")
            return M.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if kind == "regex":
            if not isinstance(spec, str) or not spec:
                raise _error("regex: the pattern must be a non-empty string")
            return M.grammar_from_regex(spec)
        if kind == "choice":
            try:
                choices = json.loads(spec)
            except (json.JSONDecodeError, TypeError):
                choices = None
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise _error(f"choice: the choices must be a non-empty list of non-empty strings, got {spec!r}")
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices)))
        if kind == "grammar":
            from llguidance.gbnf_to_lark import any_to_lark

            if not isinstance(spec, str) or not spec.strip():
                raise _error("grammar: the grammar text is empty")
            try:
                text = any_to_lark(spec)
            except Exception as e:  # noqa: BLE001 - the converter's own errors
                raise _error(f"grammar: not valid Lark or GBNF ({e})") from None
            return M.grammar_from_lark(text)
        raise _error(f"unknown guide kind {kind!r}")

    def _matcher(self, guide: Guide, grammar: str):
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise _error(f"{guide.kind}: {_explain(m.get_error())}")
        return m


def _pack(ok: np.ndarray) -> torch.Tensor:
    """A bool array (a multiple of 32 long) as an int32 bitmask, bit k of word w = id 32w + k."""
    return torch.from_numpy(np.packbits(ok, bitorder="little").view("<i4").astype(np.int32))


def _explain(err: str) -> str:
    """llguidance's error in one line: its first line and its "error: ..." lines (the
    parse error of a regex); 'Unimplemented keys' names the schema keywords."""
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid"
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
    out = " ".join([first, *(ln for ln in lines[1:] if ln.startswith("error:"))])
    if "Unimplemented keys" in out:
        out = f"not supported in guided decoding: {out}"
    return out
