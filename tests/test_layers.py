"""The package's imports point one way (issue 13): model <- methods <- compaction / checkpoint <-
integrations <- training <- cli, with analysis reading run folders and the model layer only, and no
import cycle between modules. Every import statement of every module is read with `ast`, also
those inside functions (lazy imports), so a cycle cannot hide behind a deferred import."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import neuroprune

ROOT = Path(neuroprune.__file__).parent
FACADE = "neuroprune"  # the package itself: re-exports the public API, imports every layer

# Layers by folder (or top-level module); a module's layer is its first matching prefix.
LAYERS = {
    "model": "neuroprune.model.",
    "methods": "neuroprune.methods.",
    "integrations": "neuroprune.integrations.",
    "training": "neuroprune.training.",
    "cli": "neuroprune.cli.",
    "analysis": "neuroprune.analysis.",
    "compaction": "neuroprune.compaction",
}
# Leaf modules of the package root, importable from every layer: they import no other module of
# the package (checked below).
LEAVES = {"neuroprune.errors", "neuroprune.files", "neuroprune.version"}

# What a layer must not import (prefixes). The model layer is the strictest: it may import only
# the leaves and itself (see `test_model_layer_imports_only_leaves_and_itself`).
FORBIDDEN = {
    "methods": ("neuroprune.integrations", "neuroprune.training", "neuroprune.cli", "neuroprune.analysis"),
    "compaction": ("neuroprune.methods", "neuroprune.integrations", "neuroprune.training", "neuroprune.cli",
                   "neuroprune.analysis"),
    "integrations": ("neuroprune.training", "neuroprune.cli", "neuroprune.analysis"),
    "training": ("neuroprune.cli", "neuroprune.analysis"),
    "analysis": ("neuroprune.training", "neuroprune.integrations", "neuroprune.cli"),
}

# Justified exceptions to the model rule, each with its reason (empty today; add (importer,
# imported): reason).
MODEL_EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(name: str, path: Path, known: set[str], runtime_only: bool = False) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, functions, methods).
    `from a.b import c` counts as importing `a.b.c` when that is a module, else `a.b`.
    `runtime_only` leaves out `if TYPE_CHECKING:` blocks (annotations, never executed)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if _type_checking_block(node):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def graph(runtime_only: bool = False) -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        g.add_edges_from((name, target) for target in imports(name, path, set(mods), runtime_only))
    return g


def layer_of(name: str) -> str | None:
    return next((layer for layer, prefix in LAYERS.items()
                 if name == prefix.rstrip(".") or name.startswith(prefix)), None)


def test_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: an import inside a function, a `from pkg import module` and a relative
    import are all seen; a TYPE_CHECKING import only when asked for."""
    pkg = tmp_path / "neuroprune" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from neuroprune import errors\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n    from neuroprune.sub.c import Thing\n"
        "def f():\n    from ..files import atomic_dir\n    import neuroprune.model.index\n"
    )
    known = {"neuroprune", "neuroprune.errors", "neuroprune.sub.b", "neuroprune.sub.c", "neuroprune.files",
             "neuroprune.model.index"}
    name = module_name(pkg / "a.py", tmp_path / "neuroprune")
    assert name == "neuroprune.sub.a"
    everything = {"neuroprune.errors", "neuroprune.sub.b", "neuroprune.sub.c", "neuroprune.files",
                  "neuroprune.model.index"}
    assert imports(name, pkg / "a.py", known) == everything
    assert imports(name, pkg / "a.py", known, runtime_only=True) == everything - {"neuroprune.sub.c"}


def test_every_module_is_in_a_layer_or_known_at_the_top() -> None:
    """A new folder or top-level module must be placed deliberately (added to LAYERS or named
    here), so no module escapes the direction checks."""
    top = {"neuroprune", "neuroprune.config", "neuroprune.distributed", "neuroprune.guards",
           "neuroprune.run_folder", *LEAVES}
    loose = sorted(m for m in modules() if layer_of(m) is None and m not in top)
    assert not loose, f"modules outside every layer: {loose}; add them to LAYERS in {__file__}"


def test_leaves_import_nothing_of_the_package() -> None:
    mods = modules()
    for leaf in LEAVES:
        assert not imports(leaf, mods[leaf], set(mods)), f"{leaf} must stay a leaf"


def test_model_layer_imports_only_leaves_and_itself() -> None:
    g = graph()
    bad = [(a, b) for a, b in g.edges
           if layer_of(a) == "model" and layer_of(b) != "model" and b not in LEAVES
           and (a, b) not in MODEL_EXCEPTIONS]
    assert not bad, f"the model layer imports outside itself: {bad}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer: str) -> None:
    g = graph()
    bad = [(a, b) for a, b in g.edges if layer_of(a) == layer and b.startswith(FORBIDDEN[layer])]
    assert not bad, f"{layer} imports a layer above it: {bad}"


def test_only_the_cli_imports_the_facade() -> None:
    """Modules inside the package import what they need from its modules, never from the
    `neuroprune` facade, which imports every layer (so doing so closes a cycle)."""
    g = graph()
    users = sorted(a for a, b in g.edges if b == FACADE and layer_of(a) != "cli")
    assert not users, f"modules importing the neuroprune facade: {users}"


def test_no_import_cycles() -> None:
    """No cycle between modules, lazy imports included. A package's own `__init__` re-exporting
    its modules is not a cycle as long as none of them imports that package back (checked by
    treating `pkg/__init__` as a module like any other). Imports under `if TYPE_CHECKING:` are
    left out: they are never executed (annotations only)."""
    cycles = list(nx.simple_cycles(graph(runtime_only=True)))
    assert not cycles, f"import cycles: {sorted(cycles, key=len)[:5]}"


def test_the_cycle_check_would_see_a_cycle() -> None:
    g = graph(runtime_only=True)
    g.add_edge("neuroprune.model.surgery", "neuroprune.model.index")  # index imports surgery
    assert list(nx.simple_cycles(g))
