"""``dsvl2.sizes``: byte sizes as command-line options take them (``--kv-cache-bytes``)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.sizes import UNITS, format_size, parse_size, size_argument


@pytest.mark.parametrize("text, n", [
    ("1048576", 1048576), ("0", 0), (" 42 ", 42), (7, 7), ("7B", 7), ("7 b", 7), ("1.00B", 1),
    ("512 KB", 512_000), ("512kb", 512_000), ("1 kB", 1000), ("3MB", 3_000_000), ("2GB", 2 * 10 ** 9),
    ("1TB", 10 ** 12), ("0.1GB", 100_000_000),
    ("1KiB", 1024), ("64 KiB", 65536), ("1.5MiB", 1572864), ("1.5 mib", 1572864), ("2GiB", 2 << 30),
    ("2 gib", 2 << 30), ("1TiB", 1 << 40), (".5KiB", 512), ("1.KiB", 1024), ("1.1KiB", 1126),  # rounded down
    ("123456789012345678901234567890TiB", 123456789012345678901234567890 << 40),  # exact, however long
])
def test_parse_size_accepts(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("   ", "empty"), ("-1", "negative"), ("-1.5MiB", "negative"), (-3, "negative"),
    ("nan", "finite"), ("NaN MB", "finite"), ("inf", "finite"), ("+Infinity", "finite"),
    ("1XB", "unknown unit 'XB'"), ("5 bytes", "unknown unit 'bytes'"), ("1k", "unknown unit 'k'"),
    ("1.5", "whole number of bytes"), ("0.5B", "whole number of bytes"),
    ("1e3", "invalid size '1e3'"), ("MB", "invalid size 'MB'"), ("1 2", "invalid size"), ("1,000", "invalid size"),
    ("0x10", "invalid size"), (True, "got True"), (1.5, "got 1.5"), (None, "got None"),
])
def test_parse_size_refuses_naming_the_text_and_what_is_allowed(text, words):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    msg = str(info.value)
    assert words in msg, msg
    assert "KiB" in msg and "KB" in msg, msg  # says what is allowed


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (1572864, "1.5 MiB"),
    (2 << 30, "2 GiB"), (5 << 40, "5 TiB"), (5000 << 40, "5000 TiB"), (123456789, "117.74 MiB"),
    ((1 << 20) - 1, "1 MiB"),  # not "1024 KiB"
])
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("bad", [-1, 1.5, "12", True, None])
def test_format_size_refuses_what_is_not_a_byte_count(bad):
    with pytest.raises(ValueError):
        format_size(bad)


def test_size_argument_is_an_argparse_type_with_the_reason():
    ap = argparse.ArgumentParser(prog="x", exit_on_error=False)
    ap.add_argument("--kv-cache-bytes", type=size_argument)
    assert ap.parse_args(["--kv-cache-bytes", "64KiB"]).kv_cache_bytes == 65536
    for bad, words in (("12XB", "unknown unit 'XB'"), ("0", "more than 0"), ("-5MB", "negative")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            size_argument(bad)


# ------------------------------------------------------------------ properties

SPELLINGS = st.sampled_from(sorted(UNITS)).flatmap(
    lambda u: st.sampled_from(sorted({u, u.upper(), u.capitalize(), u[:-1].upper() + u[-1:], u.title()})))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 60))
def test_round_trip_plain_bytes(n):
    assert parse_size(str(n)) == n == parse_size(n) == parse_size(f"{n} B") == parse_size(f"{n}b")


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10 ** 6), SPELLINGS, st.sampled_from(["", " ", "  "]))
def test_whole_numbers_of_any_unit_any_case_any_space(k, unit, space):
    assert parse_size(f"{k}{space}{unit}") == k * UNITS[unit.lower()]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=1023), st.integers(min_value=0, max_value=4))
def test_format_then_parse_is_exact_on_whole_units(k, e):
    n = k << (10 * e)
    assert parse_size(format_size(n)) == n


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_then_parse_is_within_the_shown_precision(n):
    """Two decimals of the unit shown: off by at most half a hundredth of it (+1 byte of
    rounding down), i.e. under 0.5 % of the size."""
    text = format_size(n)
    number, unit = text.split(" ")
    assert unit in ("B", "KiB", "MiB", "GiB", "TiB") and len(number.partition(".")[2]) <= 2
    back = parse_size(text)
    assert abs(back - n) <= UNITS[unit.lower()] // 200 + 1
    assert abs(back - n) <= n * 0.005 + 1
    assert parse_size(format_size(back)) == back or format_size(back) == text  # stable once formatted


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=0, max_value=10 ** 6, places=3, allow_nan=False, allow_infinity=False),
       st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_decimals_are_rounded_down_exactly(d, unit):
    """The exact product, rounded down (never the float error of 0.1 * 10**9 and so on)."""
    from decimal import Decimal, ROUND_FLOOR

    text = f"{d:f}{unit}"
    assert parse_size(text) == int((Decimal(text[:-len(unit)]) * UNITS[unit.lower()]).to_integral_value(ROUND_FLOOR))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_any_text_is_a_size_or_a_value_error(text):
    try:
        n = parse_size(text)
    except ValueError as e:
        assert repr(text) in str(e) or "empty" in str(e)
    else:
        assert isinstance(n, int) and n >= 0
