"""Byte sizes as people write them: ``parse_size("1.5GiB")``, ``format_size(1 << 30)``.

A leaf module (standard library only), shared by the command lines (``--kv-cache-bytes``)
and the Ray Serve options.

* Accepted: a whole number of bytes (``1048576``, or an ``int``), or a number followed by
  a unit, with or without a space: ``B``; ``KB``, ``MB``, ``GB``, ``TB`` (powers of
  1000); ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024). Units are case-insensitive
  (``512kb``, ``2gib``); the number may have decimals (``1.5MiB`` = 1572864).
* A size with a unit is rounded down to a whole byte (``1.1KiB`` = 1126); a size in
  plain bytes must be whole (``1.5`` or ``1.5B`` is an error). Arithmetic is exact
  (integers), so ``0.1GB`` is 100000000, not 99999999.
* Refused with a ``ValueError`` naming the text and what is allowed: empty text,
  negative sizes, nan / inf, exponents, unknown units, anything else.
* ``format_size`` writes the largest binary unit the size reaches, with at most two
  decimals (``"1.5 MiB"``, ``"2 GiB"``, ``"512 B"``); ``parse_size`` reads it back to
  within the shown precision (exactly when the size is a whole number of that unit, or
  under 1 KiB).
"""

from __future__ import annotations

import argparse
import re
from decimal import Decimal

UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SPELLED = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")
ALLOWED = ("a whole number of bytes (1048576) or a number with a unit (512KB, 1.5 MiB, 2GiB); units: "
           + ", ".join(_SPELLED) + " (case-insensitive; KB = 1000 bytes, KiB = 1024)")

_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def parse_size(text: str | int) -> int:
    """The number of bytes ``text`` means; see the module docstring for the syntax."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"a size must be text or a whole number of bytes, got {text!r}; expected {ALLOWED}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: a size cannot be negative; expected {ALLOWED}")
        return text
    s = text.strip()
    if not s:
        raise ValueError(f"invalid size {text!r}: it is empty; expected {ALLOWED}")
    if s.startswith("-"):
        raise ValueError(f"invalid size {text!r}: a size cannot be negative; expected {ALLOWED}")
    if s.lstrip("+").strip().lower().startswith(("nan", "inf")):
        raise ValueError(f"invalid size {text!r}: a size must be a finite number; expected {ALLOWED}")
    m = _SIZE.fullmatch(s)
    if m is None:
        raise ValueError(f"invalid size {text!r}; expected {ALLOWED}")
    unit = m["unit"]
    if unit and unit.lower() not in UNITS:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r}; expected {ALLOWED}")
    factor = UNITS[unit.lower()] if unit else 1
    whole, _, frac = m["num"].partition(".")
    frac = frac.rstrip("0")
    if factor == 1 and frac:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes; expected {ALLOWED}")
    # exact integer arithmetic, rounded down: no float error, no decimal-context rounding
    return int(whole or 0) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches, at most two decimals: "1.5 MiB"."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"format_size needs a whole number of bytes, got {n!r}")
    if n < 0:
        raise ValueError(f"format_size needs a size >= 0, got {n}")
    k = 0
    while k + 1 < len(_BINARY) and n >= 1 << (10 * (k + 1)):
        k += 1
    value = Decimal(n) / (1 << (10 * k))
    shown = value.quantize(Decimal("0.01"))  # half-even; at most 1023.995.. -> 1024.00, see below
    if shown >= 1024 and k + 1 < len(_BINARY):  # e.g. 1 MiB - 1 byte: "1 MiB", not "1024 KiB"
        k += 1
        shown = (Decimal(n) / (1 << (10 * k))).quantize(Decimal("0.01"))
    text = format(shown.normalize(), "f") if shown != shown.to_integral_value() else str(int(shown))
    return f"{text} {_BINARY[k]}"


# The help of --kv-cache-bytes, the same in `dsvl2 chat`, `serve` and `batch`.
KV_CACHE_HELP = ("memory for the KV cache, e.g. 4GiB or 512MB (KB = 1000 bytes, KiB = 1024); a request whose prompt "
                 "+ max tokens could never fit in it is refused (default: derived from the memory free after the "
                 "weights are loaded)")


def size_argument(text: str) -> int:
    """An argparse ``type``: a size > 0 (``parse_size``'s syntax), else a usage error."""
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: it must be more than 0 bytes")
    return n
