"""What CPU this is: its model name and feature flags (x86 ``/proc/cpuinfo``)."""

from __future__ import annotations

from pathlib import Path


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", {}) where there is none (macOS, Windows)."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags
