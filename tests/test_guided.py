"""Guided decoding (dsvl2/engine/guided.py, llguidance): JSON schemas, any JSON object,
regular expressions, choices and grammars, on the random demo model through the engine.

A random model is the hardest user of a guide: whatever it samples, the output must
parse and validate. It also never closes a free string on its own (the closing quote is
one token of thousands) nor a number's fraction, so the schemas here bound their strings
(maxLength) and numbers (maximum, multipleOf).
"""

from __future__ import annotations

import functools
import json
import re

import jsonschema
import pytest
import torch

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.engine.guided import CACHE_SIZE, Guide, GuideCompiler, token_bytes
from dsvl2.errors import GenerationError

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "name": {"type": "string", "maxLength": 8},
                                              "score": {"type": "number", "minimum": -10, "maximum": 10,
                                                        "multipleOf": 0.25}},
             "required": ["id", "name", "score"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["user", "active"], "additionalProperties": False}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False}
ARRAY = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                               "maximum": 99},
                                                    "minItems": 2, "maxItems": 4}},
         "required": ["items"], "additionalProperties": False}
GROUNDING = {"type": "object", "properties": {"objects": {"type": "array", "maxItems": 3, "items": {
    "type": "object", "properties": {"label": {"type": "string", "maxLength": 10},
                                     "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                             "minItems": 4, "maxItems": 4}},
    "required": ["label", "box"], "additionalProperties": False}}},
    "required": ["objects"], "additionalProperties": False}
# greedy, and sampled with fixed seeds (json_object lets a sampled random model open a key
# string it never closes: these seeds do not, see test_json_object_is_a_json_object)
SAMPLING = [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]
WS_OUTSIDE_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


@functools.cache
def demo():
    return dsvl2.load("demo", dtype="float32")


@functools.cache
def engine() -> Engine:
    m = demo()
    return Engine(m.model, m.processor.tokenizer, kv_cache_bytes=1 << 24, prefix_caching=False)


def prompt(text: str = "Answer in JSON."):
    return demo().processor([[{"role": "<|User|>", "content": text, "images": []},
                              {"role": "<|Assistant|>", "content": ""}]])


def generate(guide: Guide, max_new_tokens: int = 160, text: str = "Answer in JSON.", **kw):
    return engine().generate(prompt(text), SamplingParams(max_new_tokens=max_new_tokens, guide=guide, **kw))[0]


@functools.cache
def compiler() -> GuideCompiler:
    eng = engine()
    return GuideCompiler(eng.tokenizer, eng.cfg.vocab_size, eng.eos_ids)


# ---- answers that parse and validate -------------------------------------------------------
@pytest.mark.parametrize("kw", SAMPLING)
def test_json_object_is_a_json_object(kw):
    out = generate(Guide.json_object(), **kw)
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


@pytest.mark.parametrize("kw", SAMPLING)
@pytest.mark.parametrize("schema", [NESTED, ENUM, ARRAY, GROUNDING], ids=["nested", "enum", "array", "grounding"])
def test_json_schema_answers_validate(schema, kw):
    out = generate(Guide.json_schema(schema), **kw)
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)


def test_properties_come_in_the_schemas_order():
    """The schema's dict order is kept (a model reasons in that order: "reasoning" before "answer")."""
    out = generate(Guide.json_schema(NESTED))
    assert list(json.loads(out.text)) == ["user", "active"]
    out = generate(Guide.json_schema({"type": "object", "properties": {"b": {"type": "boolean"},
                                                                       "a": {"type": "boolean"}},
                                      "required": ["b", "a"], "additionalProperties": False}))
    assert list(json.loads(out.text)) == ["b", "a"]


@pytest.mark.parametrize("kw", SAMPLING)
def test_choice_is_one_of_the_choices(kw):
    choices = ["yes", "no", "maybe later", "n/a"]
    out = generate(Guide.choice(choices), **kw)
    assert out.text in choices and out.finish_reason == "stop"


@pytest.mark.parametrize("kw", SAMPLING)
@pytest.mark.parametrize("pattern", [r"[A-Z][a-z]{2,8} [0-9]{1,3}", r"(cat|dog)s?-\d{2}",
                                     r"[a-z]{1,12}@example\.(com|org)", r"-?(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})?"])
def test_regex_matches_whole(pattern, kw):
    out = generate(Guide.regex(pattern), max_new_tokens=60, **kw)
    assert out.finish_reason == "stop", out.text
    assert re.fullmatch(pattern, out.text), out.text


@pytest.mark.parametrize("kw", SAMPLING)
def test_lark_and_gbnf_grammars(kw):
    lark = 'start: "(" NUM ("+" NUM){0,3} ")"\nNUM: /[0-9]{1,3}/'
    out = generate(Guide.grammar(lark), max_new_tokens=40, **kw)
    assert out.finish_reason == "stop" and re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)", out.text), out.text
    gbnf = 'root ::= answer " " ("!" | "?")\nanswer ::= "yes" | "no"'
    out = generate(Guide.grammar(gbnf), max_new_tokens=40, **kw)
    assert out.finish_reason == "stop" and out.text in ("yes !", "yes ?", "no !", "no ?"), out.text


def test_guided_and_plain_requests_share_a_batch():
    """A guided request beside an unguided one: each answers as it does alone."""
    eng, p = engine(), prompt()
    guided = SamplingParams(max_new_tokens=40, guide=Guide.json_schema(ENUM))
    plain = SamplingParams(max_new_tokens=12)
    conv = [{"role": "<|User|>", "content": "Answer in JSON.", "images": []}, {"role": "<|Assistant|>", "content": ""}]
    both = eng.generate(demo().processor([conv, conv]), [guided, plain])
    assert both[0].ids == eng.generate(p, guided)[0].ids
    assert both[1].ids == eng.generate(p, plain)[0].ids
    jsonschema.validate(json.loads(both[0].text), ENUM)


# ---- bounds ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_whitespace_is_bounded(seed):
    """No runs of whitespace and no newlines between JSON tokens, whatever a random model
    samples (strings' contents aside): at most one space between two tokens."""
    for guide in (Guide.json_schema(NESTED), Guide.json_schema(GROUNDING), Guide.json_object()):
        out = generate(guide, temperature=1.5, seed=seed)
        outside = WS_OUTSIDE_STRINGS.sub('""', out.text)
        assert not re.search(r"\s\s|[\n\r\t]", outside), out.text
        assert not out.text[:1].isspace()


def test_max_tokens_cut_is_length():
    out = generate(Guide.json_schema(GROUNDING), max_new_tokens=5)
    assert out.finish_reason == "length" and len(out.ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


@pytest.mark.parametrize("guide", [Guide.json_object(), Guide.json_schema(NESTED), Guide.regex(r"[\s\S]*"),
                                   Guide.regex(r".{0,40}"), Guide.choice(["a", "<|ref|>"]),
                                   Guide.grammar('start: /[^"]+/')], ids=lambda g: g.kind)
def test_mask_never_allows_ids_past_the_tokenizer_nor_special_tokens(guide):
    """Random walks through the mask: every allowed id is < len(tokenizer), never a special
    token (eos only where the output may end), and the logits of allowed ids are untouched."""
    eng = engine()
    tok, c = eng.tokenizer, compiler()
    V, n = eng.cfg.vocab_size, len(tok)
    assert V > n  # the demo's LM head is wider than its tokenizer, as the real one's
    special = sorted(tok.special_ids - eng.eos_ids)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        m = c.compile(guide).matcher()
        for _ in range(40):
            logits = torch.randn(V, generator=gen)
            before = logits.clone()
            m.fill_mask(logits)
            allowed = (logits != float("-inf")).nonzero().flatten()
            assert allowed.numel() > 0
            assert int(allowed.max()) < n
            assert not torch.isin(allowed, torch.tensor(special)).any()
            assert torch.equal(logits[allowed], before[allowed])
            tok_id = int(allowed[torch.randint(allowed.numel(), (1,), generator=gen)])
            if tok_id in eng.eos_ids:
                assert m.is_accepting()
                break
            m.accept(tok_id)
            if m.done():
                break


def test_special_token_text_is_spelled_in_bytes():
    """A choice holding a special token's text (<|ref|>) gets that text, never the special id."""
    tok = engine().tokenizer
    for kw in SAMPLING:
        out = generate(Guide.choice(["<|ref|>cat<|/ref|>"]), **kw)
        assert out.text == "<|ref|>cat<|/ref|>" and out.finish_reason == "stop"
        assert not set(out.ids) & tok.special_ids


def test_eos_only_when_the_output_may_end():
    c, eos = compiler(), engine().tokenizer.eos_id
    m = c.compile(Guide.choice(["ab"])).matcher()
    tok = engine().tokenizer
    for t in tok.encode("ab"):
        logits = torch.zeros(engine().cfg.vocab_size)
        m.fill_mask(logits)
        assert logits[eos] == float("-inf") and logits[t] == 0
        m.accept(t)
    assert m.done()


def test_mask_on_a_wider_row_and_on_bfloat16():
    c = compiler()
    m = c.compile(Guide.choice(["yes"])).matcher()
    wide = torch.zeros(c.vocab_size + 7)
    m.fill_mask(wide)
    assert (wide != float("-inf")).sum() >= 1 and (wide[c.vocab_size:] == float("-inf")).all()
    half = torch.zeros(c.vocab_size, dtype=torch.bfloat16)
    m.fill_mask(half)
    assert torch.equal(half != float("-inf"), wide[: c.vocab_size] != float("-inf"))


# ---- what is refused ------------------------------------------------------------------------
@pytest.mark.parametrize("keyword,schema", [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
    ("contains", {"type": "array", "contains": {"const": 3}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^a"}}),
    ("uniqueItems", {"type": "object", "x-guidance": {"lenient": True},  # a schema cannot turn leniency on
                     "properties": {"a": {"type": "array", "uniqueItems": True}}}),
])
def test_unsupported_schema_keyword_is_an_error_naming_it(keyword, schema):
    with pytest.raises(GenerationError, match=keyword):
        engine().make_requests(prompt(), SamplingParams(max_new_tokens=8, guide=Guide.json_schema(schema)))


@pytest.mark.parametrize("guide,words", [
    (Guide("json_schema", '{"type": "object"'), "not valid JSON"),
    (Guide("json_schema", "[1, 2]"), "must be a JSON object"),
    (Guide.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (Guide.regex("(a"), "unclosed group"),
    (Guide.regex("(?=a)b"), "look-around"),
    (Guide.choice([]), "non-empty list"),
    (Guide("choice", '"yes"'), "non-empty list"),
    (Guide.grammar("start: undefined_rule"), "undefined_rule"),
    (Guide.grammar(""), "empty"),
])
def test_bad_guides_are_errors(guide, words):
    with pytest.raises(GenerationError, match=re.escape(words)):
        engine().compile_guide(guide)


# ---- the compiler --------------------------------------------------------------------------
def test_compiled_guides_are_cached_lru():
    c = GuideCompiler(engine().tokenizer, engine().cfg.vocab_size, engine().eos_ids)
    first = c.compile(Guide.regex("a0"))
    assert c.compile(Guide.regex("a0")) is first
    for i in range(1, CACHE_SIZE):
        c.compile(Guide.regex(f"a{i}"))
    assert c.compile(Guide.regex("a0")) is first  # touched: now the newest
    c.compile(Guide.regex("b"))  # evicts a1, the oldest
    assert len(c._cache) == CACHE_SIZE and Guide.regex("a1") not in c._cache and Guide.regex("a0") in c._cache


def test_token_bytes_spell_the_text():
    tok = engine().tokenizer
    tb = token_bytes(tok)
    assert all(tb[i] is None for i in tok.special_ids)
    for text in ['{"name": "Zoë", "n": [1, 22]}', "  indented\n\tline", "数据 ü €"]:
        assert b"".join(tb[i] for i in tok.encode(text)) == text.encode()


def test_preempted_guided_requests_answer_as_alone():
    """A KV cache too small for three guided requests at once: the newest are preempted and
    recomputed, their matchers kept; every answer equals the same request alone."""
    from dsvl2.model.cache import KVCache

    m = demo()
    per_block = 16 * KVCache.bytes_per_token(m.model.cfg.language, torch.float32)
    eng = Engine(m.model, m.processor.tokenizer, kv_cache_bytes=7 * per_block, prefix_caching=False)
    params = [SamplingParams(max_new_tokens=60, guide=Guide.json_schema(s), temperature=1.0, seed=3)
              for s in (NESTED, GROUNDING, ARRAY)]
    reqs = [eng.submit(prompt(), p)[0] for p in params]
    while not all(r.finished for r in reqs):
        eng.step()
    assert eng.scheduler.preemptions > 0
    for p, r in zip(params, reqs):
        assert r.output_ids == engine().generate(prompt(), p)[0].ids
