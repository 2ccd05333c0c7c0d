"""The package's rooms keep their doors: pykd's import graph has no cycle, no module takes a private name
from another subpackage, and every option's value list is written once, by what implements it."""
import ast
import importlib
from pathlib import Path

import pytest

from tests.config_fields import leaf_fields
from tests.paths import REPO

PACKAGE = REPO / "pykd"
CONFIG_MODULES = ("pykd.distill.config", "pykd.nas.config", "pykd.distill.options")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, module: str | None, level: int) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if not level:
        return module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(base + ([module] if module else []))


def _runtime_nodes(tree):
    """Every node of the module but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _imports(name: str):
    """(target module, imported name or None, line) for every import that runs in module `name` (lazy ones
    inside functions too)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.module, node.level)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield (submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno)


def _graph() -> dict[str, set[str]]:
    """module -> the pykd modules importing it runs: the target and the packages above it that the
    importer is not already inside (their __init__ runs first)."""
    graph = {}
    for name in MODULES:
        edges = set()
        for target, _, _ in _imports(name):
            if not target.startswith("pykd"):
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                if ancestor in MODULES and ancestor != name and not (name + ".").startswith(ancestor + "."):
                    edges.add(ancestor)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _subpackage(name: str) -> str:
    """pykd.<room> for modules of a subpackage, pykd for the top-level modules."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (name in MODULES and MODULES[name].name == "__init__.py") \
        else parts[0]


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "pykd.distill.trainer" in graph["pykd.nas.train"]  # the graph sees real edges
    assert _cycles(graph) == []


def test_the_graph_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_private_name_from_another_subpackage():
    crossings = []
    for name in MODULES:
        for target, imported, line in _imports(name):
            if not target.startswith("pykd") or _subpackage(target) == _subpackage(name):
                continue
            private = imported if imported is not None else target.rpartition(".")[2]
            if private.startswith("_") and not private.startswith("__"):
                crossings.append(f"{name}:{line} imports {private} from {target}")
    # pykd's own private modules (_extension, _build_flags) are for its subpackages; names in them are public.
    assert [c for c in crossings if c.split(" from ")[1] not in ("pykd._extension", "pykd._build_flags")] == []


def test_the_engine_imports_no_meta_layer():
    """Distiller's meta layer sits above the KD engine and NAS: nothing below imports it."""
    below = [name for name in MODULES if not name.startswith("pykd.distiller") and name != "pykd.cli"]
    assert [name for name in below for target, _, _ in _imports(name) if target.startswith("pykd.distiller")] == []


# ---- option value lists ----

def _choice_fields(cls):
    from pykd.distill.options import choices_of

    for key, hint, _ in leaf_fields(cls):
        if choices_of(hint) is not None:
            yield key, choices_of(hint)


def _implementation_tuples() -> dict[tuple, list[str]]:
    """Every module-level tuple of strings in pykd's modules but the config modules, by value."""
    found = {}
    for name in MODULES:
        if name in CONFIG_MODULES or name.startswith("pykd.kernels"):
            continue
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value) \
                    and getattr(module, "__name__", "") == name:
                found.setdefault(value, []).append(f"{name}.{attribute}")
    return found


def test_config_choices_come_from_implementation_tuples():
    from pykd.distill.config import RunConfig

    pytest.importorskip("transformers")
    tuples = _implementation_tuples()
    fields = dict(_choice_fields(RunConfig))
    assert {"losses.hidden.mapping", "losses.mi.bound", "losses.relation.loss", "nas.search", "augment.policy",
            "data.kind", "train.optimizer"} <= set(fields)
    missing = {key: choices for key, choices in fields.items() if choices not in tuples}
    assert missing == {}, "config choices not exported by an implementation module"


def _string_collections(root: Path):
    """(file:line, values) of every tuple, list or set literal of two or more string constants."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                yield f"{path.relative_to(root)}:{node.lineno}", frozenset(e.value for e in node.elts)


def test_no_option_value_list_is_written_twice():
    """A choice list (or it without its off switch "none", or the mappings without pairs / emd) is written as
    a literal once in pykd/ and tools/: everything else takes it from there."""
    from pykd.distill.config import RunConfig

    pytest.importorskip("transformers")
    lists = {frozenset(choices) for _, choices in _choice_fields(RunConfig)}
    variants = {frozenset(c - drop) for c in lists for drop in ({"none"}, {"pairs"}, {"pairs", "emd"})} | lists
    variants = {v for v in variants if len(v) >= 2}
    written = {}
    for root in (PACKAGE, REPO / "tools"):
        for where, values in _string_collections(root):
            if values in variants:
                written.setdefault(values, []).append(where)
    assert {sorted(v)[0]: places for v, places in written.items() if len(places) > 1} == {}


def test_the_duplicate_finder_finds_a_copy(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text('MINE = ("skip", "uniform", "last", "emd")\nTHEIRS = ["skip", "uniform", "last", "emd"]\n')
    found = [values for _, values in _string_collections(tmp_path)]
    assert found == [frozenset({"skip", "uniform", "last", "emd"})] * 2
