"""The package's layout holds: library below, surfaces above, no import circles.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ...
import``, at module level or inside a function: an import inside a function is still a
dependency). ``from package import name`` counts as an import of the submodule
``package.name`` when there is one. A package's ``__init__`` runs whenever one of its
modules is imported; that implicit edge is not counted, so every ``__init__`` of the
library stays a light facade (it is checked like any module for what it imports).

The layers, from the bottom (a module may import its own layer and the ones below):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dsvl2"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("base", ["dsvl2.errors", "dsvl2.sizes", "dsvl2.cachedir", "dsvl2.config"]),
    ("native", ["dsvl2.model.native"]),
    ("processing", ["dsvl2.processing"]),
    ("model", ["dsvl2.model"]),
    ("checkpoint", ["dsvl2.checkpoint"]),
    ("engine", ["dsvl2.engine"]),
    ("results", ["dsvl2.grounding", "dsvl2.structured"]),
    ("api", ["dsvl2.api", "dsvl2.history"]),
    ("facade", ["dsvl2"]),  # dsvl2/__init__.py: dsvl2.load and the version
    ("ray", ["dsvl2.ray_connect"]),
    ("web", ["dsvl2.web"]),
    ("server", ["dsvl2.server"]),
    ("batch", ["dsvl2.batch"]),
    ("commands", ["dsvl2.commands"]),
    ("entry", ["dsvl2.__main__"]),
]
__doc__ += "\n".join(f"  {i}. {name}: {', '.join(prefixes)}" for i, (name, prefixes) in enumerate(LAYERS))


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (path, is_pkg)
    return out


def imports_of(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[tuple[str, int]]:
    """(imported dsvl2 module, line) for every import statement of one file."""
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "dsvl2"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dsvl2":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add((sub if sub in known else target, node.lineno))
    return found


def graph() -> dict[str, set[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {m: {(t, line) for t, line in imports_of(m, p, pkg, known) if t != m} for m, (p, pkg) in mods.items()}


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return level


def upward_imports(g) -> list[str]:
    bad = []
    for m, targets in sorted(g.items()):
        for t, line in sorted(targets):
            if layer_of(t) > layer_of(m):
                bad.append(f"{m}:{line} imports {t} ({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(t)][0]})")
    return bad


def circles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    adj = {m: sorted({t for t, _ in ts}) for m, ts in g.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
    for start in sorted(adj):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for j in range(i, len(adj.get(v, []))):
                w = adj[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
    return out


def test_every_module_is_in_a_layer():
    for m in modules():
        layer_of(m)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_checks_fail_on_a_circle_and_on_an_upward_import():
    g = graph()
    g["dsvl2.model.ops"] = g["dsvl2.model.ops"] | {("dsvl2.engine.engine", 1)}  # model -> engine: upward
    assert upward_imports(g) == ["dsvl2.model.ops:1 imports dsvl2.engine.engine (model -> engine)"]
    g = graph()
    g["dsvl2.config"] = g["dsvl2.config"] | {("dsvl2.sizes", 1)}
    g["dsvl2.sizes"] = g["dsvl2.sizes"] | {("dsvl2.config", 1)}  # same layer, but a circle
    assert ["dsvl2.config", "dsvl2.sizes"] in circles(g)


def test_the_reader_sees_imports_inside_functions_and_submodules(tmp_path):
    pkg = tmp_path / "dsvl2"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "ops.py").write_text("def f():\n    from .. import api\n    from . import quant\n")
    (pkg / "model" / "quant.py").write_text("import dsvl2.model.ops\n")
    (pkg / "api.py").write_text("")
    mods = modules(pkg)
    path, is_pkg = mods["dsvl2.model.ops"]
    assert {t for t, _ in imports_of("dsvl2.model.ops", path, is_pkg, set(mods))} == {"dsvl2.api", "dsvl2.model.quant"}


@pytest.mark.parametrize("module", ["dsvl2.commands.main", "dsvl2.server.app", "dsvl2.model.native.policy"])
def test_layers_place_known_modules_in_order(module):
    # commands above the server above the model: the order a reader expects
    assert layer_of("dsvl2.model.native.cpu") < layer_of("dsvl2.model.ops") < layer_of("dsvl2.engine.engine")
    assert layer_of("dsvl2.api") < layer_of("dsvl2.server.app") < layer_of("dsvl2.commands.main")
    assert layer_of(module) >= 0
