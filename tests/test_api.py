"""The Python API (``dsvl2.api``): loading, every conversation format, batches,
streaming, seeded sampling, greedy ids against the reference, dtypes and the errors a
caller can cause.

Conventions of this file:
* The models are the golden checkpoints (about 1 M parameters) and the shipped demo; all
  run on the CPU with ONE torch thread (on a busy 2-core machine a second OpenMP thread
  makes every small op wait; integer outputs do not depend on the thread count).
* Loaded models are cached per module (``model(...)``); a model keeps no state between
  ``chat`` calls, so sharing one is safe.
* Answers are compared through their token ids, text and prompt length: two ways of
  writing the same conversation must give the SAME tokens, not just similar text.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dsvl2.api as api
from dsvl2.api import Answer, Delta, VLModel, load
from dsvl2.engine.seams import use_sampler
from dsvl2.errors import DSVL2Error
from dsvl2.processing import Processor
from _paths import GOLDEN, IMAGES

CASES = GOLDEN / "processor" / "official"

SMALL_IMAGE = IMAGES / "multi_image_2.jpeg"  # 450x308 -> 2x1 local tiles: a short prompt
PHOTO = IMAGES / "monday.jpg"  # 878x620 -> 3x2 local tiles
PROMPT = "Describe this image."


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def model(name: str = "tiny", dtype: str = "float32") -> VLModel:
    return load(name if name == "demo" else GOLDEN / name, dtype=dtype, device="cpu")


def same(a: Answer, b: Answer) -> bool:
    return (a.token_ids, a.text, a.prompt_tokens, a.finish_reason) == (b.token_ids, b.text, b.prompt_tokens,
                                                                        b.finish_reason)


# --------------------------------------------------------------------------- load


def test_load_demo_answers_offline():
    m = model("demo", "auto")
    assert isinstance(m, VLModel)
    assert m.folder.name == "demo" and (m.folder / "config.json").is_file()
    a = m.chat(PROMPT, images=[SMALL_IMAGE], max_new_tokens=5)
    assert isinstance(a, Answer)
    assert a.completion_tokens == len(a.token_ids) >= 1
    assert a.finish_reason in ("stop", "length")
    assert a.prompt_tokens > 200  # the image's tokens are in the prompt
    assert len(a.images) == 1 and a.images[0].size == (450, 308)


def test_load_golden_folder_float32():
    m = model("tiny", "float32")
    assert m.folder == GOLDEN / "tiny"
    dtypes = {p.dtype for p in m.model.parameters()}
    assert dtypes == {torch.float32}
    assert m.config.language.hidden_size == 64


def test_dtype_auto_keeps_bf16_weights():
    m = load(GOLDEN / "tiny", dtype="auto", device="cpu")
    assert m.model.language.lm_head.weight.dtype == torch.bfloat16
    assert m.model.language.model.embed_tokens.weight.dtype == torch.bfloat16
    # ...and still answers (fp32 compute on the CPU)
    a = m.chat("Hello there", max_new_tokens=3)
    assert a.completion_tokens == 3 and a.finish_reason == "length"


@pytest.mark.parametrize("kwargs, words", [
    (dict(dtype="int8"), ["unknown dtype", "'int8'", "float32", "bfloat16"]),
    (dict(dtype="float64"), ["unknown dtype", "'float64'"]),
    (dict(device="tpu"), ["unknown device", "'tpu'", "cpu"]),
    (dict(device="banana"), ["unknown device", "'banana'"]),
])
def test_unknown_dtype_or_device_is_a_clear_error(kwargs, words):
    with pytest.raises(DSVL2Error) as info:
        load("demo", **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg


def test_unavailable_cuda_is_a_clear_error():
    if torch.cuda.is_available():  # this check is about machines without a GPU
        assert api.pick_device("cuda").type == "cuda"
        return
    with pytest.raises(DSVL2Error, match="no CUDA GPU"):
        load("demo", device="cuda")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DSVL2Error, match="not found"):
        load(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DSVL2Error, match="no config.json"):
        load(tmp_path / "empty")


# --------------------------------------------------------------------------- formats


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_every_conversation_format_gives_the_same_answer():
    m = model("tiny")
    opts = dict(max_new_tokens=8)
    raw = SMALL_IMAGE.read_bytes()
    pil = Image.open(io.BytesIO(raw))
    pil.load()

    ref = m.chat(PROMPT, images=[str(SMALL_IMAGE)], **opts)
    assert ref.completion_tokens == 8 and ref.prompt_tokens > 200

    variants = {
        "reference format": [{"role": "<|User|>", "content": "<image>\n" + PROMPT, "images": [str(SMALL_IMAGE)]},
                             {"role": "<|Assistant|>", "content": ""}],
        "openai image_url data URL": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(SMALL_IMAGE)}},
            {"type": "text", "text": PROMPT}]}],
        "openai image_url string": [{"role": "user", "content": [
            {"type": "image_url", "image_url": _data_url(SMALL_IMAGE)}, {"type": "text", "text": PROMPT}]}],
        "openai image bytes": [{"role": "user", "content": [
            {"type": "image", "image": raw}, {"type": "text", "text": PROMPT}]}],
        "openai image PIL": [{"role": "user", "content": [
            {"type": "image", "image": pil}, {"type": "text", "text": PROMPT}]}],
    }
    for name, conv in variants.items():
        a = m.chat(conv, **opts)
        assert isinstance(a, Answer), name
        assert same(a, ref), (name, a.text, ref.text)
        assert a.images[0].size == (450, 308), name
    # a bare image part whose image comes from the images argument; and a Path / PIL prompt
    a = m.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
               images=[pil], **opts)
    assert same(a, ref)
    assert same(m.chat(PROMPT, images=[pil], **opts), ref)
    assert same(m.chat(PROMPT, images=[raw], **opts), ref)


def test_system_prompt_changes_the_prompt():
    m = model("tiny")
    plain = m.chat("Hello", max_new_tokens=2)
    sys_ = m.chat("Hello", system="You are a helpful assistant.", max_new_tokens=2)
    conv = m.chat([{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Hello"}], max_new_tokens=2)
    assert sys_.prompt_tokens > plain.prompt_tokens
    assert same(sys_, conv)


def test_batch_of_conversations_equals_each_alone():
    m = model("tiny")
    opts = dict(max_new_tokens=10)
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": str(SMALL_IMAGE)},
                                      {"type": "text", "text": PROMPT}]}],
        [{"role": "<|User|>", "content": "Tell me a story about a dog."}],  # text only: left padding
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    ]
    batch = m.chat(convs, **opts)
    assert isinstance(batch, list) and len(batch) == 3
    assert all(isinstance(a, Answer) for a in batch)
    assert batch[0].prompt_tokens > batch[1].prompt_tokens  # different lengths: a padded batch
    for conv, a in zip(convs, batch):
        alone = m.chat(conv, **opts)
        assert same(a, alone), (a.text, alone.text)
    # a batch of one is still a list
    one = m.chat([convs[1]], **opts)
    assert isinstance(one, list) and len(one) == 1 and same(one[0], batch[1])


def test_bad_messages_are_clear_errors():
    m = model("tiny")
    with pytest.raises(DSVL2Error, match="tag"):
        m.chat("<image>\n<image>\nTwo?", images=[SMALL_IMAGE])  # 2 tags, 1 image
    with pytest.raises(DSVL2Error, match="role"):
        m.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(DSVL2Error):
        m.chat([])
    with pytest.raises(DSVL2Error, match="not found"):
        m.chat(PROMPT, images=[IMAGES / "no-such-image.jpg"])
    with pytest.raises(DSVL2Error, match="temperature"):
        m.chat("hi", temperature=-1)


def test_a_single_image_is_one_image_not_one_per_character():
    m = model("tiny")
    opts = dict(max_new_tokens=4)
    ref = m.chat(PROMPT, images=[SMALL_IMAGE], **opts)
    raw = SMALL_IMAGE.read_bytes()
    pil = Image.open(io.BytesIO(raw))
    pil.load()
    for single in (str(SMALL_IMAGE), SMALL_IMAGE, raw, pil):
        a = m.chat(PROMPT, images=single, **opts)
        assert same(a, ref), type(single).__name__
        assert len(a.images) == 1
        streamed = [d.answer for d in m.stream(PROMPT, images=single, **opts) if d.answer is not None]
        assert len(streamed) == 1 and same(streamed[0], ref), type(single).__name__
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    assert same(m.chat(conv, images=str(SMALL_IMAGE), **opts), ref)  # a bare image part, filled from images


def test_max_tokens_is_the_openai_alias_of_max_new_tokens():
    m = model("tiny")
    ref = m.chat("Tell me a story.", max_new_tokens=5)
    assert ref.completion_tokens == 5
    assert same(m.chat("Tell me a story.", max_tokens=5), ref)
    assert same(m.chat("Tell me a story.", max_tokens=5, max_new_tokens=5), ref)  # both, agreeing
    streamed = [d.answer for d in m.stream("Tell me a story.", max_tokens=5) if d.answer is not None]
    assert same(streamed[0], ref)
    with pytest.raises(DSVL2Error) as info:
        m.chat("Tell me a story.", max_tokens=5, max_new_tokens=6)
    msg = str(info.value)
    assert "max_tokens=5" in msg and "max_new_tokens=6" in msg and "\n" not in msg


@pytest.mark.parametrize("kwargs, bad", [(dict(max_length=5), "'max_length'"),
                                         (dict(temprature=0.5, top_p=0.9), "'temprature'"),
                                         (dict(n=2, best_of=2), "'n', 'best_of'")])
def test_unknown_options_are_a_one_line_error_naming_the_allowed_ones(kwargs, bad):
    m = model("tiny")
    for call in (lambda: m.chat("hi", **kwargs), lambda: list(m.stream("hi", **kwargs))):
        with pytest.raises(DSVL2Error) as info:  # not a TypeError about SamplingParams' constructor
            call()
        msg = str(info.value)
        assert "\n" not in msg and "unknown option" in msg and bad in msg, msg
        for allowed in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "max_tokens",
                        "seed", "stop", "stop_token_ids", "params", "logprobs", "guide", "response_format",
                        "json_schema"):
            assert allowed in msg, (allowed, msg)


def test_params_object_or_keywords():
    m = model("tiny")
    ref = m.chat("Hello", max_new_tokens=3)
    assert same(m.chat("Hello", params=api.SamplingParams(max_new_tokens=3)), ref)
    with pytest.raises(DSVL2Error, match="not both"):
        m.chat("Hello", params=api.SamplingParams(max_new_tokens=3), temperature=0.5)
    with pytest.raises(DSVL2Error, match="params must be a SamplingParams, got dict"):
        m.chat("Hello", params={"max_new_tokens": 3})


# --------------------------------------------------------------------------- streaming, sampling


def test_stream_deltas_concatenate_to_the_final_text():
    m = model("tiny")
    deltas = list(m.stream(PROMPT, images=[SMALL_IMAGE], max_new_tokens=12))
    assert all(isinstance(d, Delta) and d.index == 0 for d in deltas)
    finals = [d for d in deltas if d.answer is not None]
    assert len(finals) == 1 and finals[0] is deltas[-1]
    answer = finals[0].answer
    assert "".join(d.text for d in deltas) == answer.text
    assert len([d for d in deltas if d.text]) > 1  # it really streamed
    assert same(answer, m.chat(PROMPT, images=[SMALL_IMAGE], max_new_tokens=12))


def test_stream_of_a_batch_tags_each_row():
    m = model("tiny")
    convs = [[{"role": "user", "content": "One two three"}], [{"role": "user", "content": "Four"}]]
    texts, answers = ["", ""], {}
    for d in m.stream(convs, max_new_tokens=6):
        texts[d.index] += d.text
        if d.answer is not None:
            answers[d.index] = d.answer
    assert sorted(answers) == [0, 1]
    assert [answers[i].text for i in (0, 1)] == texts


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = model("tiny")
    opts = dict(temperature=1.0, max_new_tokens=16)
    a = m.chat("Tell me a story.", seed=1, **opts)
    b = m.chat("Tell me a story.", seed=1, **opts)
    c = m.chat("Tell me a story.", seed=2, **opts)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.text != c.text
    greedy = m.chat("Tell me a story.", max_new_tokens=16)
    assert greedy.token_ids != a.token_ids or greedy.token_ids != c.token_ids


def test_stop_string_and_max_new_tokens():
    m = model("tiny")
    full = m.chat("Tell me a story.", max_new_tokens=12)
    assert full.finish_reason == "length" and full.completion_tokens == 12
    # stop at a piece of the greedy text: the text is cut before it
    stop = full.text.strip()[2:5]
    assert stop and stop in full.text
    cut = m.chat("Tell me a story.", max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


# --------------------------------------------------------------------------- the reference


def _case_conversation(case: str) -> list[dict]:
    spec = json.loads((CASES / case / "case.json").read_text())
    (conv,) = spec["conversations"]
    return [{**msg, "images": [str(IMAGES / p) for p in msg.get("images", [])]} for msg in conv]


@pytest.mark.parametrize("variant, case", [("tiny", "c01_single_image"), ("small", "c06_text_only")])
def test_float32_greedy_ids_equal_the_reference(variant, case):
    expected = json.loads((GOLDEN / variant / "outputs" / f"{case}.json").read_text())
    m = model(variant, "float32")
    a = m.chat(_case_conversation(case), max_new_tokens=20)
    assert a.prompt_tokens == expected["seq_len"]
    assert a.token_ids == expected["gen_ids"][0]
    assert a.finish_reason == ("stop" if expected["gen_hit_eos"][0] else "length")
    ids = [i for i in a.token_ids if i != 1]  # text excludes the eos
    assert a.text == m.processor.tokenizer.decode(ids)


# --------------------------------------------------------------------------- answers


def test_answer_fields_and_to_dict():
    m = model("tiny")
    a = m.chat(PROMPT, images=[SMALL_IMAGE], max_new_tokens=4)
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["text"] == a.text and d["finish_reason"] == "length"
    assert d["usage"] == {"prompt_tokens": a.prompt_tokens, "completion_tokens": 4,
                          "total_tokens": a.prompt_tokens + 4}
    proc = Processor.from_pretrained(GOLDEN / "tiny")
    batch = proc([{"role": "user", "content": "<image>\n" + PROMPT, "images": [str(SMALL_IMAGE)]}])
    assert a.prompt_tokens == batch.seq_lens[0]
    assert isinstance(d["boxes"], list) and isinstance(d["grounding_problems"], list)


def test_logprobs_are_the_model_distribution_before_the_sampling_options():
    """logprobs=N: each token's log-softmax under the raw logits (no penalty, temperature,
    top-k), the N most likely first; off by default, and nothing computed then."""
    m = model("tiny")
    opts = dict(max_new_tokens=6, temperature=1.5, top_k=3, repetition_penalty=1.3, seed=3)
    batch, _ = m.process("Tell me a story.")
    (h,) = m.driver.submit(batch, api.SamplingParams(**opts, logprobs=4), output_scores=True)
    out = h.result()
    lp = torch.log_softmax(out.scores.float(), -1)  # [steps, V] of the raw logits
    a = api.make_answer(out, [], m.processor.tokenizer, m.engine.eos_ids)
    assert [e.token_id for e in a.logprobs] == out.ids
    for i, e in enumerate(a.logprobs):
        assert e.logprob == pytest.approx(float(lp[i, e.token_id]), abs=1e-5)
        assert [t.token_id for t in e.top_logprobs] == lp[i].topk(4).indices.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(lp[i].topk(4).values.tolist(), abs=1e-5)
        assert e.token == m.processor.tokenizer.decode([e.token_id])
    same_run = m.chat("Tell me a story.", logprobs=4, **opts)
    assert same_run.text == a.text and [e.to_dict() for e in same_run.logprobs] == [e.to_dict() for e in a.logprobs]
    assert m.chat("Tell me a story.", **opts).text == a.text  # asking for logprobs changes nothing else
    assert a.to_dict()["logprobs"][0].keys() == {"token", "logprob", "bytes", "top_logprobs"}
    (h,) = m.driver.submit(batch, api.SamplingParams(**opts))
    assert h.result().logprobs is None


def test_draw_without_images_is_a_clear_error():
    a = model("tiny").chat("Hello", max_new_tokens=2)
    assert a.images == []
    with pytest.raises(DSVL2Error, match="no image"):
        a.draw()


def test_scripted_grounding_answer_gives_pixel_boxes_on_the_last_image():
    m = model("tiny")
    markup = "<|ref|>the cat<|/ref|><|det|>[[100, 200, 500, 800]]<|/det|>"
    script = iter(m.processor.tokenizer.encode(markup) + [1])
    with use_sampler(lambda logits, *a, **k: torch.tensor([next(script)])):
        a = m.chat("<|grounding|>Find the cat.", images=[PHOTO, SMALL_IMAGE], max_new_tokens=100)
    assert a.text == markup and a.finish_reason == "stop"
    W, H = Image.open(SMALL_IMAGE).size
    assert a.boxes == [{"label": "the cat", "box_norm": [100, 200, 500, 800],
                        "box_px": [int(100 / 999 * W), int(200 / 999 * H), int(500 / 999 * W), int(800 / 999 * H)],
                        "image_index": 1}]
    img = a.draw()
    assert img.size == (W, H)
    assert img.getpixel((int(500 / 999 * W), int(500 / 999 * H))) != Image.open(SMALL_IMAGE).convert("RGB").getpixel(
        (int(500 / 999 * W), int(500 / 999 * H)))
    assert a.draw(0).size == Image.open(PHOTO).size


@pytest.mark.parametrize("markup", [
    "<|ref|>cat<|/ref|><|det|>[[10, 20, 30",  # truncated
    "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>",  # unclosed ref
    "<|ref|>cat<|/ref|><|det|>[[a, b, c, d]]<|/det|>",  # not numbers
    "<|ref|>cat<|/ref|><|det|>[[1, 2, 3]]<|/det|>",  # 3 numbers
    "<|ref|>cat<|/ref|><|det|>[[1" + "0" * 50 + ", 2, 3, 4]]<|/det|>",  # huge
    "<|ref|>cat<|/ref|><|det|>[[__import__('pathlib').Path('PWNED').touch(), 1, 2, 3]]<|/det|>",
])
def test_malformed_grounding_is_reported_never_raised(markup, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    m = model("tiny")
    script = iter(m.processor.tokenizer.encode(markup) + [1])
    with use_sampler(lambda logits, *a, **k: torch.tensor([next(script)])):
        a = m.chat("<|grounding|>Find the cat.", images=[SMALL_IMAGE], max_new_tokens=300)
    assert a.text == markup
    assert a.grounding.problems
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d and d["grounding_problems"] == a.grounding.problems
    for b in a.boxes:
        assert all(0 <= v <= 999 for v in b["box_norm"])
    assert a.draw().size == (450, 308)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- one result type


def test_chat_stream_and_submit_give_the_same_answer():
    """chat, stream's last Delta and submit(...)[0].result() are ONE type with every field
    (timings and cached tokens included) and equal values for the same greedy request."""
    base = model("tiny")
    m = VLModel(base.model, base.processor, base.folder, prefix_caching=False)  # no cache hit between the runs
    opts = dict(images=[SMALL_IMAGE], max_new_tokens=6, logprobs=2)
    chat = m.chat(PROMPT, **opts)
    streamed = [d for d in m.stream(PROMPT, **opts) if d.answer is not None][0].answer
    (h,) = m.submit(PROMPT, **opts)
    submitted = h.result(timeout=120)
    assert h.result() is submitted  # made once
    assert type(h.output).__name__ == "GenerationOutput" and h.output.ids == submitted.ids  # the raw output stays
    names = [f.name for f in dataclasses.fields(Answer)]
    assert {"text", "finish_reason", "prompt_tokens", "completion_tokens", "token_ids", "grounding", "boxes",
            "images", "logprobs", "timings", "cached_tokens", "error"} <= set(names)
    for other in (streamed, submitted):
        assert type(other) is Answer
        for name in names:
            if name == "timings":
                assert other.timings.keys() == chat.timings.keys()
            elif name == "logprobs":
                assert [e.to_dict() for e in other.logprobs] == [e.to_dict() for e in chat.logprobs]
            elif name == "images":
                assert [i.size for i in other.images] == [i.size for i in chat.images] == [(450, 308)]
            else:
                assert getattr(other, name) == getattr(chat, name), name
        assert other.to_dict() == chat.to_dict()
    for a in (chat, streamed, submitted):
        t = a.timings
        assert t["total_s"] >= t["first_token_s"] >= t["queue_s"] >= 0 and t["vision_s"] > 0 and t["prefill_s"] > 0
        assert a.cached_tokens == 0 and a.error is None and a.ids == a.token_ids
        assert a.usage == {"prompt_tokens": a.prompt_tokens, "completion_tokens": 6,
                           "total_tokens": a.prompt_tokens + 6, "prompt_tokens_details": {"cached_tokens": 0}}
        assert a.total_tokens == a.prompt_tokens + 6


def test_cached_tokens_reach_the_answer_on_every_path():
    base = model("tiny")
    m = VLModel(base.model, base.processor, base.folder)  # prefix caching on
    first = m.chat("Tell me a story about a cat.", max_new_tokens=2)
    again = m.chat("Tell me a story about a cat.", max_new_tokens=2)
    (h,) = m.submit("Tell me a story about a cat.", max_new_tokens=2)
    third = h.result(timeout=120)
    assert first.cached_tokens == 0 < again.cached_tokens == third.cached_tokens <= first.prompt_tokens
    assert again.usage["prompt_tokens_details"]["cached_tokens"] == again.cached_tokens
    assert again.token_ids == third.token_ids == first.token_ids


def test_engine_handles_keep_their_raw_output_and_a_failure_has_its_error():
    from dsvl2.engine.engine import GenerationOutput

    m = model("tiny")
    batch, _ = m.process("Hello")
    (h,) = m.driver.submit(batch, api.SamplingParams(max_new_tokens=2))
    out = h.result(timeout=120)
    assert isinstance(out, GenerationOutput) and out is h.output  # the engine-level API is unchanged
    a = api.make_answer(out, [])
    assert (a.ids, a.timings, a.cached_tokens) == (out.ids, out.timings, out.cached_tokens)
    failed = api.make_answer(GenerationOutput([5], "x", "error", 3, 1, error="RuntimeError: boom"), [])
    assert failed.finish_reason == "error" and failed.error == "RuntimeError: boom"


# --------------------------------------------------------------------------- text stays text


def test_image_tag_typed_in_an_openai_message_is_answered_as_text():
    m = model("tiny")
    tok = m.processor.tokenizer
    literal = "look at <image> here"
    for messages in ([{"role": "user", "content": [{"type": "text", "text": literal}]}],
                     [{"role": "user", "content": literal}]):
        batch, _ = m.process(messages)
        ids = batch.input_ids[0].tolist()
        assert tok.image_id not in ids and literal in tok.decode(ids)
        a = m.chat(messages, max_new_tokens=3)
        assert a.completion_tokens == 3 and a.prompt_tokens == len(ids) and a.images == []
    # the reference's format (a prompt string is one of its user turns) keeps its tags
    with pytest.raises(DSVL2Error, match="1 '<image>' tag.*0 image"):
        m.chat(literal, max_new_tokens=1)
    assert m.chat(literal, images=[SMALL_IMAGE], max_new_tokens=1).prompt_tokens > 200


@pytest.mark.parametrize("messages", ["", "  \n", [{"role": "user", "content": ""}],
                                      [{"role": "user", "content": [{"type": "text", "text": " "}]}]])
def test_an_empty_prompt_is_an_error(messages):
    from dsvl2.errors import ConversationError

    m = model("tiny")
    with pytest.raises(ConversationError, match="nothing to answer"):
        m.chat(messages, max_new_tokens=2)
    with pytest.raises(ConversationError, match="nothing to answer"):
        m.submit(messages, max_new_tokens=2)


DEMO_WARNINGS = """
import sys, warnings
import dsvl2.api as api

if sys.argv[1] == "noted":
    api.demo_note_given()  # the CLI / server said it in their words
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")  # every warning raised, none folded into an earlier one
    api.load(sys.argv[2], device="cpu")  # not the demo: never
    api.load("demo", device="cpu")
    api.load("demo", device="cpu")  # once per process
for w in seen:
    if "RANDOM weights" in str(w.message):
        print(w.filename, str(w.message).replace(chr(10), " "), sep="|")
"""


def test_loading_the_demo_warns_once_that_its_weights_are_random(tmp_path):
    """In fresh processes (the flag is per process, and this one may have warned already)."""
    script = tmp_path / "caller.py"
    script.write_text(DEMO_WARNINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def random_weight_warnings(mode: str) -> list[tuple[str, str]]:
        run = subprocess.run([sys.executable, str(script), mode, str(GOLDEN / "tiny")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        return [tuple(line.split("|", 1)) for line in run.stdout.splitlines()]

    ((filename, message),) = random_weight_warnings("first")
    assert filename == str(script)  # pointed at the caller of load
    assert "deepseek-ai/deepseek-vl2-tiny" in message
    assert random_weight_warnings("noted") == []


FIRST_PHOTO = """
import ctypes, sys
import dsvl2.api as api
from dsvl2.model.vl import DeepseekVL2
from PIL import Image

if sys.argv[1] == "unwarmed":
    DeepseekVL2.warm_vision = lambda self, max_tiles: None
m = api.load(sys.argv[2], device="cpu")
ctypes.CDLL(None).fflush(None)  # oneDNN's lines so far, before the mark
print("LOADED", flush=True)
photo = Image.new("RGB", (900, 600), (120, 60, 30))
m.chat([{"role": "user", "content": "<image>\\nWhat is it?", "images": [photo]}], max_new_tokens=1)
ctypes.CDLL(None).fflush(None)
"""


def test_the_first_photo_creates_no_onednn_kernels_for_its_vision(tmp_path):
    """``api.load`` runs ``warm_vision``: the patch embedding, the tower's (prepacked)
    products and the projector for batches of 1 .. the runner's ``tile_batch`` tiles (this
    photo's 7 run as one batch), so that the kernels oneDNN creates
    for each new row count exist before the first request (oneDNN's own log,
    ONEDNN_VERBOSE=all, in fresh processes). Without it the same photo creates some."""
    script = tmp_path / "photo.py"
    script.write_text(FIRST_PHOTO)
    env = {**os.environ, "ONEDNN_VERBOSE": "all"}

    def created_in_the_request(mode: str) -> list[str]:
        run = subprocess.run([sys.executable, str(script), mode, str(GOLDEN / "tiny")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert "LOADED" in lines
        after = lines[lines.index("LOADED") + 1:]
        return [line for line in after if "create:cache_miss" in line
                and any(f",{kind}," in line for kind in ("inner_product", "convolution", "eltwise"))]

    assert created_in_the_request("warmed") == []
    assert created_in_the_request("unwarmed")  # the check sees them where nothing warmed
