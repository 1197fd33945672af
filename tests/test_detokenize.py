"""StreamDecoder and StopStringMatcher, on the tiny checkpoint's real byte-level BPE tokenizer."""

import random

import pytest
from tokenizers import Tokenizer

from dsvl2.engine.detokenize import StopStringMatcher, StreamDecoder
from dsvl2.errors import GenerationError
from _paths import GOLDEN

TOKENIZER = GOLDEN / "tiny" / "tokenizer.json"
TEXT = "héllo wörld 🙂 中文"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def decode(tok):
    n = tok.get_vocab_size()

    def decode(ids, skip_special_tokens=False):
        # The LM head is wider than the tokenizer: ids beyond it decode to nothing.
        return tok.decode([i for i in ids if 0 <= i < n], skip_special_tokens=skip_special_tokens)

    return decode


def stream(decode_fn, ids, **kw):
    dec = StreamDecoder(decode_fn, **kw)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def test_split_characters_stream_whole(tok, decode):
    ids = tok.encode(TEXT).ids
    assert decode(ids) == TEXT
    # The test must really cover characters split across byte-level tokens.
    assert any("\ufffd" in decode([i]) for i in ids)
    deltas, tail = stream(decode, ids)
    assert "".join(deltas) + tail == TEXT
    assert not any("\ufffd" in d for d in deltas + [tail])
    # Streaming is incremental: text is released before the end, not all at flush.
    assert sum(1 for d in deltas if d) >= 6
    assert deltas[0] == "h"


def test_every_prefix_is_a_prefix_of_the_text(tok, decode):
    text = "Grüße! 🙂🙂 日本語のテキスト, naïve café.\n\n  end"
    ids = tok.encode(text).ids
    dec = StreamDecoder(decode)
    out = ""
    for i in ids:
        out += dec.push(i)
        assert text.startswith(out)
    assert out + dec.flush() == text


def test_ids_beyond_the_tokenizer(tok, decode):
    n = tok.get_vocab_size()
    ids = tok.encode(TEXT).ids
    mixed = [n + 5, *ids[:3], n, 129279, *ids[3:], n + 100]
    deltas, tail = stream(decode, mixed)
    assert "".join(deltas) + tail == TEXT
    deltas, tail = stream(decode, [n, n + 1])
    assert deltas == ["", ""] and tail == ""


def test_special_tokens_and_skip_flag(tok, decode):
    ids = [0, *tok.encode("a 🙂 b").ids, 1]
    deltas, tail = stream(decode, ids)
    assert "".join(deltas) + tail == decode(ids)
    assert decode(ids).startswith("<｜begin▁of▁sentence｜>")
    deltas, tail = stream(decode, ids, skip_special_tokens=True)
    assert "".join(deltas) + tail == decode(ids, skip_special_tokens=True) == "a 🙂 b"


def test_special_token_inside_a_split_character(tok, decode):
    ids = tok.encode("🙂").ids
    assert len(ids) > 1
    seq = [ids[0], 1, *ids[1:]]  # the decoder now yields genuine replacement chars
    deltas, tail = stream(decode, seq)
    assert "".join(deltas) + tail == decode(seq)
    assert "\ufffd" in decode(seq)


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_concatenate_to_the_full_decode(tok, decode, seed):
    rng = random.Random(seed)
    n = tok.get_vocab_size()
    ids = [rng.randrange(n + 50) for _ in range(rng.randrange(1, 120))]
    deltas, tail = stream(decode, ids)
    assert "".join(deltas) + tail == decode(ids)


def test_random_ids_from_multibyte_pieces(tok, decode):
    # Sequences built only from single-byte pieces of UTF-8 characters: most steps end
    # inside a character, and invalid sequences leave genuine replacement chars.
    pieces = sorted({i for i in tok.encode("é ö 🙂 中文 日本語 ß ∑ €").ids if "\ufffd" in decode([i])})
    assert len(pieces) > 5
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice(pieces) for _ in range(rng.randrange(1, 40))]
        deltas, tail = stream(decode, ids)
        assert "".join(deltas) + tail == decode(ids)
        if "\ufffd" not in decode(ids):
            assert not any("\ufffd" in d for d in deltas)


def test_pending_is_the_held_back_text(tok, decode):
    ids = tok.encode("line one \n\n héllo 🙂 中文  end\n").ids
    dec = StreamDecoder(decode)
    held_whitespace = held_partial = False
    for i, t in enumerate(ids, 1):
        dec.push(t)
        pending = dec.pending()
        assert dec.text + pending == decode(ids[:i])  # emitted + held = everything decoded
        held_whitespace |= pending[-1:].isspace()
        held_partial |= pending.endswith("\ufffd")
    assert held_whitespace and held_partial  # both kinds of holding were exercised
    dec.flush()
    assert dec.pending() == "" and dec.text == decode(ids)


def test_window_stays_small(tok, decode):
    calls = []

    def counting(ids):
        calls.append(len(ids))
        return decode(ids)

    ids = tok.encode("word " * 300).ids
    deltas, tail = stream(counting, ids)
    assert "".join(deltas) + tail == "word " * 300
    assert max(calls[:-4]) <= 4  # each step decodes a few ids, never the whole output


# --- decoders that are not plain concatenations ----------------------------------------

PIECES = ["▁Hello", "▁world", ".", "▁", "!", "▁it", "?", "s", "▁ok", "\n", "▁", "▁end", ","]


def metaspace_decode(ids):
    """SentencePiece-style: '▁' is a space, and the text's leading space is dropped."""
    text = "".join(PIECES[i] for i in ids).replace("▁", " ")
    return text[1:] if text.startswith(" ") else text


def cleanup_decode(ids):
    """Metaspace plus spacing cleanups that depend on the next token: transformers'
    clean_up_tokenization_spaces rules for punctuation, and runs of spaces collapsed."""
    text = metaspace_decode(ids)
    while "  " in text:
        text = text.replace("  ", " ")
    for a, b in ((" .", "."), (" !", "!"), (" ,", ","), (" ?", "?")):
        text = text.replace(a, b)
    return text


@pytest.mark.parametrize("decode_fn", [metaspace_decode, cleanup_decode])
def test_decoders_with_spacing_effects(decode_fn):
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.randrange(len(PIECES)) for _ in range(rng.randrange(1, 15))]
        dec = StreamDecoder(decode_fn)
        out = ""
        for i in ids:
            out += dec.push(i)
            assert decode_fn(ids).startswith(out), ids
        out += dec.flush()
        assert out == decode_fn(ids), ids


def test_metaspace_keeps_inner_spaces():
    deltas, tail = stream(metaspace_decode, [0, 1, 2])
    assert deltas == ["Hello", " world", "."] and tail == ""
    # A trailing space waits for the next token, which may remove it.
    deltas, tail = stream(cleanup_decode, [0, 3, 2, 1])
    assert deltas == ["Hello", "", ".", " world"] and tail == ""


def test_window_that_misleads_falls_back_to_full_decodes():
    # A start-of-text rule that depends on the next token ("xy" at the very start loses
    # its "x"): a window starting at "x" applies it wrongly, the full decode does not.
    pieces = ["a", "x", "y", "b"]

    def start_rule(ids):
        text = "".join(pieces[i] for i in ids)
        return text[1:] if text.startswith("xy") else text

    ids = [0, 1, 2, 3, 1, 2]
    dec = StreamDecoder(start_rule)
    deltas = [dec.push(i) for i in ids]
    assert deltas == ["a", "x", "y", "b", "x", "y"] and dec.flush() == ""
    assert dec._pinned  # it did fall back
    for ids in ([0, 1, 2, 1, 2], [0, 1, 1, 2, 2], [3, 1, 2, 2]):
        deltas, tail = stream(start_rule, ids)
        assert "".join(deltas) + tail == start_rule(ids)


def test_decoder_that_rewrites_emitted_text():
    # "bc" -> "BC" rewrites a "b" emitted one step earlier: no streamer can take it back.
    # The rewrite is detected, nothing more is emitted, and flush returns the full decode
    # beyond the common prefix. Sequences without the rewrite stay exact.
    pieces = ["a", "b", "c", "d"]

    def rewriting(ids):
        return "".join(pieces[i] for i in ids).replace("bc", "BC")

    deltas, tail = stream(rewriting, [0, 1, 2, 3, 0])
    assert deltas == ["a", "b", "", "", ""] and tail == "BCda"
    for ids in ([0, 1, 3, 1, 0], [2, 1, 0, 3]):
        deltas, tail = stream(rewriting, ids)
        assert "".join(deltas) + tail == rewriting(ids)


# --- stop strings ------------------------------------------------------------------------


def run_stops(stops, deltas):
    m = StopStringMatcher(stops)
    out, stopped = "", False
    for d in deltas:
        text, stopped = m.feed(d)
        out += text
        if stopped:
            break
    if not stopped:
        out += m.flush()
    return out, stopped


def test_stop_across_deltas():
    assert run_stops(["</s>"], ["hello </", "s> bye"]) == ("hello ", True)
    assert run_stops(["User:"], ["Us", "e", "r", ":", "x"]) == ("", True)


def test_stop_holds_back_only_possible_prefixes():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_no_stop_returns_everything():
    deltas = ["a", "b<", "|x", "yz"]
    assert run_stops(["<|end|>"], deltas) == ("ab<|xyz", False)
    assert run_stops([], deltas) == ("ab<|xyz", False)


def test_earliest_stop_wins():
    assert run_stops(["world", "o"], ["hello world"]) == ("hell", True)
    assert run_stops(["lo w", "hello"], ["xhel", "lo world"]) == ("x", True)


def test_after_stop_nothing_more():
    m = StopStringMatcher(["x"])
    assert m.feed("abxcd") == ("ab", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_empty_stop_string_rejected():
    with pytest.raises(GenerationError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_stop_strings_on_streamed_tokens(tok, decode):
    ids = tok.encode("héllo wörld 🙂 中文").ids
    dec, m = StreamDecoder(decode), StopStringMatcher(["🙂"])
    out = ""
    for i in ids:
        text, stopped = m.feed(dec.push(i))
        out += text
        if stopped:
            break
    assert stopped and out == "héllo wörld "
