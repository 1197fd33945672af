"""model/pages.py: big weights in 2 MiB pages where the system gives them, plain memory otherwise.

The kernel's own count (``AnonHugePages`` of /proc/self/smaps_rollup) is the independent
fact: in a fresh interpreter, writing a 12 MiB tensor from ``pages.empty`` raises it where
transparent huge pages are ``madvise`` or ``always``, and ``DSVL2_HUGEPAGES=0`` (or a
system set to ``never``) leaves ``torch.empty``'s memory. The loader reads a large stored
tensor into such memory byte for byte, and quantised storage lives there too.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import torch

from dsvl2.checkpoint import load
from dsvl2.model import pages, quant

SCRIPT = r"""
import json, torch
from dsvl2.model import pages
before = pages.huge_bytes()
t = pages.empty((12 << 20,), torch.uint8)
t.fill_(7)
small = pages.empty((1000, 3), torch.float32)
print(json.dumps({"usable": pages.usable(), "setting": pages.thp_setting(), "delta": pages.huge_bytes() - before,
                  "aligned": t.data_ptr() % pages.HUGE == 0, "sum": int(t.sum(dtype=torch.int64)),
                  "small_shape": list(small.shape), "small_dtype": str(small.dtype)}))
"""


def run(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("DSVL2_HUGEPAGES", None)
    if env_value is not None:
        env["DSVL2_HUGEPAGES"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_big_tensor_lands_in_huge_pages_where_the_system_allows():
    r = run(None)
    assert r["sum"] == 7 * (12 << 20)
    assert r["small_shape"] == [1000, 3] and r["small_dtype"] == "torch.float32"
    if r["setting"] in ("madvise", "always"):
        assert r["usable"] and r["aligned"]
        assert r["delta"] >= pages.HUGE, r  # the kernel counts huge pages this write faulted in
    else:  # "never" or no such setting: plain memory
        assert not r["usable"]


def test_switch_off_gives_plain_memory():
    r = run("0")
    assert not r["usable"] and r["sum"] == 7 * (12 << 20)
    if r["setting"] == "madvise":  # no one else asks for huge pages in that interpreter
        assert r["delta"] == 0, r


def test_thp_setting_parses_the_bracketed_mode(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(pages, "THP_SETTING", f)
    assert pages.thp_setting() == "madvise"
    f.write_text("[never]\n")
    assert pages.thp_setting() == "never"
    monkeypatch.setattr(pages, "THP_SETTING", tmp_path / "missing")
    assert pages.thp_setting() is None


def test_loader_reads_a_large_tensor_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1280, 1100, generator=g).to(torch.bfloat16)  # 2.8 MB: below MIN_BYTES
    big = torch.randn(2304, 1024, generator=g)  # 9.4 MB float32: in huge pages where usable
    tensors = {"a.weight": w, "b.weight": big}
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    stored = {t.key: t for t in load.read_header(f)}
    with open(f, "rb") as fh:
        got = {k: load.read_tensor(stored[k], fh) for k in tensors}
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    if pages.usable():
        assert got["b.weight"].data_ptr() % pages.HUGE == 0


def test_quantised_storage_is_placed_the_same_way():
    qw = quant.QuantWeight.empty(8, (4, 1024, 2048))  # 8 MiB of int8
    assert qw.data.shape == (4, 1024, 2048) and qw.data.dtype == torch.int8
    if pages.usable():
        assert qw.data.data_ptr() % pages.HUGE == 0
    w = torch.randn(2048, 2048)
    a, b = quant.QuantWeight.quantize(w, 8), quant.quantize_int8(w)
    assert torch.equal(a.data, b[0]) and torch.equal(a.scale, b[1])
