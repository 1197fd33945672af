"""Every file the repository's prose names exists.

Docstrings and comments (Python, C, JavaScript, CSS, HTML, shell, Makefile, YAML, TOML)
and whole Markdown files are read for path-like mentions: a name ending in one of
``EXTENSIONS`` (``server/app.py``, ``docs/architecture.md``, ``bf16.c``) or the word
``Makefile``. A mention with a folder is found if it names a file (or folder) relative
to the repository root, to the mentioning file's folder, or to ``dsvl2/`` or
``dsvl2/model/`` (the code's shorthand: "engine/scheduler.py", "native/step.c"); a bare
name ("step.c", "guard.py") is found if a file of the repository has that name. URLs
are skipped, and so are the names in ``EXTERNAL``: files of checkpoints, of the official
reference and of the oracle's golden tree, which live outside this repository, and those in ``PROPOSED``:
files a design note proposes.

Dotted names of the package (``dsvl2.server.submit.submit``, ``dsvl2.load``) are checked
too: the longest prefix that is a module of ``dsvl2/`` must exist, and the name after it,
if any, must occur in that module's source (a function, class or name it defines or
imports).

Code (string literals that are not docstrings) is not read: a file name in code is data
(``config.json`` of the checkpoint being loaded), not a citation.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["dsvl2", "tests", "benchmarks", "examples", "docs", "README.md", "Makefile", "pyproject.toml"]
SKIP_DIRS = {"__pycache__", "node_modules", ".git", "artifacts"}
SHORTHAND = ["dsvl2", "dsvl2/model"]  # folders the code's mentions are relative to besides root and own folder

EXTENSIONS = ("py", "md", "c", "h", "js", "css", "html", "sh", "toml", "yaml", "yml", "json", "safetensors")

# Names that are not this repository's files, each with the reason.
EXTERNAL = {
    # a checkpoint folder's files (ours are written by checkpoint/ and read by checkpoint/load.py)
    "config.json": "a checkpoint's config (every model folder has one)",
    "processor_config.json": "a checkpoint's processor config",
    "tokenizer.json": "a checkpoint's tokenizer",
    "tokenizer_config.json": "a checkpoint's tokenizer config",
    "special_tokens_map.json": "a checkpoint's tokenizer file",
    "model.safetensors": "a checkpoint's weights (one shard)",
    "model.safetensors.index.json": "a sharded checkpoint's index",
    "kernels.json": "the kernel choice cached in the user's cache folder (model/native/policy.py)",
    # the oracle's golden tree (made by the official reference, outside the repository)
    "manifest.json": "the golden tree's list of variants",
    "case.json": "a golden case's inputs",
    # the official DeepSeek-VL2 repository and the libraries it builds on
    "modeling_deepseek.py": "the official reference's language model",
    "modeling_deepseek_vl_v2.py": "the official reference's VL model",
    "processing_deepseek_vl_v2.py": "the official reference's processor",
    "siglip_vit.py": "the official reference's vision tower",
    "configuration_deepseek.py": "the official reference's language config",
    "inference.py": "the official reference's inference script",
    "web_demo.py": "the official reference's web demo",
}

# Files a design note proposes and that do not exist yet, each with the note.
PROPOSED = {
    "dsvl2/pipeline/stage.py": "docs/distributed.md: the stage actor of a pipeline not built yet",
}

_MENTION = re.compile(
    r"(?<![\w./*<>{}$%@~-])"  # not the tail of a longer name, a glob or a template
    r"((?:\.{1,2}/)?(?:[\w.-]+/)*[\w-][\w.-]*\.(?:" + "|".join(EXTENSIONS) + r")|Makefile)"
    r"(?![\w/-])")
_DOTTED = re.compile(r"(?<![\w.])dsvl2(?:\.\w+)+")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+|\bwww\.\S+")


# ---- reading the prose of a file ----------------------------------------------------------
def python_prose(text: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring (any bare string expression) of a Python file."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append((node.lineno, node.value.value))
    return out


def c_like_prose(text: str, line_comments: bool = True) -> list[tuple[int, str]]:
    """(line, text) of the ``/* */`` and (with ``line_comments``) ``//`` comments of C,
    JavaScript or CSS; string and template literals are stepped over."""
    out, i, n, quote = [], 0, len(text), None
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end
            out.append((text.count("\n", 0, i) + 1, text[i + 2:end]))
            i = end + 2
            continue
        elif line_comments and text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append((text.count("\n", 0, i) + 1, text[i + 2:end]))
            i = end
            continue
        i += 1
    return out


def hash_prose(text: str) -> list[tuple[int, str]]:
    """(line, text) of the ``#`` comments of shell, Makefile, YAML and TOML files (a ``#``
    at the start of a line or after a space)."""
    out = []
    for k, line in enumerate(text.splitlines(), 1):
        m = re.search(r"(?:^|\s)#(.*)$", line)
        if m:
            out.append((k, m.group(1)))
    return out


def html_prose(text: str) -> list[tuple[int, str]]:
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"<!--(.*?)-->", text, re.S)]


PROSE_SUFFIXES = {".py", ".md", ".c", ".h", ".js", ".css", ".html", ".sh", ".yaml", ".yml", ".toml"}


def prose(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, text) of the parts of a file that are written for people, or [] for other files."""
    suffix = path.suffix
    if suffix == ".py":
        return python_prose(text)
    if suffix == ".md":
        return [(1, text)]
    if suffix in (".c", ".h", ".js"):
        return c_like_prose(text)
    if suffix == ".css":
        return c_like_prose(text, line_comments=False)
    if suffix == ".html":
        return html_prose(text)
    if suffix in (".sh", ".yaml", ".yml", ".toml") or path.name == "Makefile":
        return hash_prose(text)
    return []


# ---- mentions ------------------------------------------------------------------------------
def placeholder(name: str, dotted: bool = False) -> bool:
    """A name built of metavariables (``P/N.py``, ``dsvl2.x._name``): a one-letter part
    (the extension of a file name aside)."""
    parts = name.split(".") if dotted else re.split(r"[/.]", name)[:-1]
    return any(len(p) == 1 and p.isalpha() for p in parts)


def mentions(text: str) -> list[tuple[int, str]]:
    """(line offset in ``text``, name) of every path-like mention, URLs and placeholders left out."""
    text = _URL.sub(lambda m: " " * len(m.group()), text)
    found = []
    for m in _MENTION.finditer(text):
        name = m.group(1)
        if re.search(r"\.[^./]*\.[ch]$", name) or placeholder(name):  # "a.b.c" is a host name, not a C file
            continue
        found.append((text.count("\n", 0, m.start()), name))
    return found


def dotted_mentions(text: str) -> list[tuple[int, str]]:
    """(line offset in ``text``, name) of every ``dsvl2.a.b`` mention but placeholders."""
    return [(text.count("\n", 0, m.start()), m.group()) for m in _DOTTED.finditer(text)
            if not placeholder(m.group(), dotted=True)]


def dotted_resolves(name: str, root: Path) -> bool:
    """Does ``dsvl2.a.b...`` name a module of the package, or a name in one?"""
    parts = name.split(".")
    source = None
    for k in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:k])
        if (base / "__init__.py").is_file():
            source = base / "__init__.py"
        elif base.with_suffix(".py").is_file():
            source = base.with_suffix(".py")
        elif (base / "__main__.py").is_file() or (k > 1 and base.is_dir() and k == len(parts)):
            return True  # a folder of the package (dsvl2.web) or a runnable one
        else:
            if k == 1:
                return False
            return re.search(rf"\b{re.escape(parts[k - 1])}\b", source.read_text(encoding="utf-8")) is not None
    return True


def resolves(name: str, mentioned_in: Path, root: Path, names: set[str]) -> bool:
    """Does ``name`` (mentioned in the file ``mentioned_in``) name a file? ``names``: the
    names of every file under ``root``."""
    if name.rsplit("/", 1)[-1] in EXTERNAL or name in PROPOSED:
        return True
    if "/" not in name and name in names:
        return True
    bases = [root, mentioned_in.parent, *(root / s for s in SHORTHAND)]
    return any((base / name).exists() for base in bases)


def scanned_files(root: Path, scanned: list[str] = SCANNED) -> list[Path]:
    files = []
    for entry in scanned:
        p = root / entry
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file()
                      and not SKIP_DIRS & set(f.relative_to(root).parts) and ".egg-info" not in str(f)]
    return files


def dangling(root: Path = ROOT, scanned: list[str] = SCANNED) -> list[str]:
    """``path:line: name`` of every mention that names no file."""
    bad = []
    names = {f.name for f in scanned_files(root, [p.name for p in root.iterdir()])}
    for path in scanned_files(root, scanned):
        if path.suffix not in PROSE_SUFFIXES and path.name != "Makefile":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images, weights: no prose
        for line, part in prose(path, text):
            for offset, name in mentions(part):
                if not resolves(name, path, root, names):
                    bad.append(f"{path.relative_to(root)}:{line + offset}: {name}")
            for offset, name in dotted_mentions(part):
                if not dotted_resolves(name, root):
                    bad.append(f"{path.relative_to(root)}:{line + offset}: {name}")
    return bad


# ---- the tests -----------------------------------------------------------------------------
def test_every_file_the_repository_names_exists():
    bad = dangling()
    assert not bad, "mentions of files that do not exist:\n  " + "\n  ".join(bad)


def test_a_planted_bad_reference_is_found(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "real.py").write_text("x = 1\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("See [the code](../pkg/sub/real.py), then docs/missing.md.\n"
                                               "The checkpoint's config.json; https://example.com/gone.md\n")
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module. The details are in sub/real.py and DESIGN.md."""\n'
        "import os  # see pkg/sub/gone.py\n"
        "NAME = 'absent.py'  # code, not prose: not read\n"
        "def f():\n"
        "    '''Mirrors the official modeling_deepseek.py.'''\n")
    (tmp_path / "pkg" / "k.c").write_text('/* from step.h */\nconst char *s = "x.h // not a comment";\n'
                                         "int x; // see real.c\n")
    (tmp_path / "Makefile").write_text("# runs tools/run.sh\nall:\n\techo ok.sh\n")
    found = dangling(tmp_path, ["pkg", "docs", "Makefile"])
    assert sorted(found) == sorted([
        "docs/guide.md:1: docs/missing.md",
        "pkg/mod.py:1: DESIGN.md",
        "pkg/mod.py:2: pkg/sub/gone.py",
        "pkg/k.c:1: step.h",
        "pkg/k.c:3: real.c",
        "Makefile:1: tools/run.sh",
    ]), found


@pytest.mark.parametrize("text, names", [
    ("see dsvl2/server/app.py, then README.md.", ["dsvl2/server/app.py", "README.md"]),
    ("``model/native/step.c`` and the Makefile", ["model/native/step.c", "Makefile"]),
    ("tests/test_*.py and <variant>/outputs/<case>.safetensors and bf16-<hash>.so", []),
    ("https://github.com/deepseek-ai/DeepSeek-VL2/blob/main/inference.py", []),
    ("x.pyc, y.python, 3.14, e.g. a.jpg, the host a.b.c, the pattern P/N.py or P/N/__init__.py", []),
])
def test_mentions(text, names):
    assert [n for _, n in mentions(text)] == names


@pytest.mark.parametrize("text, found, ok", [
    ("``dsvl2.server.submit.submit`` and dsvl2.load", ["dsvl2.server.submit.submit", "dsvl2.load"], True),
    ("``dsvl2.commands.oracle`` (run as python -m)", ["dsvl2.commands.oracle"], True),
    ("``dsvl2.weights.load_model``", ["dsvl2.weights.load_model"], False),
    ("``dsvl2.server.submit.no_such_function``", ["dsvl2.server.submit.no_such_function"], False),
    ("``import dsvl2.x as M`` then dsvl2.x._name", [], True),
])
def test_dotted_mentions(text, found, ok):
    names = [n for _, n in dotted_mentions(text)]
    assert names == found
    assert all(dotted_resolves(n, ROOT) for n in names) == ok
