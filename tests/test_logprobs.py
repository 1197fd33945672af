"""Logprobs and structured-output options on every surface: the Python API, the server
(the official ``openai`` client against a live server) and the shared pieces in
``dsvl2/structured.py``.

Conventions of this file:
* The model is the shipped demo checkpoint (random weights, default dtype). Its answers
  are gibberish but exercise what matters here: ids beyond the tokenizer (no text),
  byte-level pieces that are not valid UTF-8 alone, eos.
* Scripted answers: the ``script`` fixture (tests/conftest.py) gives the engine a sampler
  that emits chosen ids (then eos); the logprobs still come from the model's logits.
* Guides: the guide compiler (``engine/guided.py``) is another piece of work; here the
  engine's guide compiler (``Engine.set_guide_compiler``) is a recorder that refuses every guide, which proves what
  reaches the engine and how a compile error comes back. End-to-end JSON mode lives with
  the compiler's tests.
* Live servers are marked ``slow``; ONE torch thread (``one_thread``).
"""

from __future__ import annotations

import json
import math
import random

import httpx
import openai
import pytest
import tokenizers

import dsvl2
from dsvl2.engine.guided import Guide
from dsvl2.errors import GenerationError
from dsvl2.server import create_app
from dsvl2.server.errors import APIError
from dsvl2.server.schema import parse_chat_request
from dsvl2.structured import MIN_LOGPROB, LogprobStream, token_texts
from test_server import KEY, LiveServer, post

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.slow
TOP = 5
HI = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def model():
    return dsvl2.load("demo", prefix_caching=False)


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(create_app(model, served_model_name="demo", api_key=KEY))
    yield s
    s.close()


class RefusingCompiler:
    """A guide compiler that records every guide and refuses it with a GenerationError."""

    def __init__(self):
        self.seen = []

    def compile(self, guide):
        self.seen.append(guide)
        raise GenerationError(f"test compiler: {guide.kind} refused")


@pytest.fixture
def guides(model):
    """The guides that reach the model's engine (its guide compiler); each is refused."""
    refusing = RefusingCompiler()
    before = model.engine.set_guide_compiler(refusing)
    yield refusing.seen
    model.engine.set_guide_compiler(before)


def check_entries(entries, text: str, top: int, greedy: bool = True, cut: bool = False):
    """What every answer's logprobs must satisfy (entries as dicts of OpenAI's shape)."""
    for e in entries:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and math.isfinite(e["logprob"])
        raw = bytes(e["bytes"])
        assert e["token"] == raw.decode("utf-8", "replace")  # valid UTF-8: the bytes are the text
        alts = e["top_logprobs"]
        assert len(alts) == top
        assert all(set(a) == {"token", "logprob", "bytes"} and a["logprob"] <= 0 for a in alts)
        assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        for a in alts:
            assert a["token"] == bytes(a["bytes"]).decode("utf-8", "replace")
        if greedy and top:
            assert e["logprob"] == alts[0]["logprob"]  # the argmax of the same distribution
    joined = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    if not cut:
        assert joined == text
    if all(_valid(bytes(e["bytes"])) for e in entries) and not cut:
        assert "".join(e["token"] for e in entries) == text


def _valid(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def as_dicts(entries) -> list[dict]:
    return [e.to_dict() if hasattr(e, "to_dict") else e.model_dump() for e in entries]


# --------------------------------------------------------------------------- token texts


def test_token_bytes_are_exact_for_the_whole_vocabulary(model):
    tok = model.processor.tokenizer
    texts = token_texts(tok)
    assert texts.kind == "byte_level" and token_texts(tok) is texts
    # the added (special) tokens, read from the checkpoint's tokenizer file directly
    added = tokenizers.Tokenizer.from_file(str(model.folder / "tokenizer.json")).get_added_tokens_decoder()
    for i in range(len(tok)):
        text, raw = texts(i)
        assert text == tok.decode([i])  # the token's own text is the tokenizer's decode of it
        if i in added:
            assert raw == added[i].content.encode()
        else:
            assert text == raw.decode("utf-8", "replace"), i
    assert texts(len(tok)) == ("", b"") and texts(model.engine.cfg.vocab_size - 1) == ("", b"")
    # joined bytes decode to the tokenizer's decode of the whole sequence, pieces split mid-character
    rng = random.Random(0)
    plain = [i for i in range(len(tok)) if i not in added]
    for _ in range(200):
        ids = [rng.choice(plain) for _ in range(rng.randint(1, 12))]
        assert b"".join(texts(i)[1] for i in ids).decode("utf-8", "replace") == tok.decode(ids), ids
    for s in ("a中b", "é ö", " hello\n\nworld  ", "日本語のテキスト"):
        ids = tok.encode(s)
        assert b"".join(texts(i)[1] for i in ids) == s.encode()


# --------------------------------------------------------------------------- Python API


def test_api_logprobs_non_streaming_and_streamed(model):
    a = model.chat(HI, max_tokens=40, logprobs=TOP)
    assert len(a.logprobs) == a.completion_tokens - (a.finish_reason == "stop")
    assert [e.token_id for e in a.logprobs] == a.token_ids[:len(a.logprobs)]
    check_entries(as_dicts(a.logprobs), a.text, TOP)
    assert a.to_dict()["logprobs"] == as_dicts(a.logprobs)
    deltas = list(model.stream(HI, max_tokens=40, logprobs=TOP))
    streamed = [e for d in deltas for e in d.logprobs]
    assert as_dicts(streamed) == as_dicts(a.logprobs)
    # each piece carries the tokens whose text ends in it: bytes and text agree piece by piece
    text, raw = "", b""
    for d in deltas:
        text += d.text
        raw += b"".join(bytes(e.bytes) for e in d.logprobs)
        assert raw.decode("utf-8", "replace") == text
    # True = the chosen tokens without alternatives; off: None, and the engine computed none
    b = model.chat(HI, max_tokens=40, logprobs=True)
    assert [e.logprob for e in b.logprobs] == [e.logprob for e in a.logprobs]
    assert all(e.top_logprobs == [] for e in b.logprobs)
    off = model.chat(HI, max_tokens=40)
    assert off.logprobs is None and off.text == a.text and "logprobs" not in off.to_dict()
    assert all(d.logprobs is None for d in model.stream(HI, max_tokens=5))
    (h,) = model.submit(HI, max_tokens=5)
    assert h.result().logprobs is None  # zero cost: no TokenLogprob was computed
    (h,) = model.submit(HI, max_tokens=5, logprobs=2)
    out = h.result()  # the Answer chat gives; the engine's raw entries stay on h.output
    assert len(out.logprobs) == out.completion_tokens - (out.finish_reason == "stop")
    assert all(len(e.top_logprobs) == 2 for e in out.logprobs)
    raw = h.output.logprobs
    assert len(raw) == out.completion_tokens and all(len(t.top) == 2 for t in raw)


def test_split_characters_held_whitespace_and_eos(model, script):
    """A character split over three tokens, held trailing whitespace, an id beyond the
    tokenizer and the ending eos: entries go out with the piece that carries their text."""
    tok = model.processor.tokenizer
    beyond = model.engine.cfg.vocab_size - 1  # no text
    ids = tok.encode("a中b") + tok.encode(" \n") + [beyond] + tok.encode("x é")
    script(ids, tok.eos_id)
    deltas = list(model.stream(HI, max_tokens=50, logprobs=3))
    answer = deltas[-1].answer
    assert answer.text == "a中b \nx é" and answer.finish_reason == "stop"
    assert answer.completion_tokens == len(ids) + 1 and len(answer.logprobs) == len(ids)  # eos: no entry
    assert [e.token_id for e in answer.logprobs] == ids
    assert [e.token for e in answer.logprobs[1:4]] == ["\ufffd"] * 3
    assert bytes(answer.logprobs[1].bytes) + bytes(answer.logprobs[2].bytes) + bytes(answer.logprobs[3].bytes) \
        == "中".encode()
    assert answer.logprobs[ids.index(beyond)].token == "" and answer.logprobs[ids.index(beyond)].bytes == []
    check_entries(as_dicts(answer.logprobs), answer.text, 3, greedy=False)
    text, raw = "", b""
    for d in deltas:
        text += d.text
        raw += b"".join(bytes(e.bytes) for e in d.logprobs)
        assert raw.decode("utf-8", "replace") == text, (text, raw)
    carrying = [d for d in deltas if "中" in d.text]
    assert len(carrying) == 1 and [e.token for e in carrying[0].logprobs][-3:] == ["\ufffd"] * 3


def test_stop_string_tokens_keep_their_entries(model, script):
    tok = model.processor.tokenizer
    ids = tok.encode("one two END three")
    script(ids, tok.eos_id)
    a = model.chat(HI, max_tokens=50, logprobs=1, stop=["END"])
    assert a.text == "one two " and a.finish_reason == "stop"
    kept = len(a.logprobs)
    assert [e.token_id for e in a.logprobs] == ids[:kept] and "".join(e.token for e in a.logprobs).startswith(a.text)
    script(ids, tok.eos_id)
    streamed = [e for d in model.stream(HI, max_tokens=50, logprobs=1, stop=["END"]) for e in d.logprobs]
    assert as_dicts(streamed) == as_dicts(a.logprobs)


def test_logprob_stream_alone():
    """LogprobStream over a hand-made token list (no model): alignment and the final flush."""

    class T:  # TokenLogprob stand-in
        def __init__(self, i):
            self.token_id, self.logprob, self.top = i, -1.0, []

    class Out:
        finish_reason = "stop"

    from dsvl2.processing import Tokenizer
    from dsvl2.checkpoint.hub import DEMO

    tok = Tokenizer.from_dir(DEMO)
    ids = tok.encode("a") + tok.encode("中") + tok.encode(" ") + [tok.eos_id]
    assert len(ids) == 6
    live = [T(i) for i in ids[:2]]  # the engine has sampled two tokens so far
    s = LogprobStream(lambda: live, tok, {tok.eos_id})
    assert [e.token for e in s.take("a")] == ["a"]
    live[2:] = [T(i) for i in ids[2:]]  # all the rest, sampled before the next event is read
    assert s.take("") == []  # no text yet for the byte pieces
    got = s.take("中")  # the three byte pieces, not the held space, never the eos
    assert [e.token_id for e in got] == ids[1:4]
    assert b"".join(bytes(e.bytes) for e in got).decode() == "中"
    out = Out()
    out.logprobs = live
    assert [e.token for e in s.take("", out)] == [" "]  # what is left, eos left out
    assert s.take("", out) == []


def test_minus_infinity_is_given_as_minus_9999(model):
    from dsvl2.engine.engine import TokenLogprob
    from dsvl2.structured import entry

    e = entry(TokenLogprob(5, float("-inf"), [(5, float("nan"))]), token_texts(model.processor.tokenizer))
    assert e.logprob == MIN_LOGPROB and e.top_logprobs[0].logprob == MIN_LOGPROB
    json.dumps(e.to_dict(), allow_nan=False)


def test_api_guides_and_their_errors(model, guides):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    with pytest.raises(GenerationError, match="test compiler: json_schema refused"):
        model.chat(HI, json_schema=schema)
    with pytest.raises(GenerationError, match="json_object refused"):
        model.chat(HI, response_format={"type": "json_object"})
    with pytest.raises(GenerationError, match="json_schema refused"):
        list(model.stream(HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    with pytest.raises(GenerationError, match="regex refused"):
        model.submit(HI, guide=Guide.regex("[0-9]+"))
    assert guides == [Guide.json_schema(schema), Guide.json_object(), Guide.json_schema(schema), Guide.regex("[0-9]+")]
    assert model.chat(HI, max_tokens=2, response_format={"type": "text"}).completion_tokens == 2  # no guide


def test_api_option_shapes(model, guides):
    """The shapes the options take in ``chat``: each guide that reaches the engine, the
    options that mean no guide, logprobs True / False / a count, and the errors."""
    schema = {"type": "object"}

    class Pydantic:  # a pydantic model class gives its schema
        @staticmethod
        def model_json_schema():
            return schema

    for options in ({"json_schema": schema}, {"response_format": {"type": "json_object"}}, {"json_schema": Pydantic}):
        with pytest.raises(GenerationError, match="test compiler: .* refused"):
            model.chat(HI, max_tokens=1, **options)
    for options in ({"response_format": {"type": "text"}}, {"response_format": None, "json_schema": None}):
        assert model.chat(HI, max_tokens=1, **options).completion_tokens == 1
    assert guides == [Guide.json_schema(schema), Guide.json_object(), Guide.json_schema(schema)]
    assert [len(e.top_logprobs) for e in model.chat(HI, max_tokens=2, logprobs=True).logprobs] == [0, 0]
    assert model.chat(HI, max_tokens=2, logprobs=False).logprobs is None
    assert [len(e.top_logprobs) for e in model.chat(HI, max_tokens=2, logprobs=20).logprobs] == [20, 20]
    for bad, words in [({"json_schema": schema, "response_format": {"type": "json_object"}}, "give one"),
                       ({"json_schema": schema, "guide": Guide.regex("a")}, "give one"),
                       ({"json_schema": "[1]"}, "json_schema must be a JSON schema object"),
                       ({"response_format": {"type": "xml"}}, "response_format.type"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                        "response_format.json_schema.schema is missing"),
                       ({"logprobs": 21}, "logprobs"),
                       ({"logprobs": -1}, "logprobs")]:
        with pytest.raises(GenerationError, match=words):
            model.chat(HI, max_tokens=1, **bad)
    assert len(guides) == 3  # refused before reaching the engine


# --------------------------------------------------------------------------- server: parsing


def test_the_schema_module_stays_free_of_torch():
    """server/schema.py (used by the batch job's driver) and structured.py import no torch;
    a request with a guide imports the engine's Guide when it is parsed."""
    import subprocess
    import sys

    from dsvl2.engine.sampling import MAX_TOP_LOGPROBS
    from dsvl2.server import schema

    assert schema.MAX_TOP_LOGPROBS == MAX_TOP_LOGPROBS
    code = ("import sys, dsvl2.server.schema as s, dsvl2.structured; "
            "s.parse_chat_request({'messages': [{'role': 'user', 'content': 'x'}], 'logprobs': True, "
            "'top_logprobs': 3, 'response_format': {'type': 'text'}}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def parse(**extra):
    return parse_chat_request({"messages": HI, **extra})


def test_schema_logprobs_fields():
    assert parse().sampling.get("logprobs") is None and not parse().logprobs
    assert parse(logprobs=False).sampling.get("logprobs") is None
    assert parse(logprobs=True).sampling["logprobs"] == 0 and parse(logprobs=True).logprobs
    assert parse(logprobs=True, top_logprobs=20).sampling["logprobs"] == 20
    assert parse(logprobs=True, top_logprobs=None).sampling["logprobs"] == 0
    assert parse(logprobs=None, top_logprobs=None).sampling.get("logprobs") is None


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
GOOD_GUIDES = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": None}, None),
    ({"response_format": {"type": "json_object"}}, Guide.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}},
     Guide.json_schema(SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True,
                                                                 "description": "d"}}}, Guide.json_schema(SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": None}}},
     Guide.json_schema(SCHEMA)),
    ({"guided_json": SCHEMA}, Guide.json_schema(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, Guide.json_schema(SCHEMA)),
    ({"guided_regex": "[a-z]+@[a-z]+\\.com"}, Guide.regex("[a-z]+@[a-z]+\\.com")),
    ({"guided_choice": ["yes", "no"]}, Guide.choice(["yes", "no"])),
    ({"guided_grammar": 'root ::= "a" | "b"'}, Guide.grammar('root ::= "a" | "b"')),
    ({"response_format": {"type": "text"}, "guided_regex": "a+"}, Guide.regex("a+")),
]


@pytest.mark.parametrize("extra, guide", GOOD_GUIDES, ids=[str(i) for i in range(len(GOOD_GUIDES))])
def test_schema_guides(extra, guide):
    assert parse(**extra).sampling.get("guide") == guide


BAD = [  # (extra fields, param, words in the message)
    ({"logprobs": 5}, "logprobs", "true or false"),
    ({"logprobs": "yes"}, "logprobs", "true or false"),
    ({"top_logprobs": 3}, "top_logprobs", "\"logprobs\": true"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs", "\"logprobs\": true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "from 0 to 20"),
    ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", "from 0 to 20"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {}}, "response_format.type", "got null"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", "non-empty string"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "response_format.json_schema.schema", "missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}},
     "response_format.json_schema.schema", "JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": "y"}}},
     "response_format.json_schema.strict", "true, false or null"),
    ({"guided_json": 5}, "guided_json", "JSON schema object"),
    ({"guided_json": "{nope"}, "guided_json", "not JSON"),
    ({"guided_regex": ""}, "guided_regex", "non-empty"),
    ({"guided_regex": ["a"]}, "guided_regex", "string"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_choice": "yes"}, "guided_choice", "list"),
    ({"guided_choice": ["yes", 1]}, "guided_choice", "strings"),
    ({"guided_grammar": 7}, "guided_grammar", "grammar string"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "not supported"),
]


@pytest.mark.parametrize("extra, param, words", BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_schema_refuses_bad_shapes(extra, param, words):
    with pytest.raises(APIError) as e:
        parse(**extra)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


# --------------------------------------------------------------------------- server: live


@slow
def test_openai_client_logprobs_streaming_and_not(server, model):
    client = server.client()
    res = client.chat.completions.create(model="demo", messages=HI, max_tokens=40, logprobs=True, top_logprobs=TOP)
    choice = res.choices[0]
    entries = as_dicts(choice.logprobs.content)
    assert len(entries) == res.usage.completion_tokens - (choice.finish_reason == "stop")
    check_entries(entries, choice.message.content, TOP)
    ref = model.chat(HI, max_tokens=40, logprobs=TOP)
    assert choice.message.content == ref.text and entries == as_dicts(ref.logprobs)

    chunks = list(client.chat.completions.create(model="demo", messages=HI, max_tokens=40, logprobs=True,
                                                 top_logprobs=TOP, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].logprobs is None
    streamed, text, raw = [], "", b""
    for c in chunks:
        ch = c.choices[0]
        if ch.delta.content:
            assert ch.logprobs is not None  # every chunk with text carries its entries (maybe none)
        if ch.logprobs is not None:
            streamed += as_dicts(ch.logprobs.content)
            raw += b"".join(bytes(e.bytes) for e in ch.logprobs.content)
        text += ch.delta.content or ""
        assert raw.decode("utf-8", "replace") == text  # entries travel with their text
    assert text == choice.message.content and streamed == entries

    # n choices: each has its own entries; raw HTTP shows the exact JSON shape
    r = post(server.url, {"messages": HI, "max_tokens": 6, "n": 2, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert set(c["logprobs"]) == {"content"}
        check_entries(c["logprobs"]["content"], c["message"]["content"], 2)


@slow
def test_logprobs_off_is_null_and_guides_reach_the_engine(server, guides):
    client = server.client()
    res = client.chat.completions.create(model="demo", messages=HI, max_tokens=5)
    assert res.choices[0].logprobs is None
    assert all(c.choices[0].logprobs is None
               for c in client.chat.completions.create(model="demo", messages=HI, max_tokens=5, stream=True)
               if c.choices)
    raw = post(server.url, {"messages": HI, "max_tokens": 3}).json()
    assert raw["choices"][0]["logprobs"] is None

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, response_format={"type": "json_schema",
                                                                                  "json_schema": {"name": "x"}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    # good shapes reach the engine's compiler; its refusal is a 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HI, response_format={"type": "json_object"})
    assert "json_object refused" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=HI, extra_body={"guided_choice": ["yes", "no"]})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=HI, stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert guides == [Guide.json_object(), Guide.choice(["yes", "no"]), Guide.json_schema(SCHEMA)]
    assert httpx.get(server.url + "/health").status_code == 200
