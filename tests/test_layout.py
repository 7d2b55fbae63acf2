"""Dependency rules between the modules of ``nn_handler`` and ``runner``, read statically with ``ast``.

Nothing is imported: every ``.py`` file under ``nn_handler/`` and ``runner/`` is parsed and its
run-time imports form a graph of modules (a package counts as its ``__init__``).

What counts as an import of module ``M`` by module ``X``:

- ``import a.b.c`` and ``from a.b.c import name``, at module level or inside a function or a
  class, inside ``try``/``except`` or any ``if`` -- except the body of ``if TYPE_CHECKING:``
  (or ``if typing.TYPE_CHECKING:``), which never runs (its ``else`` does count);
- relative imports resolved against ``X``'s package; ``from pkg import name`` imports the
  submodule ``pkg.name`` when there is one, else ``pkg`` itself;
- importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``: for the cycle rule that
  counts as an import of each such package that ``X`` is not itself inside (a module inside
  ``a.b`` runs only after ``a.b``'s ``__init__`` has started, so importing a sibling adds no
  dependency on it). Such edges are shown as "(runs the package's __init__)". The other rules
  look only at the module named by the import.

Not seen: ``importlib.import_module``/``__import__`` with computed names, and attribute access
through a parent package (``import nn_handler`` then ``nn_handler.handler.X``).
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nn_handler", "runner")


# ---------------------------------------------------------------------------- the graph builder
@dataclass(frozen=True)
class Import:
    """One edge: module ``source`` imports module ``target`` (at ``file:line``, by ``text``)."""

    source: str
    target: str
    file: str
    line: int
    text: str
    implicit: bool = False  # an ancestor package whose __init__ the import runs
    names: Tuple[str, ...] = ()  # the names taken from the target (``from target import names``)

    def __str__(self) -> str:
        extra = " (runs the package's __init__)" if self.implicit else ""
        return f"{self.file}:{self.line}: {self.text}  [{self.source} -> {self.target}]{extra}"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module


def discover(root: Path, packages: Sequence[str]) -> Dict[str, Module]:
    """Every module of ``packages`` under ``root``, by dotted name, parsed."""
    modules: Dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), filename=str(path)))
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` that can run, leaving out the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from runtime_nodes(stmt)
            continue
        yield child
        yield from runtime_nodes(child)


def known(name: str, modules: Dict[str, Module]) -> Optional[str]:
    """The longest prefix of ``name`` that is one of ``modules`` (None: outside them)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in modules:
            return candidate
    return None


def absolute(module: Module, node: ast.ImportFrom) -> Optional[str]:
    """The module a ``from ... import`` names, relative levels resolved (None: above the top)."""
    if not node.level:
        return node.module
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: Module, modules: Dict[str, Module], root: Path) -> List[Import]:
    """The run-time imports of ``module`` that land in ``modules`` (explicit targets, then ancestors)."""
    file = module.path.relative_to(root).as_posix()
    found: List[Import] = []

    def add(target: str, node: ast.stmt, names: Tuple[str, ...] = ()) -> None:
        text = ast.unparse(node)
        found.append(Import(module.name, target, file, node.lineno, text, names=names))
        parts = target.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:cut])
            inside = module.name == ancestor or module.name.startswith(ancestor + ".")
            if ancestor in modules and not inside:
                found.append(Import(module.name, ancestor, file, node.lineno, text, implicit=True))

    for node in runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = known(alias.name, modules)
                if target is not None:
                    add(target, node)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node)
            if base is None:
                continue
            plain: List[str] = []
            for alias in node.names:
                sub = known(f"{base}.{alias.name}", modules)
                if sub == f"{base}.{alias.name}":
                    add(sub, node)
                else:
                    plain.append(alias.name)
            target = known(base, modules)
            if target is not None and (plain or not node.names):
                add(target, node, tuple(plain))
    return found


def build_graph(root: Path, packages: Sequence[str]) -> Tuple[Dict[str, Module], List[Import]]:
    modules = discover(root, packages)
    edges = [edge for module in modules.values() for edge in imports_of(module, modules, root)]
    return modules, edges


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cycles(edges: Iterable[Import], prefix: str) -> List[Tuple[List[List[str]], List[Import]]]:
    """The import cycles among modules under ``prefix``, per strongly connected component: its
    distinct cycles (a shortest one through each of its edges, as module names, first module
    repeated at the end) and every import inside it (each lies on some cycle)."""
    inside = [e for e in edges if under(e.source, prefix) and under(e.target, prefix)]
    graph: Dict[str, Set[str]] = {}
    for e in inside:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's algorithm (the graphs are small: recursion is fine)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        loops: Set[Tuple[str, ...]] = set()
        for u in component:
            for v in graph[u] & members:
                path = _shortest_path(graph, v, u, members)  # v ... u, then the edge u -> v closes it
                ring = path[:-1] if u != v else []
                ring = [u] + ring if u != v else [u]
                turn = ring.index(min(ring))
                loops.add(tuple(ring[turn:] + ring[:turn]))
        found.append(([list(loop) + [loop[0]] for loop in sorted(loops, key=lambda c: (len(c), c))],
                      sorted((e for e in inside if e.source in members and e.target in members),
                             key=lambda e: (e.file, e.line, e.target))))
    return found


def _shortest_path(graph: Dict[str, Set[str]], start: str, goal: str, members: Set[str]) -> List[str]:
    """A shortest path ``start -> ... -> goal`` within ``members`` (breadth first; it exists in a component)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier and goal not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[goal]


def cycle_report(found: List[Tuple[List[List[str]], List[Import]]]) -> str:
    lines = []
    for loops, edges in found:
        first: Dict[Tuple[str, str], Import] = {}
        for e in sorted(edges, key=lambda e: (e.implicit, e.file, e.line)):
            first.setdefault((e.source, e.target), e)
        members = sorted({e.source for e in edges})
        lines.append(f"cycle group of {len(members)} modules {{{', '.join(members)}}}; {len(loops)} distinct cycles "
                     f"(a shortest one through each import):")
        for loop in loops:
            hops = [loop[0]] + [f"{b} ({first[a, b].file}:{first[a, b].line}"
                                f"{', via its __init__' if first[a, b].implicit else ''})" for a, b in zip(loop, loop[1:])]
            lines.append("    " + " -> ".join(hops))
        lines.append("  the imports on these cycles:")
        lines.extend(f"    {e}" for e in edges)
    return "\n".join(lines)


def report(title: str, violations: Sequence[object]) -> str:
    return f"{title} ({len(violations)}):\n" + "\n".join(f"  {v}" for v in violations)


# ---------------------------------------------------------------------------- private names (rule 5)
PRIVATE_HOLDERS = ("h", "handler", "cb")  # variables that hold a handler or a callback, by convention


def private(name: str) -> bool:
    """A leading underscore, but not a dunder (``__version__``, ``__init__`` are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: Module, root: Path, library: str = "nn_handler") -> List[str]:
    """Uses of ``library``'s private names in ``module``, one line each (file:line: what).

    Flags: ``from library.x import _name``; an imported module path with a private component
    (``library.callbacks._monitor``); ``N._name`` (through any chain of attributes) where ``N``
    is bound in this module by an import from ``library``; ``v._name`` and
    ``getattr``/``hasattr``/``setattr(v, "_name", ...)`` where ``v`` is such a name or a
    variable called ``h``, ``handler`` or ``cb``. Other objects' privates are not tracked.
    """
    file = module.path.relative_to(root).as_posix()
    bound: Set[str] = set()
    out: List[str] = []
    for node in runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if under(alias.name, library):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if any(private(part) for part in alias.name.split(".")):
                        out.append(f"{file}:{node.lineno}: {ast.unparse(node)}  (a private module)")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and under(node.module, library):
            if any(private(part) for part in node.module.split(".")):
                out.append(f"{file}:{node.lineno}: {ast.unparse(node)}  (a private module)")
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if private(alias.name):
                    out.append(f"{file}:{node.lineno}: {ast.unparse(node)}  (the private name {alias.name})")
    holders = bound | set(PRIVATE_HOLDERS)
    for node in runtime_nodes(module.tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            direct = isinstance(node.value, ast.Name) and node.value.id in holders
            through = isinstance(base, ast.Name) and base.id in bound
            if direct or through:
                out.append(f"{file}:{node.lineno}: {ast.unparse(node)}  (a private attribute)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2:
            obj, attr = node.args[0], node.args[1]
            if isinstance(obj, ast.Name) and obj.id in holders and isinstance(attr, ast.Constant) and \
                    isinstance(attr.value, str) and private(attr.value):
                out.append(f"{file}:{node.lineno}: {ast.unparse(node)}  (a private attribute)")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


# ---------------------------------------------------------------------------- the rules
def graph() -> Tuple[Dict[str, Module], List[Import]]:
    return build_graph(ROOT, PACKAGES)


def explicit(edges: Iterable[Import]) -> List[Import]:
    return sorted((e for e in edges if not e.implicit), key=lambda e: (e.file, e.line, e.target))


def test_the_graph_sees_the_whole_tree() -> None:
    """Guards against a vacuous pass: the modules and some known imports are there."""
    modules, edges = graph()
    assert {"nn_handler", "nn_handler.checkpointing", "nn_handler.checkpointing.format", "runner"} <= set(modules)
    assert any(e.source == "nn_handler" and e.target == "nn_handler.handler" for e in edges)
    assert any(under(e.source, "runner") and under(e.target, "nn_handler") for e in edges)


def test_no_import_cycle_among_nn_handler_modules() -> None:
    _, edges = graph()
    found = cycles(edges, "nn_handler")
    assert not found, f"{len(found)} import cycle group(s) among nn_handler modules:\n{cycle_report(found)}"


def test_no_import_cycle_among_runner_modules() -> None:
    _, edges = graph()
    found = cycles(edges, "runner")
    assert not found, f"{len(found)} import cycle group(s) among runner modules:\n{cycle_report(found)}"


def test_only_the_package_init_imports_the_handler_module() -> None:
    _, edges = graph()
    bad = [e for e in explicit(edges) if e.target == "nn_handler.handler" and under(e.source, "nn_handler")
           and e.source != "nn_handler"]
    assert not bad, report("imports of nn_handler.handler outside nn_handler/__init__.py", bad)


def test_checkpointing_imports_no_handler_training_or_callbacks() -> None:
    _, edges = graph()
    forbidden = ("nn_handler.handler", "nn_handler.training", "nn_handler.train", "nn_handler.callbacks")
    bad = [e for e in explicit(edges) if under(e.source, "nn_handler.checkpointing")
           and any(under(e.target, f) for f in forbidden)]
    assert not bad, report(f"imports of {', '.join(forbidden)} under nn_handler/checkpointing/", bad)


def test_train_imports_no_handler_or_checkpointing() -> None:
    modules, edges = graph()
    if "nn_handler.train" not in modules:
        return  # the package does not exist (yet): nothing to check
    forbidden = ("nn_handler.handler", "nn_handler.checkpointing")
    bad = [e for e in explicit(edges) if under(e.source, "nn_handler.train")
           and any(under(e.target, f) for f in forbidden)]
    assert not bad, report(f"imports of {', '.join(forbidden)} under nn_handler/train/", bad)


def test_the_runner_uses_no_private_nn_handler_name() -> None:
    modules, _ = graph()
    bad = [line for name, module in sorted(modules.items()) if under(name, "runner")
           for line in private_uses(module, ROOT)]
    assert not bad, report("private nn_handler names used by the runner", bad)


# ---------------------------------------------------------------------------- the builder itself
def write_package(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_builder_finds_a_cycle_and_ignores_type_checking_imports(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/__init__.py": "from .a import A\n",
        "pkg/a.py": "from . import b\nA = 1\n",
        "pkg/b.py": "def f():\n    from .a import A  # function level: counts\n    return A\n",
        "pkg/c.py": """\
            from typing import TYPE_CHECKING
            import typing
            if TYPE_CHECKING:
                from .a import A
                from . import d
            else:
                from .sub import leaf
            if typing.TYPE_CHECKING:
                import pkg.b
            """,
        "pkg/d.py": "import pkg.c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "from .. import d\nfrom ..a import A\nimport os\n",
        "pkg/e.py": "import pkg.f\n",
        "pkg/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import e  # would close e <-> f\n",
    })
    modules, edges = build_graph(tmp_path, ["pkg"])
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f", "pkg.sub", "pkg.sub.leaf"}
    pairs = {(e.source, e.target) for e in edges if not e.implicit}
    assert ("pkg.a", "pkg.b") in pairs and ("pkg.b", "pkg.a") in pairs  # relative and function level
    assert ("pkg.c", "pkg.sub.leaf") in pairs  # the else of TYPE_CHECKING runs
    assert not {("pkg.c", "pkg.a"), ("pkg.c", "pkg.d"), ("pkg.c", "pkg.b")} & pairs  # TYPE_CHECKING only
    assert ("pkg.sub.leaf", "pkg.d") in pairs and ("pkg.sub.leaf", "pkg.a") in pairs  # two levels up
    assert ("pkg.c", "pkg.sub") in {(e.source, e.target) for e in edges if e.implicit}  # runs sub/__init__
    found = cycles(edges, "pkg")
    # pkg.a <-> pkg.b, and pkg.c -> pkg.sub.leaf -> pkg.d -> pkg.c; not pkg.e <-> pkg.f (TYPE_CHECKING)
    assert sorted(sorted({e.source for e in group}) for _, group in found) == [
        ["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.sub.leaf"]]
    loops = sorted(loop for group, _ in found for loop in group)
    assert loops == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.leaf", "pkg.d", "pkg.c"]]
    text = cycle_report(found)
    assert "pkg/b.py:2: from .a import A" in text and "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:2)" in text


def test_builder_without_cycles_reports_none(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "pkg/__init__.py": "from . import a\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg\n",
    })
    _, edges = build_graph(tmp_path, ["pkg"])
    assert cycles(edges, "pkg") == []


def test_private_use_checker(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "lib/__init__.py": "",
        "lib/_hidden.py": "",
        "lib/mod.py": "",
        "app/__init__.py": "",
        "app/main.py": """\
            import lib.mod as M
            from lib import mod, __doc__
            from lib.mod import _secret, public
            from lib._hidden import thing
            import lib._hidden
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from lib.mod import _typing_only


            def run(h, handler, cb, other, self):
                M._x; mod.sub._y; public._z; h._dist; handler._warn; cb._state
                getattr(h, "_records"); hasattr(cb, "_init_kwargs")
                other._fine; self._fine; getattr(other, "_fine"); mod.__name__; h.epoch
            """,
    })
    modules = discover(tmp_path, ["lib", "app"])
    uses = private_uses(modules["app.main"], tmp_path, library="lib")
    flagged = [u.split(": ", 1)[1] for u in uses]
    assert flagged == [
        "from lib.mod import _secret, public  (the private name _secret)",
        "from lib._hidden import thing  (a private module)",
        "import lib._hidden  (a private module)",
        "M._x  (a private attribute)", "cb._state  (a private attribute)", "h._dist  (a private attribute)",
        "handler._warn  (a private attribute)", "mod.sub._y  (a private attribute)", "public._z  (a private attribute)",
        "getattr(h, '_records')  (a private attribute)", "hasattr(cb, '_init_kwargs')  (a private attribute)",
    ], flagged
