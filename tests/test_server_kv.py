"""The server and the command lines over the paged KV cache: the byte budget
(``--kv-cache-bytes``), its metrics, ``/v1/models``, ``usage.prompt_tokens_details.
cached_tokens`` and the 400 for a request larger than the whole budget.

Conventions: as tests/test_server.py (whose helpers are imported): live servers on
127.0.0.1 in this process on a port the OS picked, or the real ``python -m dsvl2 serve``
command in a subprocess; every wait bounded; live servers marked ``slow``. The demo
checkpoint in the default dtype, prefix caching ON here (the cache is what is measured);
prompts that must not hit the cache start with a word of their own.
"""

from __future__ import annotations

import argparse
import itertools
import os
from types import SimpleNamespace

import openai
import pytest

import dsvl2
from dsvl2 import api
from dsvl2.commands.main import build_parser, main
from dsvl2.server import create_app
from dsvl2.server.metrics import Metrics
from dsvl2.server.responses import cached_tokens, completion, usage
from dsvl2.sizes import format_size
from test_server import (FOOD, KEY, LiveServer, assert_openai_error, data_url, gauge, outcome, post, serve_command,
                         user, wait_for)

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.slow

KV_GAUGES = ("dsvl2_kv_cache_bytes_capacity", "dsvl2_kv_cache_bytes_used", "dsvl2_kv_cache_bytes_peak",
             "dsvl2_kv_cache_blocks_capacity", "dsvl2_kv_cache_blocks_used", "dsvl2_batch_slots_in_use",
             "dsvl2_batch_slots_capacity")
KV_COUNTERS = ("dsvl2_preemptions_total", "dsvl2_prefix_cache_hit_tokens_total", "dsvl2_vision_tiles_total")
GONE = ("dsvl2_prefix_cache_rows", "dsvl2_prefix_cache_hits_total", "dsvl2_kv_cache_rows_total",
        "dsvl2_kv_cache_rows_in_use")
_fresh = itertools.count()


def fresh(text: str) -> list[dict]:
    """A conversation no earlier request of this module starts like (no cache hit)."""
    return [user(f"Request number {next(_fresh)} of {os.getpid()}: {text}")]


LONG = ("Please describe, in a few careful sentences, how a lighthouse keeper spent an ordinary winter "
        "evening on a small rocky island far from the coast, long before electricity.")  # ~40 tokens


# --------------------------------------------------------------------------- without a server


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["batch", "in.jsonl", "out.jsonl", "-m", "demo"]])
def test_kv_cache_bytes_flag_on_every_command(command):
    assert _parse(command).kv_cache_bytes is None  # the engine derives the default
    assert _parse(command + ["--kv-cache-bytes", "64KiB"]).kv_cache_bytes == 65536
    assert _parse(command + ["--kv-cache-bytes", "1.5 GiB"]).kv_cache_bytes == 3 << 29
    assert _parse(command + ["--kv-cache-bytes=512MB"]).kv_cache_bytes == 512_000_000
    assert _parse(command + ["--kv-cache-bytes", "1048576"]).kv_cache_bytes == 1 << 20


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["batch", "in.jsonl", "out.jsonl", "-m", "demo"]])
@pytest.mark.parametrize("bad, words", [("12XB", "unknown unit 'XB'"), ("-1GB", "negative"), ("0", "more than 0"),
                                        ("nan", "finite"), ("", "empty"), ("1.5", "whole number of bytes")])
def test_kv_cache_bytes_flag_refuses_bad_sizes_as_a_usage_error(command, bad, words, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(command + [f"--kv-cache-bytes={bad}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --kv-cache-bytes:" in err and words in err, err
    assert "Traceback" not in err


def test_help_says_where_the_default_comes_from(capsys):
    for command in (["chat"], ["serve"], ["batch"]):
        with pytest.raises(SystemExit):
            _parse(command + ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--kv-cache-bytes SIZE" in out and "free after the weights" in out, out


def test_no_prefix_caching_flag_on_serve():
    assert _parse(["serve"]).prefix_caching is True
    assert _parse(["serve", "--no-prefix-caching"]).prefix_caching is False


class _Loaded(Exception):
    """Raised by the fake loader: the test has what it wanted."""


@pytest.fixture
def load_kwargs(monkeypatch):
    """dsvl2.api.load replaced: records its keyword arguments, then fails the command."""
    seen: dict = {}

    def fake(model, **kw):
        seen.update(kw, model=model)
        raise dsvl2.errors.DSVL2Error("stop here (test)")

    monkeypatch.setattr(api, "load", fake)
    return seen


def test_chat_passes_the_budget_to_load(load_kwargs, capsys):
    assert main(["chat", "-m", "demo", "--kv-cache-bytes", "2MiB", "hi"]) == 1
    assert load_kwargs["kv_cache_bytes"] == 2 << 20
    assert "stop here (test)" in capsys.readouterr().err


@slow
def test_serve_passes_the_budget_and_prefix_caching_to_load(load_kwargs, capsys):
    """The real command in this process; the load fails at once, so it exits with status 1."""
    assert main(["serve", "--port", "0", "--log-level", "warning", "--kv-cache-bytes", "3MiB",
                 "--no-prefix-caching"]) == 1
    assert load_kwargs["kv_cache_bytes"] == 3 << 20 and load_kwargs["prefix_caching"] is False
    assert "stop here (test)" in capsys.readouterr().err


def test_batch_passes_the_budget_to_each_actors_load(load_kwargs, monkeypatch):
    from dsvl2 import batch
    from dsvl2.commands import batch as command

    seen = {}

    def run_batch(*args, **kw):
        seen.update(kw)
        raise _Loaded

    monkeypatch.setattr(command, "run_batch", run_batch)
    with pytest.raises(_Loaded):
        command.cmd_batch(_parse(["batch", "in.jsonl", "out.jsonl", "-m", "demo", "--kv-cache-bytes", "5MiB"]))
    assert seen["kv_cache_bytes"] == 5 << 20
    with pytest.raises(dsvl2.errors.DSVL2Error, match="stop here"):  # the actor's constructor
        batch.Answerer("demo", "auto", "cpu", None, 1, kv_cache_bytes=5 << 20)
    assert load_kwargs["kv_cache_bytes"] == 5 << 20


def test_ray_serve_options_take_sizes():
    ray_serve = pytest.importorskip("dsvl2.server.ray_serve")
    opts = ray_serve.options({})
    assert opts["kv_cache_bytes"] is None and opts["prefix_caching"] is True
    opts = ray_serve.options({"kv_cache_bytes": "4GiB", "prefix_caching": "false"})
    assert opts["kv_cache_bytes"] == 4 << 30 and opts["prefix_caching"] is False
    assert ray_serve.options({"kv_cache_bytes": 65536})["kv_cache_bytes"] == 65536  # YAML: a number
    for bad in ("12XB", "0", -5):
        with pytest.raises(dsvl2.errors.DSVL2Error, match="kv_cache_bytes"):
            ray_serve.options({"kv_cache_bytes": bad})


def test_metrics_render_the_budget_and_drop_the_row_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    stats = {"running": 1, "admitting": 0, "waiting": 2, "slots_in_use": 1, "slots_total": 4, "steps": 9,
             "kv_cache_bytes_capacity": 1 << 20, "kv_cache_bytes_used": 4096, "kv_cache_bytes_peak": 8192,
             "kv_block_size": 16, "kv_blocks_total": 256, "kv_blocks_used": 1, "preemptions": 3,
             "prefix_cache_hit_tokens": 48, "vision_tiles": 7}
    fams = {f.name: f for f in text_string_to_metric_families(Metrics().render(stats))}
    samples = {s.name: s.value for f in fams.values() for s in f.samples}
    assert samples["dsvl2_kv_cache_bytes_capacity"] == 1 << 20 and samples["dsvl2_kv_cache_bytes_used"] == 4096
    assert samples["dsvl2_kv_cache_bytes_peak"] == 8192
    assert samples["dsvl2_kv_cache_blocks_capacity"] == 256 and samples["dsvl2_kv_cache_blocks_used"] == 1
    assert samples["dsvl2_batch_slots_in_use"] == 1 and samples["dsvl2_batch_slots_capacity"] == 4
    assert samples["dsvl2_preemptions_total"] == 3 and samples["dsvl2_prefix_cache_hit_tokens_total"] == 48
    assert samples["dsvl2_vision_tiles_total"] == 7
    for name in KV_COUNTERS:
        assert fams[name[:-len("_total")]].type == "counter"
    for name in KV_GAUGES:
        assert fams[name].type == "gauge"
    assert not set(GONE) & set(samples)
    loading = {s.name: s.value for f in text_string_to_metric_families(Metrics().render(None)) for s in f.samples}
    assert all(loading[n] == 0 for n in KV_GAUGES + KV_COUNTERS)  # while the model loads: zeros


def test_usage_has_cached_tokens_counted_once_for_all_choices():
    assert usage(10, 5) == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage(10, 5, 8)["prompt_tokens_details"] == {"cached_tokens": 8}
    outs = [SimpleNamespace(cached_tokens=c) for c in (32, 48)]  # choice 1 reused choice 0's fresh blocks
    assert cached_tokens(outs) == 32 and cached_tokens([]) == 0
    body = completion("id", "demo", [], 60, cached=32)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32} and body["usage"]["prompt_tokens"] == 60


# --------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def model():
    return dsvl2.load("demo")  # prefix caching on, the default budget


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(create_app(model, served_model_name="demo", api_key=KEY))
    yield s
    s.close()


def _metrics_consistent(m: dict) -> None:
    for name in KV_GAUGES + KV_COUNTERS:
        assert gauge(m, name) >= 0, name
    assert gauge(m, "dsvl2_kv_cache_bytes_capacity") > 0
    assert gauge(m, "dsvl2_kv_cache_bytes_used") <= gauge(m, "dsvl2_kv_cache_bytes_peak")
    assert gauge(m, "dsvl2_kv_cache_bytes_peak") <= gauge(m, "dsvl2_kv_cache_bytes_capacity")
    assert gauge(m, "dsvl2_kv_cache_blocks_used") <= gauge(m, "dsvl2_kv_cache_blocks_capacity")
    assert not {name for name, _ in m} & set(GONE)


@slow
def test_models_report_the_budget(server, model):
    ext = server.client().models.retrieve("demo").model_extra["dsvl2"]
    stats = model.driver.stats()
    assert ext["kv_cache_bytes"] == stats["kv_cache_bytes_capacity"] > 0
    assert ext["kv_block_size"] == stats["kv_block_size"] > 0
    assert isinstance(ext["kv_cache_bytes"], int) and isinstance(ext["kv_block_size"], int)


@slow
def test_metrics_present_and_consistent_before_and_after_requests(server):
    before = server.metrics()
    _metrics_consistent(before)
    client = server.client()
    client.chat.completions.create(model="demo", messages=fresh("Hello!"), max_tokens=4)
    image = data_url(FOOD)  # the text first: no earlier request's prompt starts like this one
    client.chat.completions.create(model="demo", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": fresh("What food is this?")[0]["content"]},
        {"type": "image_url", "image_url": {"url": image}}]}])
    m = server.metrics()
    _metrics_consistent(m)
    assert gauge(m, "dsvl2_kv_cache_bytes_peak") > 0  # the requests held blocks
    assert gauge(m, "dsvl2_kv_cache_bytes_peak") >= gauge(before, "dsvl2_kv_cache_bytes_peak")
    assert gauge(m, "dsvl2_vision_tiles_total") > gauge(before, "dsvl2_vision_tiles_total")  # the image was encoded
    for name in KV_COUNTERS:
        assert gauge(m, name) >= gauge(before, name), name  # counters never go down
    wait_for(lambda: gauge(server.metrics(), "dsvl2_batch_slots_in_use") == 0, "the slots to be free")


@slow
def test_cached_tokens_in_usage_streaming_and_not(server):
    client = server.client()
    msgs = fresh(LONG)
    first = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    raw = post(server.url, {"messages": msgs, "max_tokens": 4}).json()["usage"]
    assert set(raw) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert isinstance(raw["prompt_tokens_details"]["cached_tokens"], int)

    chunks = list(client.chat.completions.create(model="demo", messages=fresh(LONG), max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and isinstance(last.usage.prompt_tokens_details.cached_tokens, int)
    assert 0 <= last.usage.prompt_tokens_details.cached_tokens < last.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


@slow
def test_a_second_identical_request_reuses_the_prompt(server):
    client = server.client()
    msgs = fresh(LONG)
    hits0 = gauge(server.metrics(), "dsvl2_prefix_cache_hit_tokens_total")
    first = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)
    again = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)
    reused = again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens == first.usage.prompt_tokens >= 32
    assert first.usage.prompt_tokens_details.cached_tokens < reused <= again.usage.prompt_tokens
    hits = gauge(server.metrics(), "dsvl2_prefix_cache_hit_tokens_total") - hits0
    assert hits >= reused + first.usage.prompt_tokens_details.cached_tokens

    streamed = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=4, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 0

    two = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4, n=2, temperature=1.0, seed=1)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == first.usage.prompt_tokens  # counted once
    assert 0 < two.usage.prompt_tokens_details.cached_tokens <= two.usage.prompt_tokens


# --------------------------------------------------------------------------- a tiny budget, the real command


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``python -m dsvl2 serve --kv-cache-bytes 64KiB`` (the demo model: a few hundred tokens)."""
    with serve_command("--log-level", "warning", "--kv-cache-bytes", "64KiB",
                       what="dsvl2 serve --kv-cache-bytes 64KiB") as srv:
        yield srv
    assert srv.rc == 0 and "Traceback" not in srv.err, srv.err


@slow
def test_the_budget_flag_reaches_the_engine(tiny):
    ext = tiny.client.models.retrieve("demo").model_extra["dsvl2"]
    assert 0 < ext["kv_cache_bytes"] <= 64 * 1024
    assert gauge(tiny.metrics(), "dsvl2_kv_cache_bytes_capacity") == ext["kv_cache_bytes"]


@slow
def test_a_request_larger_than_the_whole_budget_is_a_400(tiny):
    msgs = [user("Hello, how are you today?")]
    ok = tiny.client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)  # fits
    ext = tiny.client.models.retrieve("demo").model_extra["dsvl2"]
    before = tiny.metrics()
    needed = ok.usage.prompt_tokens + 1000
    for stream in (False, True):
        r = post(tiny.url, {"messages": msgs, "max_tokens": 1000, "stream": stream})
        err = assert_openai_error(r, 400)
        assert err["type"] == "invalid_request_error"
        msg = err["message"]
        assert str(needed) in msg or "1000" in msg, msg  # what the request needs ...
        # ... and what the budget holds, in bytes or in tokens (whole blocks, the null block or not)
        cap, block = ext["kv_cache_bytes"], ext["kv_block_size"]
        blocks = int(gauge(before, "dsvl2_kv_cache_blocks_capacity"))
        budget = {str(cap), format_size(cap), "65536", "64 KiB", str(blocks * block), str((blocks - 1) * block)}
        assert any(b in msg for b in budget), (msg, budget)
    with pytest.raises(openai.BadRequestError):
        tiny.client.chat.completions.create(model="demo", messages=msgs, max_tokens=1000)
    m = tiny.metrics()
    assert outcome(m, "invalid") - outcome(before, "invalid") == 3 and outcome(m, "error") == 0
    again = tiny.client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)  # still serving
    assert again.usage.prompt_tokens == ok.usage.prompt_tokens and again.choices[0].finish_reason
