"""Structured output end to end: the official ``openai`` client against a live ``dsvl2
serve`` app (``test_server.LiveServer``) on the shipped demo model.

What a user builds on: JSON mode returns a JSON object; ``json_schema`` answers parse
and validate (``jsonschema``), streamed and not; ``guided_choice`` returns one of the
choices; a schema keyword the guide cannot enforce is a 400 naming it. A handful of
generated schemas (a small seeded generator below) all give valid JSON.

The model's weights are random, the hardest user of a guide, and it never closes a free
string or a number's fraction on its own (``engine/guided.py``): every schema bounds its
strings with ``maxLength`` and its numbers with integer types and ``maximum``, and
``max_tokens`` leaves room for the longest answer. Sampled requests carry a seed.
Logprobs through the client (shape, greedy max) are tested in test_logprobs.py.

Conventions: live servers are ``slow``; ONE torch thread (``one_thread``).
"""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest

import dsvl2
from dsvl2.server import create_app
from test_server import KEY, LiveServer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

ASK = [{"role": "user", "content": "Answer in JSON."}]
MAX_TOKENS = 400  # far more than any schema below needs: a cut answer would be a failure, not a pass

NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "name": {"type": "string", "maxLength": 8},
                                              "tags": {"type": "array", "maxItems": 2,
                                                       "items": {"type": "string", "maxLength": 4}}},
             "required": ["id", "name", "tags"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["user", "active"], "additionalProperties": False}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                                         "count": {"enum": [1, 2, 3]}},
        "required": ["color", "size", "count"], "additionalProperties": False}
ARRAY = {"type": "object", "properties": {"points": {"type": "array", "minItems": 2, "maxItems": 4,
                                                     "items": {"type": "integer", "minimum": -50, "maximum": 50}}},
         "required": ["points"], "additionalProperties": False}
SCHEMAS = {"nested": NESTED, "enum": ENUM, "array": ARRAY}
# greedy, and sampled with fixed seeds
SAMPLING = [{}, {"temperature": 1.0, "seed": 7}]


@pytest.fixture(scope="module")
def model():
    return dsvl2.load("demo", prefix_caching=False)  # dtype "auto": bf16 weights, as `dsvl2 serve`


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(create_app(model, served_model_name="demo", api_key=KEY))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def response_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client, stream: bool = False, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one choice, streamed or not."""
    if not stream:
        res = client.chat.completions.create(model="demo", messages=ASK, max_tokens=MAX_TOKENS, **kw)
        return res.choices[0].message.content, res.choices[0].finish_reason
    text, finish = "", None
    for c in client.chat.completions.create(model="demo", messages=ASK, max_tokens=MAX_TOKENS, stream=True, **kw):
        for ch in c.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kw", SAMPLING, ids=["greedy", "seeded"])
def test_json_mode_returns_a_json_object(client, kw, stream):
    text, finish = ask(client, stream, response_format={"type": "json_object"}, **kw)
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("kw", SAMPLING, ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate_streamed_and_not(client, name, kw):
    schema = SCHEMAS[name]
    whole, finish = ask(client, response_format=response_format(schema, name), **kw)
    assert finish == "stop", whole
    jsonschema.validate(json.loads(whole), schema)
    streamed, finish = ask(client, stream=True, response_format=response_format(schema, name), **kw)
    assert finish == "stop" and streamed == whole  # the same request, the same (seeded) answer


def test_guided_json_extension_and_the_api_agree(client, model):
    """vLLM's ``guided_json`` is the same guide as ``response_format``; the server's answer
    is the Python API's."""
    text, _ = ask(client, extra_body={"guided_json": ARRAY})
    jsonschema.validate(json.loads(text), ARRAY)
    api = model.chat(ASK, max_tokens=MAX_TOKENS, response_format=response_format(ARRAY))
    assert api.text == text and api.finish_reason == "stop"


# --------------------------------------------------------------------------- choices, refusals


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kw", SAMPLING + [{"temperature": 1.0, "seed": 8}], ids=["greedy", "seeded", "seeded2"])
def test_guided_choice_is_one_of_the_choices(client, kw, stream):
    choices = ["yes", "no", "maybe not"]
    text, finish = ask(client, stream, extra_body={"guided_choice": choices}, **kw)
    assert text in choices and finish == "stop"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_unsupported_schema_keyword_is_a_400_naming_it(client, schema, stream):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, stream, response_format=response_format(schema))
    assert e.value.status_code == 400 and "uniqueItems" in e.value.body["message"], e.value.body


# --------------------------------------------------------------------------- generated schemas


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema with required, bounded fields: strings (maxLength), integers
    (minimum / maximum), enums, arrays of integers (maxItems), booleans and (once) a
    nested object of the same kinds."""
    kinds = ["string", "integer", "enum", "array", "boolean"] + (["object"] if depth == 0 else [])
    props = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 8)}
        elif kind == "integer":
            lo = rng.randint(-100, 100)
            prop = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
        elif kind == "enum":
            prop = {"enum": rng.sample(["alpha", "beta", "gamma", "delta", 1, 2, True, None], rng.randint(1, 4))}
        elif kind == "array":
            prop = {"type": "array", "maxItems": rng.randint(0, 4),
                    "items": {"type": "integer", "minimum": 0, "maximum": rng.randint(0, 99)}}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        else:
            prop = random_schema(rng, depth + 1)
        props[f"{kind}_{i}"] = prop
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def test_random_schemas_all_give_valid_json(client):
    rng = random.Random(20240611)
    for k in range(6):
        schema = random_schema(rng)
        jsonschema.Draft202012Validator.check_schema(schema)
        kw = {} if k % 2 == 0 else {"temperature": 1.0, "seed": k}
        text, finish = ask(client, stream=k % 3 == 2, response_format=response_format(schema, f"s{k}"), **kw)
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
