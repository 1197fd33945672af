"""Batch inference on Ray Data (``dsvl2.batch``): reading INPUT, resuming from OUT, the
per-row answers, and whole jobs on a local two-node Ray cluster and from the CLI.

Conventions of this file:
* The model is the shipped demo checkpoint (random weights, about 1 M parameters) with
  ``max_new_tokens=2``: a row costs a prefill of its image (600-1800 tokens) and two
  decode steps, seconds on a busy 2-core machine. Answers are compared by text, token
  counts and finish reason with ``dsvl2.load("demo").chat(prompt, images=[path])``
  run in this process with ONE torch thread, as each actor runs (1 CPU per actor).
* The cluster test starts a head and one worker node with ``ray.cluster_utils.Cluster``
  on 127.0.0.1, one CPU each, so that the two actors (one CPU each) must run on
  different nodes (checked: their processes are children of two different raylets).
  The Ray tests are bounded by a watchdog (SIGALRM) that fails them after ``BUDGET_S``
  seconds, so a hung job cannot block the suite, and the cluster is shut down whatever
  happens. They are marked ``slow`` (``make test-fast`` leaves them out).
* "Ctrl-C": ``on_batch`` raises KeyboardInterrupt after some rows, which is what Ctrl-C
  does to the driver (tested with the pipeline replaced by the actor class run in this
  process, no Ray: what is tested is the writing and resuming around it); "crash": OUT
  left with some rows and a torn last line; "killed actor": SIGKILL to one actor's
  process, found as a child of one of the cluster's raylets whose process title is
  ``ray::MapWorker...``.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
import shutil
import signal
from pathlib import Path

import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dsvl2.batch import (Answerer, BatchInputError, ChatAnswerer, JsonlResults, ParquetResults, Row, answer_record,
                         error_record, is_openai_batch, out_format, read_openai_batch, read_rows, run_batch)
from dsvl2.commands.main import main
from _paths import IMAGES
from _ray_cluster import raylet_pids, ray_workers, watchdog as ray_watchdog
from _ray_cluster import two_node_cluster as cluster_of_two

PROMPT = "Describe this image."
NEW_TOKENS = 2
SMALL_IMAGE = IMAGES / "multi_image_2.jpeg"  # 450x308: the shortest prompt
PHOTO = IMAGES / "monday.jpg"
BUDGET_S = 600  # a hang guard, not a speed check: generous for a loaded 2-core machine

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def demo():
    import dsvl2

    return dsvl2.load("demo", device="cpu")


@functools.lru_cache(maxsize=None)
def fresh():
    """The demo model without prefix caching, for comparing answers run in this process:
    its answer to a prompt does not depend on the requests before. (With prefix caching a
    prompt whose start another request left cached is prefilled in other pieces, and in
    bf16 that can change the last bits, so a near-tie token.)"""
    import dsvl2

    return dsvl2.load("demo", device="cpu", prefix_caching=False)


@functools.lru_cache(maxsize=None)
def reference(path: str, prompt: str = PROMPT) -> dict:
    a = demo().chat(prompt, images=[path], max_new_tokens=NEW_TOKENS)
    return {"text": a.text, "finish_reason": a.finish_reason,
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                      "total_tokens": a.prompt_tokens + a.completion_tokens}}


def image_folder(tmp_path: Path, names: list[str]) -> Path:
    """A folder with copies of test images, one broken image and a file that is no image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        shutil.copy(IMAGES / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (folder / "notes.txt").write_text("not an image: no row")
    return folder


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_matches_api(rec: dict, folder: Path) -> None:
    ref = reference(str((folder / rec["id"]).resolve()))
    got = {k: rec[k] for k in ("text", "finish_reason", "usage")}
    assert got == ref, rec["id"]
    assert rec["error"] is None


# --------------------------------------------------------------------------- INPUT


def test_folder_rows_are_the_image_files_with_relative_ids(tmp_path):
    folder = image_folder(tmp_path, ["monday.jpg"])
    (folder / "sub").mkdir()
    shutil.copy(SMALL_IMAGE, folder / "sub" / "b.JPEG")
    (folder / ".hidden").mkdir()
    shutil.copy(SMALL_IMAGE, folder / ".hidden" / "c.jpg")
    rows = read_rows(folder, "Caption it.")
    assert [r.id for r in rows] == ["broken.jpg", "monday.jpg", "sub/b.JPEG"]
    assert rows[2] == Row("sub/b.JPEG", "Caption it.", (str((folder / "sub" / "b.JPEG").resolve()),), {})


def test_jsonl_rows_resolve_paths_against_the_file_and_default_the_prompt(tmp_path):
    (tmp_path / "data").mkdir()
    src = tmp_path / "data" / "rows.jsonl"
    src.write_text('{"id": 7, "images": ["a.jpg", "/abs/b.png"], "sampling": {"max_new_tokens": 3}}\n'
                   '\n'
                   '{"id": "t", "prompt": "Hello", "images": "c.jpg"}\n'
                   '{"id": "x", "prompt": "No image", "extra": "ignored"}\n')
    rows = read_rows(src, "Default?")
    assert rows == [
        Row("7", "Default?", (str(tmp_path / "data" / "a.jpg"), "/abs/b.png"), {"max_new_tokens": 3}),
        Row("t", "Hello", (str(tmp_path / "data" / "c.jpg"),), {}),
        Row("x", "No image", (), {}),
    ]


@pytest.mark.parametrize("text, words", [
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', ["line 2", "'1'", "line 1", "unique"]),
    ('{"id": 1}\nnot json\n', ["line 2", "not JSON"]),
    ('{"prompt": "no id"}\n', ["line 1", "'id'"]),
    ('{"id": true}\n', ["'id'", "True"]),
    ('{"id": 1, "image": "a.jpg"}\n', ["'image'", "'images'"]),
    ('{"id": 1, "images": [3]}\n', ["'images'", "list of image paths"]),
    ('{"id": 1, "prompt": 5}\n', ["'prompt'", "string"]),
    ('{"id": 1, "sampling": [1]}\n', ["'sampling'", "object"]),
    ('[1, 2]\n', ["line 1", "object"]),
    ('\n', ["no rows"]),
])
def test_bad_input_rows_are_clear_errors_naming_the_line(tmp_path, text, words):
    src = tmp_path / "rows.jsonl"
    src.write_text(text)
    with pytest.raises(BatchInputError) as e:
        read_rows(src)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_parquet_input_rows(tmp_path):
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "a", "images": ["x.jpg"], "prompt": "P", "sampling": '{"temperature": 0.5}'},
        {"id": "b", "images": [], "prompt": None, "sampling": None},
    ]), src)
    assert read_rows(src, "D") == [Row("a", "P", (str(tmp_path / "x.jpg"),), {"temperature": 0.5}),
                                   Row("b", "D", (), {})]


def test_unusable_input_and_out_names_are_clear_errors(tmp_path):
    with pytest.raises(BatchInputError, match="INPUT not found"):
        read_rows(tmp_path / "missing")
    (tmp_path / "rows.csv").write_text("id\n1\n")
    with pytest.raises(BatchInputError, match="unknown file type '.csv'"):
        read_rows(tmp_path / "rows.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchInputError, match="no image files"):
        read_rows(tmp_path / "empty")
    assert out_format("a/out.JSONL") == "jsonl" and out_format("out.parquet") == "parquet"
    assert out_format("out.txt", "parquet") == "parquet"
    with pytest.raises(BatchInputError, match="--format"):
        out_format("out.txt")


# --------------------------------------------------------------------------- OUT


def test_jsonl_out_cuts_a_torn_last_line_and_appends_on_a_line_boundary(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "c", "te')  # died mid-write
    res = JsonlResults(out)
    assert res.done() == {"a", "b"}
    res.append([json.dumps({"id": "c", "text": "z"})])
    res.close()
    assert [r["id"] for r in read_out(out)] == ["a", "b", "c"]


def test_out_that_is_not_a_result_file_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nhello\n')
    with pytest.raises(BatchInputError, match="line 2 is not JSON"):
        JsonlResults(out).done()
    out.write_text('{"name": "a"}\n')
    with pytest.raises(BatchInputError, match="no 'id'"):
        JsonlResults(out).done()


def test_parquet_out_is_built_from_its_journal_and_merged_on_resume(tmp_path):
    out = tmp_path / "out.parquet"
    box = {"label": "cat", "box_norm": [1, 2, 3, 4], "box_px": None, "image_index": None}
    first = {"id": "a", "text": "t", "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 1,
             "total_tokens": 6}, "boxes": [box], "grounding_problems": ["p"], "error": None}
    res = ParquetResults(out)
    assert res.done() == set()
    res.append([json.dumps(first)])
    assert res.done() == {"a"}  # already done while only in the journal (a killed run)
    res.close()
    assert not res.journal.path.exists()
    res = ParquetResults(out)
    assert res.done() == {"a"}
    res.append([json.dumps(error_record("b", OSError("disk")))])
    res.close()
    rows = pq.read_table(out).to_pylist()
    assert rows[0] == first
    assert rows[1]["id"] == "b" and rows[1]["error"] == "OSError: disk" and rows[1]["text"] is None


# --------------------------------------------------------------------------- the actor, in this process


def actor(rows_per_call: int = 1) -> Answerer:
    a = Answerer.__new__(Answerer)  # the real class around the already loaded model
    a.setup(demo(), rows_per_call=rows_per_call, sampling={"max_new_tokens": NEW_TOKENS})
    return a


def batch_of(rows: list[Row]) -> dict:
    return {"id": [r.id for r in rows],
            "request": [json.dumps({"prompt": r.prompt, "images": list(r.images), "sampling": r.sampling})
                        for r in rows]}


@pytest.mark.parametrize("rows_per_call", [1, 3])
def test_actor_answers_like_the_api_and_records_bad_rows(tmp_path, rows_per_call):
    folder = image_folder(tmp_path, [SMALL_IMAGE.name])
    rows = read_rows(folder) + [Row("bad-sampling", PROMPT, (str(SMALL_IMAGE),), {"temperature": -1}),
                                Row("unknown-key", PROMPT, (str(SMALL_IMAGE),), {"beams": 4})]
    out = actor(rows_per_call)(batch_of(rows))
    assert list(out["id"]) == [r.id for r in rows]
    recs = {r["id"]: r for r in map(json.loads, out["record"])}
    assert_matches_api(recs[SMALL_IMAGE.name], folder)
    broken = recs["broken.jpg"]
    assert broken["text"] is None and broken["usage"] is None and "broken.jpg" in broken["error"]
    assert "temperature" in recs["bad-sampling"]["error"]
    assert "'beams'" in recs["unknown-key"]["error"] and "max_new_tokens" in recs["unknown-key"]["error"]


def test_answer_record_is_the_api_dict_plus_id_and_error():
    a = demo().chat("Hi", max_new_tokens=1)
    assert answer_record("r", a) == {"id": "r", **a.to_dict(), "error": None}


@pytest.fixture
def without_ray(monkeypatch):
    """run_batch with the Ray pipeline replaced by the job's actor class run here, one
    request per batch, around ``fresh()`` (see there)."""
    import contextlib

    import dsvl2.batch.pipeline as pipeline_mod
    import dsvl2.ray_connect as ray_connect
    from dsvl2.batch.answer import LOAD_KEYS

    def pipeline(ray, items, actor_cls, actor_kwargs, *args, **kwargs):
        answerer = actor_cls.__new__(actor_cls)  # the real class around the already loaded model
        answerer.setup(fresh(), **{k: v for k, v in actor_kwargs.items() if k not in LOAD_KEYS})
        for item in items:
            yield answerer({"id": [item["id"]], "request": [item["request"]]})

    monkeypatch.setattr(ray_connect, "connected", lambda *a, **k: contextlib.nullcontext(False))
    monkeypatch.setattr(pipeline_mod, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(pipeline_mod, "ray_pipeline", pipeline)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ctrl_c_keeps_the_rows_written_and_a_rerun_does_only_the_rest(tmp_path, without_ray, suffix):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Say {i}."}) + "\n" for i in range(5)))
    out = tmp_path / f"out{suffix}"
    seen = []

    def interrupt(records):
        seen.extend(records)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch("demo", src, out, sampling={"max_new_tokens": NEW_TOKENS}, on_batch=interrupt, log=print)
    read = (lambda: read_out(out)) if suffix == ".jsonl" else (lambda: pq.read_table(out).to_pylist())
    assert [r["id"] for r in read()] == ["r0", "r1"]  # a Parquet OUT is whole, from its journal
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    summary = run_batch("demo", src, out, sampling={"max_new_tokens": NEW_TOKENS}, log=print)
    assert (summary.skipped, summary.written) == (2, 3)
    recs = read()
    assert sorted(r["id"] for r in recs) == [f"r{i}" for i in range(5)]
    for r in recs:
        a = fresh().chat(f"Say {r['id'][1:]}.", max_new_tokens=NEW_TOKENS)
        assert (r["text"], r["usage"]["completion_tokens"]) == (a.text, a.completion_tokens)


# --------------------------------------------------------------------------- OpenAI batch files

CHAT = "/v1/chat/completions"


def request_line(cid: str, content, **body) -> dict:
    """An OpenAI batch line asking ``content`` (a string or content parts) as the user."""
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
                     "max_tokens": NEW_TOKENS, **body}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(image: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# The conversations the five good lines of openai_file() ask (images as the processor gets them).
OPENAI_CONVERSATIONS = {
    "text": [{"role": "user", "content": "Say hi."}],
    "data-url": image_message(str(SMALL_IMAGE), PROMPT),
    "relative": image_message(str(SMALL_IMAGE), "What is it?"),
    "two-choices": [{"role": "user", "content": "Count."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."}],
}


def openai_file(tmp_path: Path) -> Path:
    """The six-line batch file of the issue: five requests (text, an image as a data URL,
    an image as a path relative to the file, two choices, a system message without a
    model) and, as line 5, one that is not JSON."""
    (tmp_path / "pics").mkdir()
    shutil.copy(SMALL_IMAGE, tmp_path / "pics" / "small.jpeg")
    system = request_line("system", "")
    system["body"] = {"messages": OPENAI_CONVERSATIONS["system"], "max_completion_tokens": NEW_TOKENS}
    lines = [json.dumps(request_line("text", "Say hi.")),
             json.dumps(request_line("data-url", [image_part(data_url(SMALL_IMAGE)), text_part(PROMPT)])),
             json.dumps(request_line("relative", [image_part("pics/small.jpeg"), text_part("What is it?")])),
             json.dumps(request_line("two-choices", "Count.", n=2)),
             '{"custom_id": "cut-off", "method": "POST", ',
             json.dumps(system)]
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src


def assert_completion(rec: dict, conversation: list[dict], n: int = 1, exact: bool = True) -> None:
    """``rec`` is an OpenAI batch output line answering ``conversation`` as dsvl2 serve
    would: usage counted as ``fresh().chat`` counts it, and (``exact``) the same text."""
    assert rec["error"] is None and rec["id"].startswith("batch_req_"), rec
    resp = rec["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "demo"
    ref = fresh().chat(conversation, max_new_tokens=NEW_TOKENS)
    assert [c["index"] for c in body["choices"]] == list(range(n))
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        if exact:
            assert (choice["message"]["content"], choice["finish_reason"]) == (ref.text, ref.finish_reason), rec
    use = body["usage"]
    assert (use["prompt_tokens"], use["completion_tokens"]) == (ref.prompt_tokens, n * ref.completion_tokens)
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]


def assert_openai_out(recs: list[dict], exact: bool = True) -> None:
    """OUT of openai_file(): one line per input line, each with its custom_id."""
    assert len(recs) == 6
    by_id = {r["custom_id"]: r for r in recs}
    assert set(by_id) == {None, *OPENAI_CONVERSATIONS}
    bad = by_id[None]  # the line that is not JSON: its custom_id cannot be read
    assert bad["response"] is None and bad["id"].startswith("batch_req_")
    assert bad["error"]["code"] == "invalid_json" and "requests.jsonl line 5 is not JSON" in bad["error"]["message"]
    for cid, conversation in OPENAI_CONVERSATIONS.items():
        assert_completion(by_id[cid], conversation, n=2 if cid == "two-choices" else 1, exact=exact)


def test_the_input_format_is_told_by_the_first_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('\n{"id": 1, "prompt": "custom_id and body are only words here"}\n')
    src = tmp_path / "requests.jsonl"
    src.write_text("\n" + json.dumps(request_line("a", "Hi.")) + "\nnot json\n")
    assert not is_openai_batch(rows) and is_openai_batch(src)
    with pytest.raises(BatchInputError, match="name OUT .jsonl"):  # OpenAI's output format is JSONL
        run_batch("demo", src, tmp_path / "out.parquet")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "x", "error": null}\n')
    with pytest.raises(BatchInputError, match="line 1 has no 'custom_id'"):  # a dsvl2 row OUT
        run_batch("demo", src, out)
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "a", "response": None, "error": None}) + "\n")
    with pytest.raises(BatchInputError, match="OpenAI batch output line"):  # and the other way round
        run_batch("demo", rows, out)


def test_openai_lines_that_are_not_answerable_requests_get_their_own_output_line(tmp_path):
    from dsvl2.server.errors import APIError
    from dsvl2.server.schema import parse_chat_request

    lines = [
        request_line("ok", "Hi."),
        "not json",
        [1, 2],
        {"method": "POST", "url": CHAT, "body": request_line("x", "Hi.")["body"]},
        {**request_line("get", "Hi."), "method": "GET"},
        {**request_line("embed", "Hi."), "url": "/v1/embeddings"},
        {"custom_id": "no-body", "method": "POST", "url": CHAT},
        request_line("hot", "Hi.", temperature=5),
        request_line("tools", "Hi.", tools=[{"type": "function", "function": {"name": "f"}}]),
        request_line("stream", "Hi.", stream=True),
        request_line("remote", [image_part("https://example.com/cat.jpg"), text_part("What?")]),
        "not json",  # the same text again: a line of its own
    ]
    src = tmp_path / "requests.jsonl"
    src.write_text("\n\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    batch = read_openai_batch(src)
    assert [(r.custom_id, r.where) for r in batch.requests] == [("ok", "requests.jsonl line 1")]
    assert batch.lines == len(lines)
    got = dict(zip([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], batch.refused))

    def line_error(n, cid, code, *words):
        key, rec = got[n]
        assert rec["custom_id"] == cid and rec["response"] is None and rec["error"]["code"] == code, rec
        for w in (f"requests.jsonl line {2 * n - 1}", *words):
            assert w in rec["error"]["message"], (w, rec)
        assert key == (cid if cid is not None else ("line", rec["id"]))

    line_error(2, None, "invalid_json", "not JSON")
    line_error(3, None, "invalid_request", "JSON array, not an object")
    line_error(4, None, "invalid_custom_id", "no custom_id")
    line_error(5, "get", "invalid_method", 'must be "POST", got "GET"')
    line_error(6, "embed", "invalid_url", f'must be "{CHAT}"', '"/v1/embeddings"')
    line_error(12, None, "invalid_json")
    assert got[2][0] != got[12][0]  # two equal broken lines, two results
    assert [k for k, _ in read_openai_batch(src).refused] == [k for k, _ in batch.refused]  # the same keys again

    def refused_like_the_api(n, cid, param):
        """A body the chat endpoint refuses: its status and error body, as the HTTP API sends them."""
        _, rec = got[n]
        assert rec["custom_id"] == cid and rec["error"] is None and rec["response"]["status_code"] == 400, rec
        err = rec["response"]["body"]["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
        return err

    no_body = refused_like_the_api(7, "no-body", None)
    assert no_body["message"] == "the request body must be a JSON object, got a JSON null"
    for n, cid, param in ((8, "hot", "temperature"), (9, "tools", "tools")):
        with pytest.raises(APIError) as e:
            parse_chat_request(lines[n - 1]["body"])
        assert refused_like_the_api(n, cid, param) == e.value.body()["error"]
    assert "stream is not supported in a batch" in refused_like_the_api(10, "stream", "stream")["message"]
    err = refused_like_the_api(11, "remote", "messages[0].content[0].image_url.url")
    assert "does not fetch remote images" in err["message"] and err["code"] == "invalid_image_url"


def test_a_custom_id_used_twice_stops_the_job_naming_both_lines(tmp_path):
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(json.dumps(request_line(cid, "Hi.")) for cid in ("a", "b", "a")) + "\n")
    with pytest.raises(BatchInputError) as e:
        run_batch("demo", src, tmp_path / "out.jsonl")
    for w in ("requests.jsonl line 3", "custom_id 'a'", "line 1", "unique"):
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "out.jsonl").exists()


def chat_actor(folder: Path, rows_per_call: int = 1) -> ChatAnswerer:
    a = ChatAnswerer.__new__(ChatAnswerer)  # the real class around the already loaded model
    a.setup(fresh(), rows_per_call=rows_per_call, sampling={"max_new_tokens": NEW_TOKENS}, served_model_name="demo",
            image_dir=str(folder))
    return a


@pytest.mark.parametrize("rows_per_call", [1, 4])
def test_chat_actor_answers_as_the_api_and_records_bad_requests(tmp_path, rows_per_call):
    (tmp_path / "pics").mkdir()
    shutil.copy(SMALL_IMAGE, tmp_path / "pics" / "small.jpeg")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    bodies = {
        "relative": request_line("", [image_part("pics/small.jpeg"), text_part("What is it?")])["body"],
        "missing": request_line("", [image_part("pics/none.jpeg"), text_part("?")])["body"],
        "two-choices": request_line("", "Count.", n=2)["body"],
        "outside": request_line("", [image_part(str(SMALL_IMAGE)), text_part("?")])["body"],  # not under the folder
        "not-an-image": request_line("", [image_part("pics/notes.txt"), text_part("?")])["body"],
        "default-tokens": {"messages": [{"role": "user", "content": "Say hi."}]},  # the command line's 2 tokens
        "too-long": request_line("", "word " * 5000)["body"],
    }
    out = chat_actor(tmp_path, rows_per_call)({"id": list(bodies), "request": [json.dumps(b) for b in bodies.values()]})
    assert list(out["id"]) == list(bodies)
    recs = {r["custom_id"]: r for r in map(json.loads, out["record"])}
    assert_completion(recs["relative"], OPENAI_CONVERSATIONS["relative"])
    assert_completion(recs["two-choices"], OPENAI_CONVERSATIONS["two-choices"], n=2)
    assert_completion(recs["default-tokens"], OPENAI_CONVERSATIONS["text"])
    for cid, code, words in (("missing", "invalid_image_url", ["'pics/none.jpeg' is not a file under", str(tmp_path)]),
                             ("outside", "invalid_image_url", ["is not a file under"]),
                             ("not-an-image", "invalid_image", ["not an image"]),
                             ("too-long", "context_length_exceeded", ["context window"])):
        resp = recs[cid]["response"]
        assert resp["status_code"] == 400 and recs[cid]["error"] is None, recs[cid]
        assert resp["body"]["error"]["code"] == code, resp
        for w in words:
            assert w in resp["body"]["error"]["message"], (w, resp)


def test_openai_batch_file_gets_one_output_line_per_line_and_resumes_by_custom_id(tmp_path, without_ray):
    src = openai_file(tmp_path)
    out = tmp_path / "out.jsonl"
    job = dict(sampling={"max_new_tokens": 512}, log=print)  # the command line's default; the bodies set 2
    summary = run_batch("demo", src, out, **job)
    assert (summary.rows, summary.skipped, summary.written, summary.errors) == (6, 0, 6, 1)
    assert_openai_out(read_out(out))

    before = out.read_bytes()  # nothing left to do: OUT is not touched
    summary = run_batch("demo", src, out, **job)
    assert (summary.skipped, summary.written) == (6, 0) and out.read_bytes() == before

    kept = before.decode().splitlines()[:2]  # a run that died after two lines, in the middle of a third
    out.write_text("".join(line + "\n" for line in kept) + before.decode().splitlines()[2][:30])
    summary = run_batch("demo", src, out, **job)
    assert (summary.skipped, summary.written) == (2, 4)
    recs = read_out(out)
    assert [json.dumps(r) for r in recs[:2]] == [json.dumps(json.loads(line)) for line in kept]
    assert_openai_out(recs)


def test_importing_dsvl2_batch_imports_neither_ray_nor_torch():
    code = "import sys, dsvl2.batch; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- a job on two nodes


@pytest.fixture
def watchdog():
    with ray_watchdog(BUDGET_S):
        yield


@pytest.fixture
def two_node_cluster(watchdog):
    with cluster_of_two() as cluster:
        yield cluster


@pytest.mark.slow  # a Ray instance / cluster: start-up alone takes tens of seconds here
def test_job_on_two_nodes_answers_like_the_api_resumes_and_survives_a_killed_actor(tmp_path, two_node_cluster):
    names = sorted(p.name for p in IMAGES.iterdir() if p.suffix != ".json")
    folder = image_folder(tmp_path, names)
    out = tmp_path / "out.jsonl"
    job = dict(prompt=PROMPT, sampling={"max_new_tokens": NEW_TOKENS}, actors=2, batch_size=1,
               address=two_node_cluster.address, log=lambda line: None)
    for name in names:  # the answers to compare with, computed while nobody else runs
        reference(str((folder / name).resolve()))

    # 1. A run that died after 3 rows, in the middle of writing the 4th.
    earlier = [answer_record(n, demo().chat(PROMPT, images=[str((folder / n).resolve())], max_new_tokens=NEW_TOKENS))
               for n in names[:3]]
    out.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"id": "' + names[3])

    # 2. Resume; one of the two actors (one per node) is killed after the first new row.
    parents = raylet_pids(two_node_cluster)
    killed = []

    def kill_one(records):
        if not killed:
            workers = ray_workers(parents, b"ray::MapWorker")
            assert len(set(workers.values())) == 2, workers  # 2 actors, on 2 nodes
            pid = min(workers)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = run_batch("demo", folder, out, on_batch=kill_one, **job)
    assert killed
    assert (summary.rows, summary.skipped, summary.written, summary.errors) == (len(names) + 1, 3, len(names) - 2, 1)
    recs = read_out(out)  # the torn line is gone: every line is JSON
    assert sorted(r["id"] for r in recs) == sorted(names + ["broken.jpg"])  # every row exactly once
    for rec in recs:
        if rec["id"] == "broken.jpg":
            assert rec["text"] is None and "broken.jpg" in rec["error"] and "Pillow" in rec["error"]
        else:
            assert_matches_api(rec, folder)
    assert not ray.is_initialized()  # run_batch connected, and disconnected at the end

    # 3. Nothing left to do: OUT is not touched.
    before = out.read_bytes()
    summary = run_batch("demo", folder, out, **job)
    assert (summary.skipped, summary.written) == (len(names) + 1, 0)
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- the command line


@pytest.mark.slow  # a Ray instance / cluster: start-up alone takes tens of seconds here
def test_cli_batch_writes_one_row_per_image_and_a_rerun_writes_nothing(tmp_path, capsys, watchdog):
    folder = image_folder(tmp_path, [SMALL_IMAGE.name, PHOTO.name])
    out = tmp_path / "out.jsonl"
    argv = ["batch", "-m", "demo", str(folder), str(out), "--max-new-tokens", str(NEW_TOKENS)]
    assert main(argv) == 0
    recs = {r["id"]: r for r in read_out(out)}
    assert sorted(recs) == ["broken.jpg", PHOTO.name, SMALL_IMAGE.name]
    assert recs["broken.jpg"]["error"] and recs["broken.jpg"]["text"] is None
    for name in (SMALL_IMAGE.name, PHOTO.name):
        assert_matches_api(recs[name], folder)
    err = capsys.readouterr().err
    assert "3/3 rows done (3 new, 1 with errors)" in err and "wrote 3 new row(s) (1 with errors)" in err
    before = out.read_bytes()
    assert main(argv) == 0
    assert out.read_bytes() == before
    assert "nothing to do" in capsys.readouterr().err


def test_cli_batch_errors_are_one_line(tmp_path, capsys):
    folder = image_folder(tmp_path, [])
    assert main(["batch", "-m", "demo", str(folder), str(tmp_path / "out.txt")]) == 1
    assert "--format" in capsys.readouterr().err
    assert main(["batch", "-m", "demo", str(folder), str(tmp_path / "o.jsonl"), "--top-p", "2"]) == 1
    assert "--top-p must be" in capsys.readouterr().err
    assert main(["batch", "-m", "demo", str(folder), str(tmp_path / "o.jsonl"), "--actors", "0"]) == 1
    assert "--actors" in capsys.readouterr().err
    assert main(["batch", "-m", str(tmp_path / "nowhere"), str(folder), str(tmp_path / "o.jsonl")]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow  # a Ray instance / cluster: start-up alone takes tens of seconds here
def test_cli_batch_answers_an_openai_batch_file_and_a_rerun_adds_nothing(tmp_path, capsys, watchdog):
    src = openai_file(tmp_path)
    out = tmp_path / "out.jsonl"
    argv = ["batch", "-m", "demo", str(src), str(out)]
    assert main(argv) == 0
    # The actor's model caches prefixes (the two requests about one image share one): in
    # bf16 a text may then differ from a fresh chat's in a near-tie; the counts may not.
    assert_openai_out(read_out(out), exact=False)
    err = capsys.readouterr().err
    assert "6/6 requests done (6 new, 1 with errors)" in err and "wrote 6 new row(s) (1 with errors)" in err
    before = out.read_bytes()
    assert main(argv) == 0
    assert out.read_bytes() == before
    assert "nothing to do" in capsys.readouterr().err
