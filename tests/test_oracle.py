"""The end-to-end truth: the oracle check over every golden variant x case.

Also shows that the oracle discovers what it checks (a renamed copy of the golden tree
with other variant / case / image names passes) and that it can fail (a perturbed
reference tensor is reported and makes the exit status non-zero).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsvl2.commands import oracle
from dsvl2.commands.oracle import checks
from dsvl2.errors import DSVL2Error
from _paths import GOLDEN, IMAGES

VARIANTS = [v.name for v in oracle.discover(GOLDEN)]
# The golden models are tiny: one intra-op thread is fastest (see conftest.one_thread).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # the whole oracle: see make test
FAMILIES = ("processor.", "vision.", "projector.", "embeds.", "routing.", "logits.", "hidden.", "gen.")


def test_discovers_every_variant_and_case():
    found = oracle.discover(GOLDEN)
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    assert sorted(v.name for v in found) == sorted(manifest["variants"])
    for v in found:
        on_disk = sorted(p.stem for p in (GOLDEN / v.name / "outputs").glob("*.safetensors"))
        assert v.cases == on_disk and len(v.cases) >= 1


def test_select_narrows_to_the_names_asked_for_and_refuses_unknown_ones():
    """One selection serves the checks (``run``) and the quantised mode (``run_drift``)."""
    found = oracle.discover(GOLDEN)
    assert [(v.name, cases) for v, cases in oracle.select(GOLDEN)] == [(v.name, v.cases) for v in found]
    first = found[0]
    case = first.cases[-1]
    assert [(v.name, cases) for v, cases in oracle.select(GOLDEN, [first.name], [case])] == [(first.name, [case])]
    everywhere = [(v.name, [case]) for v in found if case in v.cases]
    assert [(v.name, cases) for v, cases in oracle.select(GOLDEN, cases=[case])] == everywhere
    with pytest.raises(DSVL2Error, match=r"unknown variant\(s\) \['nope'\]; available: "):
        oracle.select(GOLDEN, ["nope"])
    with pytest.raises(DSVL2Error, match=r"unknown case\(s\) \['nope'\]; available: .*" + case):
        oracle.select(GOLDEN, [first.name], ["nope", case])
    with pytest.raises(DSVL2Error, match="unknown case"):  # the drift mode refuses it the same way
        oracle.run_drift(GOLDEN, [IMAGES], ["int8"], cases=["nope"], emit=lambda line: None)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_oracle_variant(variant):
    results = oracle.run(GOLDEN, [IMAGES], variants=[variant], emit=lambda line: None)
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    cases = {r.case for r in results}
    assert cases == set(next(v.cases for v in oracle.discover(GOLDEN) if v.name == variant))
    for case in cases:
        names = {r.name for r in results if r.case == case}
        for family in FAMILIES:
            if family in ("vision.", "projector.") and not any(n.startswith(family) for n in names):
                assert "vision.tiles" in names  # text-only case: the tower is skipped
                continue
            assert any(n.startswith(family) for n in names), (case, family, sorted(names))


def _copy_renamed(tmp: Path) -> tuple[Path, Path]:
    """A golden tree with other variant, processor-set, case and image names."""
    src_case = "c09_batch_two_images"
    dst, imgs = tmp / "other_golden", tmp / "other_images"
    imgs.mkdir()
    spec = json.loads((GOLDEN / "processor" / "official" / src_case / "case.json").read_text())
    for conv in spec["conversations"]:
        for m in conv:
            renamed = []
            for name in m.get("images", []):
                new = "renamed_" + name
                shutil.copy(IMAGES / name, imgs / new)
                renamed.append(new)
            if renamed:
                m["images"] = renamed
    pdir = dst / "processor" / "myset" / "zz_two_rows"
    pdir.mkdir(parents=True)
    (pdir / "case.json").write_text(json.dumps(spec))
    for f in ("processor.safetensors", "pixels_u8.npz"):
        shutil.copy(GOLDEN / "processor" / "official" / src_case / f, pdir / f)
    vdir = dst / "mla_variant"
    shutil.copytree(GOLDEN / "dsv2x", vdir, ignore=shutil.ignore_patterns("outputs"))
    (vdir / "outputs").mkdir()
    for ext in ("safetensors", "json"):
        shutil.copy(GOLDEN / "dsv2x" / "outputs" / f"{src_case}.{ext}", vdir / "outputs" / f"zz_two_rows.{ext}")
    (dst / "manifest.json").write_text(json.dumps({"variants": {"mla_variant": {"processor_id": "myset"}}}))
    return dst, imgs


def test_unseen_tree_names(tmp_path):
    golden, images = _copy_renamed(tmp_path)
    lines: list[str] = []
    results = oracle.run(golden, [images], emit=lines.append)
    assert results and all(r.ok for r in results), "\n".join(lines)
    assert {r.variant for r in results} == {"mla_variant"} and {r.case for r in results} == {"zz_two_rows"}


def test_oracle_fails_on_wrong_reference(tmp_path, capsys):
    golden, images = _copy_renamed(tmp_path)
    out = golden / "mla_variant" / "outputs" / "zz_two_rows.safetensors"
    ref = load_file(str(out))
    ref["logits_last"] = ref["logits_last"] + 1e-2  # far above the 1e-4 tolerance
    ref["gen_ids"] = torch.roll(ref["gen_ids"], 1, dims=1)
    save_file(ref, str(out))
    code = oracle.main([str(golden), "--images", str(images)])
    text = capsys.readouterr().out
    assert code == 1
    assert "FAIL  mla_variant zz_two_rows" in text and "logits.last" in text and "gen.greedy_ids" in text
    last = [line for line in text.splitlines() if "passed" in line][-1]
    assert last.endswith("failed") and not last.endswith(" 0 failed")


def test_missing_image_is_reported(tmp_path, capsys):
    golden, images = _copy_renamed(tmp_path)
    next(images.iterdir()).unlink()
    code = oracle.main([str(golden), "--images", str(images)])
    text = capsys.readouterr().out
    assert code == 1 and "not found in --images" in text


def test_argmax_accepts_float32_near_ties_only():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 3.6079910  # ours: token 2 ...
    logits[0, 0, 4] = 3.6079900  # ... the reference's token 4 is 1e-6 below it: a near-tie
    logits[0, 1, 1] = 1.0        # position 1 agrees
    logits[0, 2, 3] = 2.05       # position 2: the reference's token 0 is 0.05 below ours
    logits[0, 2, 0] = 2.0
    use = torch.ones(1, 3, dtype=torch.bool)
    tol = torch.tensor([oracle.TOL["logits"]])
    name, ok, detail = checks.argmax_check(logits[:, :2], torch.tensor([[4, 1]]), use[:, :2], tol)
    assert ok and "1/2 equal" in detail and "1 near-tie" in detail
    name, ok, detail = checks.argmax_check(logits, torch.tensor([[4, 1, 0]]), use, tol)
    assert not ok and "1 DIFFER" in detail


def test_oracle_fails_on_a_planted_argmax_error(tmp_path, capsys):
    """The reference's top-1 at one position is replaced by a token 0.05 or more below
    the true maximum (read from the reference's own full logits there): a real error."""
    golden, images = _copy_renamed(tmp_path)
    out = golden / "mla_variant" / "outputs" / "zz_two_rows.safetensors"
    ref = load_file(str(out))
    sel = ref["sel_pos"]
    planted = None
    for b in range(sel.shape[0]):
        for j, t in enumerate(sel[b].tolist()):
            if t < 0:
                continue
            top2 = ref["logits_sel"][b, j].topk(2)
            if float(top2.values[0] - top2.values[1]) >= 0.05:
                planted = (b, t, int(top2.indices[1]))
                break
        if planted:
            break
    assert planted is not None
    b, t, token = planted
    ref["logits_argmax"][b, t] = token
    save_file(ref, str(out))
    code = oracle.main([str(golden), "--images", str(images)])
    text = capsys.readouterr().out
    assert code == 1
    line = next(x for x in text.splitlines() if "logits.argmax" in x)
    assert line.startswith("FAIL") and "1 DIFFER" in line
