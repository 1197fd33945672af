"""No module uses another module's private names, and no code outside an engine, runner
or model writes into one.

Every ``.py`` file under ``dsvl2/``, ``benchmarks/`` and ``tests/`` is read with ``ast``
(nothing is imported or run) and checked for:

(a) ``from X import _name`` where X is a module of this repository: a ``dsvl2`` module
    (absolute or relative import) or, for a test or a benchmark, a module beside it in
    its folder. A private name has one leading underscore; dunders (``__version__``) are
    public.
(b) ``M._name`` (read, written or deleted), ``getattr(M, "_name")``,
    ``setattr(M, "_name", ...)`` and ``monkeypatch.setattr(M, "_name", ...)``, where M
    is bound to such a module by an import: ``import dsvl2.x as M``, ``from dsvl2 import
    x``, ``from . import x``, ``import dsvl2`` then ``dsvl2.x._name`` (the chain is
    followed while it names modules). Whether ``from P import N`` binds a module is
    decided by the files: ``P/N.py`` or ``P/N/__init__.py``.
(c) a write into an engine, runner or model from outside it: ``<obj>.<attr> = ...``
    (``+=``, ``del`` too), ``setattr(<obj>, ...)`` and ``<anything>.setattr(<obj>, ...)``
    (pytest's ``monkeypatch``) where ``<obj>`` is an attribute chain through
    ``.engine``, ``.runner``, ``.scheduler``, ``.model`` or ``.language``
    (``m.engine.context_window = 3``, ``monkeypatch.setattr(vl.model.language, ...)``).
    A heuristic by attribute name: a chain that starts at a plain variable (``model.x =
    ...``, ``self.x = ...``) is not flagged, since a variable's name says nothing sure
    about its type and a class sets its own attributes through ``self``.

Private names of the file's own module are fine (a module's ``__init__`` is not its
submodules' own module). Each finding names ``file:line``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("dsvl2", "benchmarks", "tests")
PACKAGE = "dsvl2"
INSIDES = {"engine", "runner", "scheduler", "model", "language"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class _Files:
    """Which dotted names are modules of the tree under ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def is_module(self, dotted: str, beside: Path | None = None) -> bool:
        parts = dotted.split(".")
        if parts[0] == PACKAGE:
            base = self.root.joinpath(*parts)
        elif beside is not None and len(parts) == 1:  # a test's or benchmark's neighbour
            base = beside / parts[0]
        else:
            return False
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _own_module(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts[0] == PACKAGE else parts[-1]


def _imported_module(node: ast.ImportFrom, path: Path, root: Path) -> str | None:
    """The dotted name ``from ... import`` reads from, or None when it is not ours."""
    if node.level:
        package = list(path.relative_to(root).parent.parts)
        if node.level > 1:
            package = package[:len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))
    return node.module


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a plain name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    names.append(node.id)
    return names[::-1]


def _module_of(chain: list[str], bound: dict[str, str], files: _Files) -> str | None:
    """The module a chain of names denotes, following submodules; None if not a module."""
    if chain[0] not in bound:
        return None
    module = bound[chain[0]]
    for name in chain[1:]:
        if not files.is_module(f"{module}.{name}"):
            return None
        module = f"{module}.{name}"
    return module


def _through_insides(node: ast.AST) -> bool:
    """Is ``node`` an attribute chain with ``.engine`` / ``.runner`` / ... in it?"""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute) and node.attr in INSIDES:
            return True
        node = node.value
    return False


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    elif isinstance(node, ast.Delete):
        found = list(node.targets)
    else:
        return []
    out = []
    while found:
        t = found.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            found.extend(t.elts)
        elif isinstance(t, ast.Starred):
            found.append(t.value)
        else:
            out.append(t)
    return out


def check_file(path: Path, root: Path, files: _Files | None = None) -> list[str]:
    files = files or _Files(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(root).as_posix()
    own = _own_module(path, root)
    beside = None if where.startswith(PACKAGE + "/") else path.parent
    ours = lambda m: m is not None and (m == PACKAGE or m.startswith(PACKAGE + ".") or files.is_module(m, beside))
    problems: list[str] = []
    bound: dict[str, str] = {}  # local name -> the module of ours it is bound to

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if ours(a.name):
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            module = _imported_module(node, path, root)
            if not ours(module):
                continue
            for a in node.names:
                if _private(a.name) and module != own:
                    problems.append(f"{where}:{node.lineno}: from {module} import {a.name} (private to {module})")
                sub = f"{module}.{a.name}"
                if files.is_module(sub):
                    bound[a.asname or a.name] = sub

    def private_of_module(value: ast.AST, name: str, lineno: int, how: str) -> None:
        chain = _chain(value)
        module = _module_of(chain, bound, files) if chain else None
        if module is not None and module != own and _private(name):
            problems.append(f"{where}:{lineno}: {how} (private to {module})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node.value)
            if chain:
                private_of_module(node.value, node.attr, node.lineno, f"{'.'.join(chain)}.{node.attr}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name not in ("getattr", "setattr", "delattr", "hasattr"):
                continue
            obj, attr = node.args[0], node.args[1]
            if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                private_of_module(obj, attr.value, node.lineno, f"{name}(..., {attr.value!r})")
            if name in ("setattr", "delattr") and _through_insides(obj):
                problems.append(f"{where}:{node.lineno}: {name}({ast.unparse(obj)}, ...) writes into an "
                                f"engine / runner / model from outside it")
        for t in _targets(node):
            if isinstance(t, ast.Attribute) and _through_insides(t.value):
                problems.append(f"{where}:{node.lineno}: {ast.unparse(t)} = ... writes into an "
                                f"engine / runner / model from outside it")
    return problems


def check_tree(root: Path, folders=FOLDERS) -> list[str]:
    files = _Files(root)
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            problems += check_file(path, root, files)
    return sorted(set(problems), key=lambda p: (p.split(":")[0], int(p.split(":")[1]), p))


def test_no_private_names_of_other_modules_and_no_writes_into_engines():
    problems = check_tree(ROOT)
    assert not problems, f"{len(problems)} finding(s):\n" + "\n".join(problems)


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_the_checker_finds_planted_examples(tmp_path):
    _write(tmp_path, "dsvl2/__init__.py", "")
    _write(tmp_path, "dsvl2/pkg/__init__.py", "from .mod import _hidden\n")  # 1: (a), relative
    _write(tmp_path, "dsvl2/pkg/mod.py", "_hidden = 1\n__version__ = '1'\n"
                                         "from . import mod\n"
                                         "x = mod._hidden\n"  # its own module: fine
                                         "from .mod import _hidden as h\n")  # its own module: fine
    _write(tmp_path, "dsvl2/pkg/user.py",
           "from dsvl2.pkg.mod import __version__, _hidden\n"  # 1: (a)
           "from ..pkg import mod\n"
           "import dsvl2.pkg.mod as m\n"
           "import dsvl2\n"
           "a = mod._hidden\n"  # 5: (b)
           "b = m._hidden + m.__version__\n"  # 6: (b), the dunder is fine
           "c = dsvl2.pkg.mod._hidden\n"  # 7: (b), through the package
           "d = getattr(m, '_hidden')\n"  # 8: (b)
           "class C:\n"
           "    def f(self, other):\n"
           "        self._x = other._y\n"  # 11: fine, not modules
           "        self.model = None\n"  # 12: fine, a class sets its own attributes
           "        self.engine.window = 3\n")  # 13: (c)
    _write(tmp_path, "tests/helper.py", "_local = 1\n")
    _write(tmp_path, "tests/test_x.py",
           "import dsvl2.pkg.mod as mod\n"
           "from helper import _local\n"  # 2: (a), a neighbour module
           "import os\n"
           "def test(monkeypatch, vl, engine):\n"
           "    monkeypatch.setattr(vl.engine, 'context_window', 3)\n"  # 5: (c)
           "    monkeypatch.setattr(mod, '_hidden', 2)\n"  # 6: (b)
           "    vl.model.language.layers[0].forward = None\n"  # 7: (c), through a subscript
           "    vl.runner.cache, n = None, 1\n"  # 8: (c), in a tuple
           "    vl.scheduler.budget += 1\n"  # 9: (c)
           "    del vl.engine.sink\n"  # 10: (c)
           "    setattr(vl.model, 'x', 1)\n"  # 11: (c)
           "    vl.engine.submit(os._exit)\n"  # 12: fine: a call, and os is not ours
           "    engine.window = 3\n"  # 13: fine: a plain variable (see the docstring)
           "    monkeypatch.setattr(mod, 'public', 2)\n")  # 14: fine
    found = check_tree(tmp_path)
    at = sorted((p.split(":")[0], int(p.split(":")[1])) for p in found)
    assert at == [("dsvl2/pkg/__init__.py", 1),
                  ("dsvl2/pkg/user.py", 1), ("dsvl2/pkg/user.py", 5), ("dsvl2/pkg/user.py", 6),
                  ("dsvl2/pkg/user.py", 7), ("dsvl2/pkg/user.py", 8), ("dsvl2/pkg/user.py", 13),
                  ("tests/test_x.py", 2), ("tests/test_x.py", 5), ("tests/test_x.py", 6), ("tests/test_x.py", 7),
                  ("tests/test_x.py", 8), ("tests/test_x.py", 9), ("tests/test_x.py", 10), ("tests/test_x.py", 11)], found
    assert any("private to dsvl2.pkg.mod" in p for p in found)
    assert any("vl.engine" in p and "from outside it" in p for p in found)
