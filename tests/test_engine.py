"""Engine: KV-cache layout and growth, batches of mixed rows, chunked prefill, seeded
sampling, streaming text, stop conditions, the context window, continuous batching and
the request queue. Everything runs on the golden checkpoints (a few M parameters).

Conventions of this file:
* ``alone(...)`` is the truth a batched / chunked / interleaved run is compared with: the
  same conversation generated on its own by a fresh engine (cached per module).
* One torch thread: the models are a few M parameters, where a second OpenMP thread buys
  nothing and, on a busy 2-core machine, makes every small op wait for a descheduled
  thread (measured 7-10x slower). Integer outputs do not depend on the thread count.
* Scripted tests give the engine a sampler that returns a chosen id sequence (multi-byte
  characters, stop strings, eos, ids beyond the tokenizer), which then goes through the
  real step loop, detokeniser and stop logic (``script``, tests/conftest.py).
* What a step ran is read from the engine's step observer (``StepReport``); nothing of
  the engine is replaced.
"""

from __future__ import annotations

import functools
import json
import logging
import time

import pytest
import torch

from dsvl2.engine.engine import Engine, GenerationOutput
from dsvl2.engine.request import Request
from dsvl2.engine.sampling import SamplingParams
from dsvl2.errors import GenerationError
from dsvl2.engine.seams import StepReport, use_sampler
from dsvl2.model.cache import KVCache
from dsvl2.model.rope import apply_rope
from dsvl2.processing import Processor
from dsvl2.checkpoint.load import load_model
from _paths import GOLDEN, IMAGES

CASES = GOLDEN / "processor" / "official"


EOS = 1
# "hello world. The end" in the golden tokenizer: 'he' 'll' 'o' ' world' '.' ' The' ' end'
HELLO = [259, 278, 81, 1111, 16, 2359, 739]


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def load(variant: str):
    folder = GOLDEN / variant
    return load_model(folder), Processor.from_pretrained(folder)


def conv(text: str, images: tuple[str, ...] = ()) -> list[dict]:
    user = {"role": "<|User|>", "content": "<image>\n" * len(images) + text}
    if images:
        user["images"] = [str(IMAGES / name) for name in images]
    return [user, {"role": "<|Assistant|>", "content": ""}]


TEXT = conv("Hello, how are you today?")
ONE_IMAGE = conv("What food is this?", ("multi_image_2.jpeg",))
TWO_IMAGES = conv("Compare the two pictures.", ("multi_image_2.jpeg", "visual_grounding_2.jpg"))
MIXED = (TEXT, ONE_IMAGE, TWO_IMAGES)  # 17, 632 and 1657 tokens: rows left-padded by 1640 and 1025
SHORT = tuple(conv(t) for t in ("Hi.", "Tell me a story about a cat.", "What is two plus two?",
                                "Name three colours, please.", "Why is the sky blue?"))


def engine(variant: str, **kw) -> Engine:
    model, proc = load(variant)
    return Engine(model, proc.tokenizer, **kw)


def batch(variant: str, convs):
    return load(variant)[1](list(convs))


def greedy(n: int = 20, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


@functools.cache
def _alone(variant: str, key: str, n: int) -> tuple[list[int], str, str]:
    c = json.loads(key)
    out = engine(variant).generate(batch(variant, [c]), greedy(n))[0]
    return out.ids, out.text, out.finish_reason


@functools.cache
def mixed(variant: str) -> tuple[GenerationOutput, ...]:
    """MIXED generated as one batch, whole prefill, greedy, 20 tokens."""
    return tuple(engine(variant).generate(batch(variant, MIXED), greedy(20)))


def alone(variant: str, c, n: int = 20) -> list[int]:
    """Greedy ids of conversation ``c`` generated on its own."""
    return _alone(variant, json.dumps(c), n)[0]


def golden(variant: str, case: str):
    """(conversations, reference gen_ids) of a golden case."""
    spec = json.loads((CASES / case / "case.json").read_text())
    convs = [[dict(m, images=[str(IMAGES / i) for i in m["images"]]) if m.get("images") else m for m in c]
             for c in spec["conversations"]]
    return convs, json.loads((GOLDEN / variant / "outputs" / f"{case}.json").read_text())["gen_ids"]


def run_to_end(eng: Engine) -> None:
    while eng.active or eng.waiting:
        eng.step()


def scripted_run(variant: str, ids, **params) -> tuple[GenerationOutput, list[str]]:
    """Stream one short conversation whose output is forced to ``ids``: (output, deltas)."""
    params.setdefault("max_new_tokens", len(ids))
    deltas, out = [], None
    for ev in engine(variant).stream(batch(variant, [TEXT]), SamplingParams(**params)):
        deltas.append(ev.delta)
        if ev.output is not None:
            out = ev.output
    return out, deltas


def observed(eng: Engine) -> list[StepReport]:
    """The reports of ``eng``'s steps from now on, in a list."""
    reports: list[StepReport] = []
    eng.add_step_observer(reports.append)
    return reports


def decode_sizes(reports: list[StepReport]) -> list[int]:
    """Rows of every decode forward; checks that no row that finished was decoded."""
    for rep in reports:
        ended = {rid for rid, why in rep.finished.items() if why != "error"}
        assert not ended & {rid for rid, _ in rep.decode}, "a finished row was decoded"
    return [len(rep.decode) for rep in reports if rep.decode]


# --------------------------------------------------------------------------- KV cache


def prefilled(eng: Engine, conv, params) -> Request:
    """Submit one conversation and step until its prompt is in the cache (it is running)."""
    (r,) = eng.submit(batch_of(eng, conv), params)
    while r not in eng.scheduler.running:
        eng.step()
    return r


def batch_of(eng: Engine, conv):
    variant = next(v for v in ("tiny", "small", "base", "dsv2x") if load(v)[0] is eng.model)
    return batch(variant, [conv])


def stored(eng: Engine, r: Request, layer: int) -> tuple[torch.Tensor, ...]:
    """r's prompt tokens in layer ``layer``'s pools, read through its block table."""
    bs = eng.cache.block_size
    slots = torch.tensor([r.blocks[p // bs] * bs + p % bs for p in range(r.prompt_len)])
    return tuple(t.view(-1, *t.shape[2:])[slots] for t in eng.cache.layers[layer])


@pytest.mark.parametrize("variant", ["small", "base", "dsv2x"])
def test_mla_cache_holds_latent_plus_rope_key(variant):
    eng = engine(variant, max_batch_size=3, kv_cache_bytes=1 << 22)
    cfg = eng.cfg
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = eng.cache
    assert cache.values_per_token_per_layer == width
    assert len(cache.layers) == cfg.num_hidden_layers
    nb, bs = cache.num_blocks, cache.block_size
    for layer in cache.layers:
        assert len(layer) == 1, "MLA keeps ONE tensor per layer (latent | k_pe), no k / v"
        (t,) = layer
        assert t.shape == (nb, bs, width) and t.dtype == torch.float32
    assert cache.nbytes() == cfg.num_hidden_layers * nb * bs * width * 4 <= 1 << 22
    r = prefilled(eng, TEXT, greedy(5))  # and its first token decoded
    L = r.prompt_len
    assert r.length == L + 1 and len(r.blocks) == -(-(L + 1) // bs) and eng.pool.used == len(r.blocks)

    # Layer 0's cache holds, per prompt token, the RMS-normalised latent of kv_a_proj
    # followed by the RoPE-rotated shared k_pe.
    model, _ = load(variant)
    lm = model.language
    ids = batch(variant, [TEXT]).input_ids  # [1, L], no padding
    attn = lm.model.layers[0].self_attn
    kv = attn.kv_a_proj_with_mqa(lm.model.layers[0].input_layernorm(lm.embed(ids)))  # [1, L, r + dr]
    latent = attn.kv_a_layernorm(kv[..., : cfg.kv_lora_rank])  # [1, L, r]
    cos, sin = lm.rotary(torch.arange(L)[None])
    k_pe = apply_rope(kv[:, None, :, cfg.kv_lora_rank:], cos, sin, interleaved=True)[:, 0]  # [1, L, dr]
    (got,) = stored(eng, r, 0)
    torch.testing.assert_close(got, torch.cat([latent, k_pe], -1)[0], atol=1e-5, rtol=1e-5)
    run_to_end(eng)
    assert eng.pool.used == 0
    eng.pool.check()


def test_mha_cache_holds_k_and_v():
    eng = engine("tiny", max_batch_size=2, kv_cache_bytes=1 << 22)
    cfg, cache = eng.cfg, eng.cache
    assert cache.values_per_token_per_layer == 2 * cfg.kv_heads * cfg.head_dim
    for k, v in cache.layers:
        assert k.shape == v.shape == (cache.num_blocks, cache.block_size, cfg.kv_heads, cfg.head_dim)
    assert cache.nbytes() == cfg.num_hidden_layers * cache.num_blocks * cache.block_size * 2 * cfg.kv_heads \
        * cfg.head_dim * 4
    r = prefilled(eng, TEXT, greedy(5))
    k, v = stored(eng, r, 0)
    lm = eng.model.language
    x = lm.model.layers[0].input_layernorm(lm.embed(batch("tiny", [TEXT]).input_ids))  # [1, L, D]
    attn = lm.model.layers[0].self_attn
    want_v = attn.v_proj(x).view(r.prompt_len, cfg.kv_heads, cfg.head_dim)
    torch.testing.assert_close(v, want_v, atol=1e-5, rtol=1e-5)
    assert k.shape == want_v.shape


def test_cache_dtype_is_honoured():
    eng = engine("small", max_batch_size=1, cache_dtype=torch.bfloat16, kv_cache_bytes=1 << 20)
    out = eng.generate(batch("small", [TEXT]), greedy(3))[0]
    assert len(out.ids) == 3
    assert all(t.dtype == torch.bfloat16 for layer in eng.cache.layers for t in layer)
    width = eng.cfg.kv_lora_rank + eng.cfg.qk_rope_head_dim
    assert eng.cache.nbytes() == eng.cfg.num_hidden_layers * eng.cache.num_blocks * eng.cache.block_size * width * 2


def test_kv_budget_is_the_pool():
    """The pool is what the budget allows, whatever the requests; a request holds
    ceil(tokens / block size) blocks and gives them back at the end."""
    eng = engine("small", max_batch_size=16, kv_cache_bytes=300_000, block_size=8)
    per_block = 8 * KVCache.bytes_per_token(eng.cfg, eng.cache_dtype)
    assert eng.cache.num_blocks == 300_000 // per_block and eng.cache.nbytes() <= 300_000
    r = prefilled(eng, TEXT, greedy(3))
    assert len(r.blocks) == -(-r.length // 8) == eng.pool.used
    run_to_end(eng)
    assert eng.pool.used == 0 and eng.kv_stats()["kv_cache_bytes_peak"] >= len(r.blocks) * per_block


def test_budget_too_small_for_two_blocks_is_refused():
    with pytest.raises(GenerationError, match="at least 2 are needed"):
        engine("small", kv_cache_bytes=100)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_generation_crosses_blocks(variant):
    """With 4-token blocks a 17-token prompt + 20 tokens takes a new block every 4 tokens;
    the ids must equal those of a run with 16-token blocks."""
    want = alone(variant, TEXT)
    eng = engine(variant, max_batch_size=1, kv_cache_bytes=1 << 22, block_size=4)
    held = []
    for r, _, _ in iter_steps(eng, batch(variant, [TEXT]), greedy(20)):
        held.append(len(r.blocks))
    assert held[0] == -(-17 // 4) and max(held) == -(-(17 + 19) // 4)
    assert r.output_ids == want


def iter_steps(eng: Engine, b, params):
    reqs = eng.submit(b, params)
    while not all(r.finished for r in reqs):
        yield from eng.step()


def test_cached_decode_equals_full_forward():
    """Teacher forcing: a no-cache forward over prompt + output reproduces every decode
    step's logits (MHA and MLA; the MLA decode uses the absorbed path on the cache)."""
    for variant in ("tiny", "small", "dsv2x"):
        model, proc = load(variant)
        b = proc([ONE_IMAGE])
        out = Engine(model, proc.tokenizer).generate(b, greedy(8), output_scores=True)[0]
        full = torch.cat([b.input_ids[0], torch.tensor(out.ids[:-1])])[None]
        mask = torch.ones_like(full, dtype=torch.bool)
        seq = torch.zeros_like(mask)
        seq[0, : b.images_seq_mask.shape[1]] = b.images_seq_mask[0]
        ref = model(full, mask, seq, b.pixel_values, b.images_spatial_crop).logits[0]  # [T, V]
        L = b.input_ids.shape[1]
        torch.testing.assert_close(out.scores, ref[L - 1:], atol=2e-4, rtol=1e-4)
        assert out.ids == ref[L - 1:].argmax(-1).tolist()


# --------------------------------------------------------------------------- batches and prefill


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_mixed_batch_rows_equal_each_alone(variant):
    outs = mixed(variant)
    for c, out in zip(MIXED, outs):
        assert out.ids == alone(variant, c)
        assert out.finish_reason == "length" and out.completion_tokens == 20
    assert [o.prompt_tokens for o in outs] == batch(variant, MIXED).seq_lens


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "dsv2x"])
@pytest.mark.parametrize("chunk_size", [None, 128])
def test_golden_batch_equals_reference(variant, chunk_size):
    """c08: an image conversation and a text one left-padded by 615 tokens; the reference's
    own chunked prefill gets the padded row wrong, ours must not (REFERENCE quirk)."""
    convs, want = golden(variant, "c08_batch_mixed")
    outs = engine(variant).generate(batch(variant, convs), greedy(20), chunk_size=chunk_size)
    assert [o.ids for o in outs] == want


def test_golden_two_images_equals_reference():
    convs, want = golden("small", "c09_batch_two_images")
    outs = engine("small").generate(batch("small", convs), greedy(20), chunk_size=512)
    assert [o.ids for o in outs] == want


@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("chunk_size", [7, 128])
def test_chunked_prefill_equals_whole(variant, chunk_size):
    chunked = engine(variant).generate(batch(variant, MIXED), greedy(20), chunk_size=chunk_size)
    assert [o.ids for o in chunked] == [o.ids for o in mixed(variant)]


def test_chunk_size_is_checked():
    with pytest.raises(GenerationError, match="chunk_size"):
        engine("tiny").generate(batch("tiny", [TEXT]), greedy(2), chunk_size=0)


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible():
    b = batch("small", [TEXT])

    def sample(seed):
        p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=seed)
        return engine("small").generate(b, p)[0]

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first.ids == again.ids and first.text == again.text
    assert first.ids != other.ids and first.text != other.text
    assert first.ids != alone("small", TEXT)  # not secretly greedy


def test_seeded_row_does_not_depend_on_its_batch():
    p = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=s) for s in (7, 8, 9)]
    together = engine("small").generate(batch("small", SHORT[:3]), p)  # 10, 17, 15 tokens
    for c, sp, out in zip(SHORT, p, together):
        assert engine("small").generate(batch("small", [c]), sp)[0].ids == out.ids


# --------------------------------------------------------------------------- streaming text


def collect_stream(eng: Engine, b, params):
    deltas: dict[int, list[str]] = {}
    outs: dict[int, GenerationOutput] = {}
    for ev in eng.stream(b, params):
        deltas.setdefault(ev.index, []).append(ev.delta)
        if ev.finish_reason is not None:
            assert ev.index not in outs, "one final event per request"
            outs[ev.index] = ev.output
    return deltas, outs


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_stream_equals_generate(variant):
    plain = mixed(variant)
    deltas, outs = collect_stream(engine(variant), batch(variant, MIXED), greedy(20))
    assert sorted(outs) == [0, 1, 2]
    for i, p in enumerate(plain):
        assert "".join(deltas[i]) == outs[i].text == p.text
        assert outs[i].ids == p.ids and outs[i].finish_reason == p.finish_reason


def test_multibyte_characters_split_across_tokens_stream_whole(script):
    _, proc = load("small")
    tok = proc.tokenizer
    ids = tok.encode("café 中文 🙂!") + tok.encode(" é中🙂")
    # The premise: some characters' bytes are spread over several tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    script(ids)
    out, deltas = scripted_run("small", ids)
    assert out.ids == ids and out.finish_reason == "length"
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == out.text == tok.decode(ids) == "café 中文 🙂! é中🙂"


# --------------------------------------------------------------------------- stop conditions


def test_eos_stops_and_is_not_in_the_text(script):
    script([*HELLO[:3], EOS, HELLO[3]])
    out, deltas = scripted_run("small", HELLO, max_new_tokens=10)
    assert out.finish_reason == "stop"
    assert out.ids == [*HELLO[:3], EOS] and out.completion_tokens == 4
    assert out.text == "".join(deltas) == "hello"
    assert "end" not in out.text and "\uff5c" not in out.text


def test_stop_token_ids(script):
    script(HELLO)
    out, deltas = scripted_run("small", HELLO, max_new_tokens=10, stop_token_ids=[HELLO[4]])
    assert out.finish_reason == "stop" and out.ids == HELLO[:5]
    assert out.text == "".join(deltas) == "hello world"


@pytest.mark.parametrize("stop, text", [
    (" The", "hello world."),   # one whole token
    ("o wor", "hell"),          # spans 'o' + ' world'
    ("ld. T", "hello wor"),     # spans three tokens
    (("end", "world"), "hello "),  # the first stop string in the text wins
    ("he", ""),                 # stops on the first token
])
def test_stop_strings(script, stop, text):
    script(HELLO)
    out, deltas = scripted_run("small", HELLO, max_new_tokens=10, stop=stop)
    assert out.finish_reason == "stop"
    assert out.text == "".join(deltas) == text
    for s in (stop,) if isinstance(stop, str) else stop:
        assert not any(s in d for d in deltas)


def test_stop_string_ending_in_whitespace_stops_at_once(script):
    """The detokeniser holds trailing whitespace back; the stop must still be seen on the
    token that completes it, not one token (one forward) later."""
    tok = load("small")[1].tokenizer
    ids = tok.encode("hello world.\n\nThe end")  # ... '.' '\n' '\n' 'The' ' end'
    script(ids)
    out, deltas = scripted_run("small", ids, stop="\n\n")
    assert out.finish_reason == "stop" and out.ids == ids[: ids.index(201) + 2]
    assert out.text == "".join(deltas) == "hello world."


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop(script):
    tok = load("small")[1].tokenizer
    ids = tok.encode("hello world. The end\n")
    script(ids)
    out, deltas = scripted_run("small", ids, stop="end\n")  # max_new_tokens = len(ids)
    assert out.finish_reason == "stop" and out.ids == ids
    assert out.text == "".join(deltas) == "hello world. The "


def test_stop_string_never_completed_is_released(script):
    script(HELLO)
    out, deltas = scripted_run("small", HELLO, stop="end!")
    assert out.finish_reason == "length"
    assert out.text == "".join(deltas) == "hello world. The end"


def test_max_new_tokens_is_length():
    out = engine("small").generate(batch("small", [TEXT]), greedy(7))[0]
    assert out.finish_reason == "length" and len(out.ids) == out.completion_tokens == 7
    assert out.ids == alone("small", TEXT)[:7]


def test_ids_beyond_the_tokenizer_decode_to_nothing(script):
    _, proc = load("small")
    vocab = load("small")[0].cfg.language.vocab_size
    assert len(proc.tokenizer) < vocab
    ids = [HELLO[0], len(proc.tokenizer), HELLO[1], vocab - 1, HELLO[2]]
    script(ids)
    out, deltas = scripted_run("small", ids)
    assert out.ids == ids and out.finish_reason == "length"
    assert out.text == "".join(deltas) == "hello"


def test_finished_rows_cost_nothing():
    params = [greedy(2), greedy(5), greedy(8)]
    eng = engine("small")
    reports = observed(eng)
    outs = eng.generate(batch("small", SHORT[:3]), params)
    assert [len(o.ids) for o in outs] == [2, 5, 8]
    # step k samples token k of every live row, then decodes the rows that go on
    assert decode_sizes(reports) == [3, 2, 2, 2, 1, 1, 1]
    assert eng.free_slots == list(range(eng.max_batch_size)) and not eng.active
    for c, n, out in zip(SHORT, (2, 5, 8), outs):
        assert out.ids == alone("small", c)[:n]


def test_prompt_longer_than_the_window_is_refused():
    b = batch("small", [SHORT[0], TEXT])  # 10 and 17 tokens
    eng = engine("small", context_window=17)
    with pytest.raises(GenerationError, match=r"conversation 1 has 17 prompt tokens.*context window is 17") as e:
        eng.generate(b, greedy(4))
    assert isinstance(e.value, ValueError)
    assert not eng.waiting and not eng.active  # nothing half-queued
    assert engine("small").context_window == load("small")[0].cfg.language.max_position_embeddings


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_generation_stops_at_the_window(variant):
    b = batch(variant, [SHORT[0], TEXT])  # 10 and 17 tokens
    outs = engine(variant, context_window=20).generate(b, greedy(50))
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert [o.prompt_tokens + o.completion_tokens for o in outs] == [20, 20]
    assert outs[1].ids == alone(variant, TEXT)[:3]
    # a prompt one token short of the window still gets its one token
    last = engine(variant, context_window=18).generate(batch(variant, [TEXT]), greedy(50))[0]
    assert last.completion_tokens == 1 and last.finish_reason == "length"


# --------------------------------------------------------------------------- continuous batching


def test_submit_while_generating():
    eng = engine("small", max_batch_size=4)
    first = eng.submit(batch("small", [TEXT, SHORT[1]]), greedy(20))
    for _ in range(3):
        eng.step()
    assert [len(r.output_ids) for r in first] == [3, 3] and not any(r.finished for r in first)
    second = eng.submit(batch("small", [ONE_IMAGE, SHORT[2]]), greedy(20))
    eng.step()  # admits (prefills) the second batch next to the first one's rows
    assert len(eng.active) == 4 and {r.slot for r in eng.active} == {0, 1, 2, 3}
    run_to_end(eng)
    for r, c in zip(first + second, (TEXT, SHORT[1], ONE_IMAGE, SHORT[2])):
        assert r.finish_reason == "length" and r.output_ids == alone("small", c)
    assert eng.free_slots == [0, 1, 2, 3]


def test_cancel_frees_slots():
    eng = engine("small", max_batch_size=2)
    reqs = eng.submit(batch("small", SHORT[:3]), greedy(20))
    eng.step()
    eng.step()
    assert len(eng.active) == 2 and len(eng.waiting) == 1 and eng.free_slots == []
    slot = reqs[0].slot
    eng.cancel([reqs[0]])
    assert eng.free_slots == [slot] and reqs[0] not in eng.active
    eng.step()  # the waiting request takes the freed slot
    assert reqs[2].slot == slot and len(eng.active) == 2
    run_to_end(eng)
    assert reqs[1].output_ids == alone("small", SHORT[1])
    assert reqs[2].output_ids == alone("small", SHORT[2])
    assert reqs[0].finish_reason == "cancelled" and len(reqs[0].output_ids) == 2
    # cancelling everything, queued requests included, leaves a clean engine
    more = eng.submit(batch("small", SHORT), greedy(20))
    eng.step()
    eng.cancel(more)
    assert eng.free_slots == [0, 1] and not eng.active and not eng.waiting
    assert eng.generate(batch("small", [TEXT]), greedy(20))[0].ids == alone("small", TEXT)


def test_abandoned_stream_frees_its_slots():
    eng = engine("small", max_batch_size=3)
    it = eng.stream(batch("small", SHORT[:2]), greedy(20))
    next(it)
    assert len(eng.active) == 2
    it.close()
    assert eng.free_slots == [0, 1, 2] and not eng.active


def test_more_requests_than_slots_queue():
    eng = engine("small", max_batch_size=2)
    reports = observed(eng)
    params = [greedy(n) for n in (3, 9, 4, 6, 5)]
    outs = eng.generate(batch("small", SHORT), params)
    assert max(decode_sizes(reports)) == 2
    for c, p, out in zip(SHORT, params, outs):
        assert out.ids == alone("small", c)[: p.max_new_tokens]
        assert out.finish_reason == "length"
    assert eng.free_slots == [0, 1] and not eng.waiting


# --------------------------------------------------------------------------- seams


def test_step_reports_say_what_ran_and_how_long():
    eng = engine("small", prefix_caching=False)  # every prompt token computed: positions from 0
    reports = observed(eng)
    reqs = eng.submit(batch("small", [TEXT, ONE_IMAGE]), greedy(4), chunk_size=256)
    tiles = [r.tiles_total for r in reqs]
    assert tiles[0] == 0 < tiles[1]
    run_to_end(eng)
    assert [rep.step for rep in reports] == list(range(eng.steps)) and eng.steps == 4
    assert reports[0].admitted == [r.rid for r in reqs] and reports[0].running == []
    assert [rep.vision_tiles for rep in reports] == [tiles[1], 0, 0, 0]
    for r, n_tiles in zip(reqs, tiles):
        chunks = [(start, n) for rep in reports for f in rep.prefill for rid, start, n in f if rid == r.rid]
        assert chunks[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(chunks, chunks[1:]))
        assert sum(n for _, n in chunks) == r.prompt_len and max(n for _, n in chunks) <= 256
        assert sum(k for rep in reports for rid, k in rep.vision if rid == r.rid) == n_tiles
        assert [rep.step for rep in reports if r.rid in rep.sampled] == [0, 1, 2, 3]
        # tokens 1..3 go through a decode forward at the positions after the prompt; the
        # 4th ends the request where it is sampled
        assert [pos for rep in reports for rid, pos in rep.decode if rid == r.rid] == \
            [r.prompt_len, r.prompt_len + 1, r.prompt_len + 2]
    assert sum(rep.prefill_tokens for rep in reports) == sum(r.prompt_len for r in reqs)
    assert [rep.finished for rep in reports] == [{}, {}, {}, {r.rid: "length" for r in reqs}]
    assert all(not rep.preempted for rep in reports)
    for rep in reports:
        t = rep.timings
        assert set(t) == {"admit", "vision", "prefill", "sample", "decode", "total"}
        assert min(t.values()) >= 0 and sum(v for k, v in t.items() if k != "total") <= t["total"]
        for stage in ("vision", "prefill", "decode"):
            assert (t[stage] > 0) == bool(getattr(rep, stage)), (rep.step, stage)


def test_a_failing_observer_is_logged_and_changes_nothing(caplog):
    eng = engine("small")

    def broken(rep):
        raise RuntimeError("observer bug")

    eng.add_step_observer(broken)
    reports = observed(eng)
    with caplog.at_level(logging.ERROR, logger="dsvl2.engine"):
        out = eng.generate(batch("small", [TEXT]), greedy(5))[0]
    assert out.ids == alone("small", TEXT)[:5] and out.finish_reason == "length"
    assert "step observer" in caplog.text and "observer bug" in caplog.text
    assert len(reports) == eng.steps  # the observer after the broken one saw every step
    eng.remove_step_observer(broken)
    eng.remove_step_observer(reports.append)
    eng.remove_step_observer(reports.append)  # not an observer any more: nothing happens
    eng.generate(batch("small", [TEXT]), greedy(2))
    assert len(reports) == 5 < eng.steps
    with pytest.raises(TypeError, match="callable"):
        eng.add_step_observer("not a function")


def test_the_fault_hook_slows_or_fails_a_decode_step():
    eng = engine("small")
    reports = observed(eng)
    stages = []

    def slow(stage, reqs):
        stages.append((stage, [r.rid for r in reqs]))
        if stage == "decode":
            time.sleep(0.05)

    eng.set_fault_hook(slow)
    out = eng.generate(batch("small", [TEXT]), greedy(3))[0]
    assert out.ids == alone("small", TEXT)[:3]  # slower, not different
    rid = reports[0].sampled[0]
    assert stages == [("prefill", [rid]), ("decode", [rid]), ("decode", [rid])]
    decodes = [rep.timings["decode"] for rep in reports if rep.decode]
    assert len(decodes) == 2 and min(decodes) >= 0.05
    assert out.timings["max_inter_token_s"] >= 0.05

    def fail(stage, reqs):
        if stage == "decode":
            raise RuntimeError("simulated decode failure")

    eng.set_fault_hook(fail)
    out = eng.generate(batch("small", [TEXT]), greedy(3))[0]
    assert out.finish_reason == "error" and "simulated decode failure" in out.error
    assert out.ids == alone("small", TEXT)[:1]  # its first token came from the prefill
    assert reports[-1].finished == {reports[-1].decode[0][0]: "error"}
    assert not eng.active and eng.free_slots == list(range(eng.max_batch_size))


def test_an_engines_own_sampler_comes_before_the_process_wide_one():
    def always(tok):
        return lambda logits, params, generators, seen=None: torch.full((logits.shape[0],), tok)

    own, plain = engine("small", sampler=always(HELLO[0])), engine("small")
    b = batch("small", [TEXT])
    with use_sampler(always(HELLO[1])):
        assert own.generate(b, greedy(3))[0].ids == [HELLO[0]] * 3
        assert plain.generate(b, greedy(3))[0].ids == [HELLO[1]] * 3
    assert plain.generate(b, greedy(3))[0].ids == alone("small", TEXT)[:3]  # the block ended
    third = always(HELLO[2])
    assert plain.set_sampler(third) is None and plain.sampler is third
    assert plain.generate(b, greedy(3))[0].ids == [HELLO[2]] * 3
    assert plain.set_sampler(None) is third
    with pytest.raises(GenerationError, match="sampler must be"):
        engine("small", sampler="greedy")


def test_seams_are_set_through_methods_that_check_what_they_get():
    eng = engine("small")

    def hook(stage, reqs):
        pass

    assert eng.set_fault_hook(hook) is None and eng.fault_hook is hook
    assert eng.set_fault_hook(None) is hook and eng.fault_hook is None
    window = eng.context_window
    assert eng.set_context_window(12) == window and eng.context_window == 12
    out = eng.generate(batch("small", [SHORT[0]]), greedy(20))[0]  # 10 prompt tokens
    assert out.completion_tokens == 2 and out.finish_reason == "length"
    assert eng.set_progress(print) is None and eng.set_progress(None) is print
    for bad in (lambda: eng.set_fault_hook("x"), lambda: eng.set_sampler(3), lambda: eng.set_progress(1.5),
                lambda: eng.set_guide_compiler(object()), lambda: eng.set_context_window(1),
                lambda: eng.set_context_window(True)):
        with pytest.raises(GenerationError):
            bad()
    with pytest.raises(AttributeError):
        eng.fault_hook = hook  # read-only: the setter is the way in


# --------------------------------------------------------------------------- batch invariance

EIGHT = MIXED + SHORT  # text, one image, two images, five short texts: 8 rows of mixed shapes


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_default_dtype_batch_rows_equal_each_alone(variant):
    """In the default dtype (bf16 weights), every row of a mixed 8-row batch gets the same
    greedy ids as its conversation alone: decode products compute in bf16 whatever the
    number of rows (experts included, whose row counts depend on the whole batch's
    routing), and torch's bf16 kernels give a row the same bits whatever the row count."""
    model = load_model(GOLDEN / variant, torch.bfloat16)
    proc = load(variant)[1]
    eng = Engine(model, proc.tokenizer)
    together = eng.generate(proc(list(EIGHT)), greedy(20))
    for c, out in zip(EIGHT, together):
        assert out.ids == eng.generate(proc([c]), greedy(20))[0].ids


def test_bf16_products_are_row_invariant():
    """The fact the rule above stands on: a bf16 product's row does not depend on how many
    rows are computed with it (decode), for linear and batched matmul shapes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    x = torch.randn(16, 64, generator=g).bfloat16()
    one = torch.nn.functional.linear(x[:1], w)
    for m in (2, 3, 4, 5, 8, 16):
        assert torch.equal(torch.nn.functional.linear(x[:m], w)[:1], one)
    wb = torch.randn(4, 16, 32, generator=g).bfloat16()  # [H, dn, r] as in MLA absorbed decode
    q = torch.randn(16, 4, 1, 16, generator=g).bfloat16()
    ref = torch.matmul(q[:1], wb)
    for m in (2, 5, 16):
        assert torch.equal(torch.matmul(q[:m], wb)[:1], ref)


def test_a_steps_tiles_run_in_balanced_batches_with_the_same_answer(monkeypatch):
    """The runner encodes a step's k tiles in ceil(k / tile_batch) batches whose sizes differ
    by at most one (never a full batch and a sliver), and a request's answer does not depend
    on how its tiles were batched (the tower is row-invariant)."""
    model, proc = load("small")
    sizes: list[int] = []
    real = model.tile_features

    def spy(tiles):
        sizes.append(tiles.shape[0])
        return real(tiles)

    monkeypatch.setattr(model, "tile_features", spy)
    for tile_batch in (3, 5, 6, 100):  # 8 tiles: 3 3 2, 4 4, 4 4, 8
        # no budget: a request's tiles in one step
        eng = engine("small", prefix_caching=False, step_tokens=None, tile_batch=tile_batch)
        sizes.clear()
        reports = observed(eng)
        (out,) = eng.generate(batch("small", [TWO_IMAGES]), greedy(12))
        (k,) = [k for rep in reports for _, k in rep.vision]
        n = -(-k // tile_batch)
        assert k >= 5 and len(sizes) == n and sum(sizes) == k and max(sizes) - min(sizes) <= 1
        assert out.ids == alone("small", TWO_IMAGES, 12)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(GenerationError, match="tile_batch must be a positive integer"):
            engine("small", tile_batch=bad)
