"""Guided decoding: three grammar libraries compared at the real vocabulary size (JSON report).

    python benchmarks/bench_guided.py --engine              # all three libraries + dsvl2's own (~1 minute)
    python benchmarks/bench_guided.py --libs llguidance     # the one dsvl2 uses

llguidance is a dsvl2 dependency; the other two are not (a missing one is reported as
such): ``pip install outlines-core`` and, for xgrammar, which imports transformers at
import time, ``pip install xgrammar`` (or, without triton, which the CPU path does not
use: ``pip install --no-deps xgrammar apache-tvm-ffi && pip install transformers``).

The real tokenizer (~129k tokens of byte-level BPE) cannot be downloaded here, so a
SYNTHETIC byte-level vocabulary of the real size is built: the shipped demo tokenizer's
2,625 tokens, then realistic extras in byte-level form (``Ġ`` = a leading space):
words of the Python standard library's sources and docstrings with and without a
leading space and capitalised, their prefixes and suffixes (BPE sub-words), numbers
0..999 with and without a space, runs of punctuation, JSON pieces (``{"``, ``":``,
``","``, ``"},{"`` ...), runs of spaces / newlines / tabs, and CJK characters and pairs
(3-byte UTF-8, as a large share of the real vocabulary is), up to 129,270 tokens with
the demo's 11 special tokens; the LM head is 129,280 wide (ids past the tokenizer never
allowed). Every library gets the same token bytes (``guided.token_bytes``).

Measured per library (xgrammar, llguidance, outlines-core), all on this CPU:

* ``tokenizer_s``: the one-time tokenizer preparation (per engine);
* ``compile_ms``: schema -> a ready matcher, per schema (a compile cache is off / fresh);
* ``mask_us``: per decoding step, the library filling the int32 [V/32] bitmask (median,
  p90, max over the steps of every schema's trajectories; ``first_mask_us`` apart: a
  matcher's first mask, where lazily built automata show), and ``apply_us``: applying
  it to a float32 [129,280] logits row (``guided.BitmaskApplier``: the bits turned into
  0.0 / -inf by integer ops, one ``add_``); the top-level ``apply_us`` compares that with
  ``masked_fill_`` and xgrammar's own CPU apply;
* ``correct``: for each schema, (a) a valid document (compact JSON, tokenised greedily
  by longest match) is accepted token by token and may end; (b) invalid documents are
  refused (some token masked, or the end not allowed); (c) random walks (a token drawn
  from the allowed set, biased to structural tokens so they end) always give output that
  ``jsonschema`` validates;
* ``keywords``: for schema keywords beyond the basic set, whether the library enforces
  them (a document that satisfies the keyword accepted, one that violates only it
  refused), raises, or ignores them silently (unacceptable: guided output must never be
  silently unconstrained);
* ``engine`` (``--engine``): dsvl2's ``GuideCompiler`` on the same vocabulary
  (``step_overhead_ms``: what guiding adds to a decode step of 1 and 16 rows): its
  one-time setup, compile time per guide kind and ``fill_mask`` per step (mask + apply).

JSON whitespace: xgrammar and outlines-core get compact separators, llguidance dsvl2's
options (at most one space between JSON tokens).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import statistics
import sys
import sysconfig
import time

import torch

import dsvl2
from dsvl2.engine import guided
from dsvl2.processing import Tokenizer

V_LOGITS = 129_280
N_TOKENS = 129_270

# ---- the schemas measured (the supported feature set) ----------------------------------
SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "score": {"type": "number"}, "ok": {"type": "boolean"}},
              "required": ["name", "age", "score", "ok"], "additionalProperties": False},
             {"name": "Ann Lee", "age": 42, "score": -3.25, "ok": True},
             [{"name": "Ann", "age": 42, "score": 1}, {"name": "Ann", "age": 4.5, "score": 1, "ok": True},
              {"name": "Ann", "age": 42, "score": 1, "ok": True, "x": 1}, {"name": 1, "age": 2, "score": 1, "ok": True}]),
    "nested": ({"type": "object", "properties": {
                    "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                              "tags": {"type": "array", "items": {"type": "string"}}},
                             "required": ["id", "tags"], "additionalProperties": False},
                    "active": {"type": "boolean"}},
                "required": ["user", "active"], "additionalProperties": False},
               {"user": {"id": 7, "tags": ["a", "b c"]}, "active": False},
               [{"user": {"id": 1000, "tags": []}, "active": False}, {"user": {"tags": []}, "active": False},
                {"user": {"id": 1, "tags": [], "more": 1}, "active": True}]),
    "enum": ({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"], "additionalProperties": False},
             {"color": "green", "size": "L"},
             [{"color": "pink", "size": "L"}, {"color": "red", "size": "XL"}, {"color": "red"}]),
    "array": ({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"},
                                                          "minItems": 2, "maxItems": 4}},
               "required": ["items"], "additionalProperties": False},
              {"items": [1, 22, 333]},
              [{"items": [1]}, {"items": [1, 2, 3, 4, 5]}, {"items": [1, "2"]}]),
    "grounding": ({"type": "object", "properties": {
                       "objects": {"type": "array", "maxItems": 8, "items": {
                           "type": "object", "properties": {
                               "label": {"type": "string"},
                               "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                       "minItems": 4, "maxItems": 4}},
                           "required": ["label", "box"], "additionalProperties": False}}},
                   "required": ["objects"], "additionalProperties": False},
                  {"objects": [{"label": "cat", "box": [12, 40, 500, 999]}, {"label": "dog", "box": [0, 0, 1, 1]}]},
                  [{"objects": [{"label": "cat", "box": [12, 40, 500]}]},
                   {"objects": [{"label": "cat", "box": [12, 40, 500, 1000]}]}]),
    "wide": ({"type": "object", "properties": {f"field_{i}": ({"type": "string"} if i % 3 == 0 else
                                                             {"type": "integer"} if i % 3 == 1 else
                                                             {"type": "boolean"}) for i in range(24)},
              "required": [f"field_{i}" for i in range(24)], "additionalProperties": False},
             {f"field_{i}": ("v" if i % 3 == 0 else i if i % 3 == 1 else True) for i in range(24)},
             [{f"field_{i}": ("v" if i % 3 == 0 else i if i % 3 == 1 else True) for i in range(23)}]),
}
# Keywords beyond the basic set, each with a document that satisfies it and one that
# violates only it: "enforced" = the first accepted and the second refused.
_AB = {"a": {"type": "integer"}, "b": {"type": "integer"}}
KEYWORDS = {
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, "abc", "A1"),
    "format": ({"type": "string", "format": "date"}, "2024-01-31", "yesterday"),
    "minLength": ({"type": "string", "minLength": 3}, "abc", "ab"),
    "maxLength": ({"type": "string", "maxLength": 3}, "abc", "abcd"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 5}, 6, 5),
    "const": ({"const": "yes"}, "yes", "no"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "$ref": ({"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}}, [1], ["x"]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], [1, 2]),
    "minProperties": ({"type": "object", "properties": _AB, "minProperties": 2}, {"a": 1, "b": 2}, {"a": 1}),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, {"xa": 1},
                          {"xa": "s"}),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "not": ({"not": {"type": "string"}}, 1, "x"),
    "if/then": ({"type": "object", "properties": _AB, "if": {"properties": {"a": {"const": 1}}},
                 "then": {"required": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, [3], [1, 2]),
    "dependentRequired": ({"type": "object", "properties": _AB, "dependentRequired": {"a": ["b"]}},
                          {"a": 1, "b": 2}, {"a": 1}),
}


# ---- a synthetic byte-level BPE vocabulary of the real size -----------------------------
def _corpus_words(limit: int = 60_000) -> list[str]:
    """Words of the standard library's sources, most frequent first."""
    count = collections.Counter()
    lib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(root, f), encoding="utf-8", errors="ignore") as fh:
                    count.update(re.findall(r"[A-Za-z]+", fh.read()))
    return [w for w, _ in count.most_common(limit)]


def synthetic_tokenizer(n_tokens: int = N_TOKENS, seed: int = 0) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` of ``n_tokens`` tokens (no merges: only its token
    strings matter to a grammar library); the demo's special tokens keep their names."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    demo = dsvl2.load("demo").processor.tokenizer
    b2u = guided.byte_level_alphabet()
    enc = lambda s: "".join(b2u[b] for b in s.encode("utf-8"))  # noqa: E731
    specials = [demo.id_to_token(i) for i in sorted(demo.special_ids)]
    vocab: dict[str, int] = {}
    room = n_tokens - (len(specials) - 3)  # the last specials go at the end

    def add(tok: str) -> None:
        if tok and tok not in vocab and len(vocab) < room:
            vocab[tok] = len(vocab)

    for t in specials[:3]:  # bos, eos, pad first, as in the demo
        add(t)
    for i in range(len(demo)):
        if i not in demo.special_ids:
            add(demo.id_to_token(i))
    json_pieces = ['{"', '"}', '":', '",', '":"', '","', '"},', '},{', '"},{"', '[{', '}]', '"}]', '":[', '":{',
                   '"]', '"],', '":[{', '}}', ']}', '"]}', '":"",', '\\"', '\\n', '\\u', 'true', 'false', 'null',
                   '":true', '":false', '":null', '[]', '{}', '"":', '":[]', '": ', '", "', '{\n', '\n}', ',\n']
    for p in json_pieces:
        add(enc(p))
        add(enc(" " + p))
    for n in range(1000):
        add(enc(str(n)))
        add(enc(" " + str(n)))
    for k in range(1, 33):
        add(enc(" " * k))
        add(enc("\n" + " " * k))
        add(enc("\t" * min(k, 8)))
        add(enc("\n" * min(k, 8)))
    rng = random.Random(seed)
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    for a in punct:
        for b in punct:
            add(enc(a + b))
            add(enc(" " + a + b))
    words = _corpus_words()
    for w in words:
        for form in (w, w.lower(), w.capitalize()):
            add(enc(form))
            add(enc(" " + form))
    for w in words:  # sub-word pieces, as BPE makes them
        for k in range(2, min(len(w), 7)):
            add(enc(w[:k]))
            add(enc(w[-k:]))
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    for c in cjk[:6000]:
        add(enc(c))
    while len(vocab) < room:  # CJK pairs, then random mixed pieces
        add(enc(rng.choice(cjk[:3000]) + rng.choice(cjk[:3000])) if rng.random() < 0.5 else
            enc(rng.choice(["", " "]) + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_.0123456789")
                                                for _ in range(rng.randint(3, 9)))))
    for t in specials[3:]:
        vocab[t] = len(vocab)
    hf = HF(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = GreedyTokenizer(hf, bos_token=demo.bos_token, eos_token=demo.eos_token, pad_token=demo.pad_token)
    tok.greedy = Greedy(guided.token_bytes(tok))
    return tok


class GreedyTokenizer(Tokenizer):
    """``encode`` by longest match (the vocabulary has no merges): close to what BPE gives,
    which matters as llguidance tokenizes a grammar's forced text with it."""

    greedy = None

    def encode(self, text: str, image_tag_is_text: bool = False) -> list[int]:  # no special tokens here anyway
        return self.greedy(text.encode("utf-8"))


class Greedy:
    """Longest-match tokenisation over the token bytes (a valid, BPE-like tokenisation); special
    tokens (no bytes) are never used."""

    def __init__(self, tb: list[bytes | None]):
        self.ids = {}
        for i, b in enumerate(tb):
            if b and b not in self.ids:
                self.ids[b] = i
        self.longest = max(len(b) for b in self.ids)

    def __call__(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for k in range(min(self.longest, len(data) - i), 0, -1):
                t = self.ids.get(data[i:i + k])
                if t is not None:
                    out.append(t)
                    i += k
                    break
            else:
                raise ValueError(f"no token for {data[i:i + 1]!r}")
        return out


# ---- the libraries behind one small interface -------------------------------------------
class Lib:
    """compile(schema) -> matcher factory; matcher: fill(bitmask int32[W]), accept(tok) -> bool, done()."""

    name = ""

    def __init__(self, tb, eos, vocab, encode):
        self.tb, self.eos, self.vocab = tb, eos, vocab


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tb, eos, vocab, encode):
        super().__init__(tb, eos, vocab, encode)
        import xgrammar as xgr

        self.xgr = xgr
        # special / out-of-tokenizer ids as empty tokens: xgrammar never allows those
        info = xgr.TokenizerInfo([b or b"" for b in tb], xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=os.cpu_count() or 1)

    def compile(self, schema):
        c = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"),
                                                strict_mode=False)  # strict: extra keys refused
        xgr = self.xgr

        class M:
            def __init__(self):
                self.m = xgr.GrammarMatcher(c)

            def fill(self, bits):
                self.m.fill_next_token_bitmask(bits.view(1, -1))

            def accept(self, t):
                return self.m.accept_token(t)

            def done(self):
                return self.m.is_terminated()

        return M


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tb, eos, vocab, encode):
        super().__init__(tb, eos, vocab, encode)
        import llguidance as llg

        self.llg = llg
        self.tok = guided.ll_tokenizer(llg, tb, [eos], vocab, encode, {})

    def compile(self, schema):
        llg = self.llg
        g = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=guided.JSON_OPTIONS)
        ok, msgs = llg.LLMatcher.validate_grammar_with_warnings(g, self.tok)
        if ok:
            raise ValueError(msgs[0])
        tok = self.tok

        class M:
            def __init__(self):
                self.m = llg.LLMatcher(tok, g, log_level=0)

            def fill(self, bits):
                self.m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)

            def accept(self, t):
                return self.m.consume_token(t)

            def done(self):
                return self.m.is_stopped()

        M()  # the grammar's own errors surface here
        return M


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, tb, eos, vocab, encode):
        super().__init__(tb, eos, vocab, encode)
        import outlines_core as oc

        self.oc = oc
        m = collections.defaultdict(list)
        for i, b in enumerate(tb):
            if b and i != eos:
                m[b].append(i)
        self.voc = oc.Vocabulary(eos, dict(m))

    def compile(self, schema):
        oc = self.oc
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        index = oc.Index(regex, self.voc)

        class M:
            def __init__(self):
                self.m = oc.Guide(index)

            def fill(self, bits):
                self.m.write_mask_into(bits.data_ptr(), bits.numel(), 4)

            def accept(self, t):
                try:
                    self.m.advance(t)
                    return True
                except Exception:
                    return False

            def done(self):
                return self.m.is_finished()

        return M


LIBS = {c.name: c for c in (XGrammar, LLGuidance, OutlinesCore)}


# ---- measuring ------------------------------------------------------------------------
class Timer:
    def __init__(self, vocab):
        self.mask, self.apply, self.first = [], [], []
        self.vocab = vocab
        self.bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        self.unpack = guided.BitmaskApplier(vocab)
        self.logits = torch.randn(vocab)

    def allowed(self, m, first: bool = False) -> torch.Tensor:
        """Fill, time, apply to a logits row (timed), return the bool mask of allowed ids;
        ``first``: a matcher's first mask (lazy automaton building shows there)."""
        self.bits.zero_()
        t0 = time.perf_counter()
        m.fill(self.bits)
        t1 = time.perf_counter()
        row = self.logits.clone()
        t2 = time.perf_counter()
        self.unpack(self.bits, row)
        t3 = time.perf_counter()
        (self.first if first else self.mask).append(t1 - t0)
        self.apply.append(t3 - t2)
        return row != float("-inf")


def walk(lib, factory, timer, rng, max_steps=1000, bias=0.7) -> tuple[bytes, bool]:
    """One random walk: tokens drawn from the allowed set (with probability ``bias`` among
    the allowed ones holding a structural character, so the document ends). Returns the
    bytes and whether it ended within max_steps."""
    m, out = factory(), b""
    structural = lib._structural
    for step in range(max_steps):
        ok = timer.allowed(m, first=step == 0)
        ids = ok.nonzero().flatten()
        if ids.numel() == 0:
            return out, False
        if ok[lib.eos]:
            return out, True
        s = ids[structural[ids]]
        pool = s if (s.numel() and rng.random() < bias) else ids
        t = int(pool[rng.randrange(pool.numel())])
        assert m.accept(t), f"{lib.name}: the allowed token {t} was refused"
        out += lib.tb[t]
        if m.done():
            return out, True
    return out, False


def run_doc(lib, factory, timer, ids) -> bool:
    """True if the token ids are allowed one by one and the end is allowed after them."""
    m = factory()
    for k, t in enumerate(ids):
        if not timer.allowed(m, first=k == 0)[t] or not m.accept(t):
            return False
    return m.done() or bool(timer.allowed(m)[lib.eos])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_lib(name, tok, tb, greedy, walks, rng_seed) -> dict:
    import jsonschema

    eos = tok.eos_id
    t0 = time.perf_counter()
    lib = LIBS[name](tb, eos, V_LOGITS, tok.encode)
    tok_s = time.perf_counter() - t0
    lib._structural = torch.zeros(V_LOGITS, dtype=torch.bool)
    for i, b in enumerate(tb):
        if b and any(c in b for c in b'",}]:'):
            lib._structural[i] = True
    timer = Timer(V_LOGITS)
    res = {"tokenizer_s": round(tok_s, 3), "compile_ms": {}, "correct": {}, "keywords": {}}
    rng = random.Random(rng_seed)
    for sname, (schema, good, bads) in SCHEMAS.items():
        print(f"  {name}: {sname}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            factory = lib.compile(schema)
            factory()
        except Exception as e:  # noqa: BLE001
            res["compile_ms"][sname] = None
            res["correct"][sname] = f"compile failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        res["compile_ms"][sname] = round((time.perf_counter() - t0) * 1e3, 2)
        doc_ok = run_doc(lib, factory, timer, greedy(json.dumps(good, separators=(",", ":")).encode()))
        refused = sum(not run_doc(lib, factory, timer, greedy(json.dumps(b, separators=(",", ":")).encode()))
                      for b in bads)
        valid = ended = 0
        for _ in range(walks):
            out, end = walk(lib, factory, timer, rng)
            ended += end
            if end:
                try:
                    jsonschema.validate(json.loads(out), schema)
                    valid += 1
                except Exception as e:  # noqa: BLE001
                    print(f"  {name}: {sname}: INVALID {out[:200]!r}: {str(e)[:200]}", file=sys.stderr)
        res["correct"][sname] = {"valid_doc_accepted": doc_ok, "invalid_docs_refused": f"{refused}/{len(bads)}",
                                 "walks_ended": f"{ended}/{walks}", "walks_valid": f"{valid}/{ended}"}
    for kw, (schema, good, bad) in KEYWORDS.items():
        try:
            factory = lib.compile(schema)
            factory()
        except Exception:  # noqa: BLE001
            res["keywords"][kw] = "error (refused at compile)"
            continue
        ok = [run_doc(lib, factory, timer, greedy(json.dumps(d, separators=(",", ":")).encode())) for d in (good, bad)]
        res["keywords"][kw] = ("enforced" if ok == [True, False] else "IGNORED (violating doc accepted)" if ok[1]
                               else "WRONG (valid doc refused)")
    res["mask_us"] = {"median": round(statistics.median(timer.mask) * 1e6, 1),
                      "p90": round(pct(timer.mask, 0.9) * 1e6, 1), "max": round(max(timer.mask) * 1e6, 1),
                      "steps": len(timer.mask)}
    res["first_mask_us"] = {"median": round(statistics.median(timer.first) * 1e6, 1),
                            "max": round(max(timer.first) * 1e6, 1), "matchers": len(timer.first)}
    res["apply_us"] = {"median": round(statistics.median(timer.apply) * 1e6, 1),
                       "p90": round(pct(timer.apply, 0.9) * 1e6, 1)}
    return res


def bench_apply(repeat: int = 200) -> dict:
    """Ways to apply a bitmask (half the ids allowed, at random) to a float32 [V] row."""
    words = (V_LOGITS + 31) // 32
    bits = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32)
    blocked = torch.from_numpy(__import__("numpy").unpackbits(
        (~bits).numpy().view("uint8"), bitorder="little")[:V_LOGITS].astype(bool))
    row = torch.randn(V_LOGITS)
    applier = guided.BitmaskApplier(V_LOGITS)
    ways = {"guided.BitmaskApplier (int ops + add_)": lambda: applier(bits, row),
            "masked_fill_(bool mask) alone": lambda: row.masked_fill_(blocked, float("-inf"))}
    try:
        import xgrammar as xgr

        ways["xgrammar.apply_token_bitmask_inplace (cpu)"] = lambda: xgr.apply_token_bitmask_inplace(
            row.view(1, -1), bits.view(1, -1), backend="cpu")
    except ImportError:
        pass
    out = {}
    for name, f in ways.items():
        f()
        t0 = time.perf_counter()
        for _ in range(repeat):
            f()
        out[name] = round((time.perf_counter() - t0) / repeat * 1e6, 1)
    return out


def bench_engine(tok) -> dict:
    """dsvl2's own GuideCompiler on the synthetic tokenizer: build, compile, fill_mask."""
    t0 = time.perf_counter()
    gc = guided.GuideCompiler(tok, V_LOGITS, {tok.eos_id})
    out = {"compiler_init_s": round(time.perf_counter() - t0, 3), "compile_ms": {}, "fill_mask_us": {}}
    for kind, g in [("json_object", guided.Guide.json_object()),
                    ("json_schema:grounding", guided.Guide.json_schema(SCHEMAS["grounding"][0])),
                    ("regex", guided.Guide.regex(r"[A-Z][a-z]{2,8} [0-9]{1,3}")),
                    ("choice", guided.Guide.choice(["yes", "no", "maybe"])),
                    ("grammar", guided.Guide.grammar('start: "(" expr ")"\nexpr: /[0-9]+/ | expr "+" expr'))]:
        t0 = time.perf_counter()
        c = gc.compile(g)
        out["compile_ms"][kind] = round((time.perf_counter() - t0) * 1e3, 2)
        m = c.matcher()
        logits = torch.randn(V_LOGITS)
        ts = []
        for _ in range(20):
            row = logits.clone()
            t0 = time.perf_counter()
            m.fill_mask(row)
            ts.append(time.perf_counter() - t0)
        out["fill_mask_us"][kind] = round(statistics.median(ts) * 1e6, 1)
    out["step_overhead_ms"] = step_overhead(gc)
    return out


def step_overhead(gc, steps: int = 24) -> dict:
    """What guiding adds to one decode step of B rows, each with its own matcher (a JSON
    schema): every row's ``fill_mask`` on its [V] logits, then ``accept`` of the token a
    greedy pick among the allowed ones gives (the sampling itself not counted: it is
    paid unguided too). Median over ``steps`` steps, B = 1 and 16."""
    out = {}
    c = gc.compile(guided.Guide.json_schema(SCHEMAS["grounding"][0]))
    for b in (1, 16):
        ms = [c.matcher() for _ in range(b)]
        g = torch.Generator().manual_seed(b)
        ts = []
        for _ in range(steps):
            logits = torch.randn(b, V_LOGITS, generator=g)
            t0 = time.perf_counter()
            for i, m in enumerate(ms):
                m.fill_mask(logits[i])
            t1 = time.perf_counter()
            toks = logits.argmax(-1).tolist()  # the sampler's work: not counted
            t2 = time.perf_counter()
            for m, t in zip(ms, toks):
                m.accept(t)
            ts.append(t1 - t0 + time.perf_counter() - t2)
            if any(m.done() for m in ms):
                break
        out[str(b)] = round(statistics.median(ts) * 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", default="xgrammar,llguidance,outlines-core")
    ap.add_argument("--walks", type=int, default=4, help="random walks per schema")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the mask apply)")
    ap.add_argument("--engine", action="store_true", help="also time dsvl2's GuideCompiler")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = synthetic_tokenizer()
    tb = guided.token_bytes(tok)
    report = {"cpu": _cpu(), "torch_threads": args.threads, "vocab_logits": V_LOGITS, "tokenizer_tokens": len(tok),
              "synthetic_vocab_s": round(time.perf_counter() - t0, 1),
              "versions": {}, "libs": {}}
    greedy = tok.greedy
    for name in args.libs.split(","):
        try:
            report["versions"][name] = _version(name)
            print(f"{name} ...", file=sys.stderr)
            report["libs"][name] = bench_lib(name, tok, tb, greedy, args.walks, 0)
            print(json.dumps({name: report["libs"][name]}), file=sys.stderr)
        except ImportError as e:
            report["libs"][name] = f"not installed ({e})"
    report["apply_us"] = bench_apply()
    if args.engine:
        report["engine"] = bench_engine(tok)
    print(json.dumps(report, indent=1))


def _version(name):
    from importlib.metadata import version

    return version(name)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
