"""The runner's layout, read from its source (nothing is run): only nn_handler's public names, no import
cycle through ``runner.launch``, one docstring per module."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

RUNNER = Path(__file__).resolve().parent.parent / "runner"
OBJECTS = ("h", "cb", "handler")  # the names the runner gives a handler and its callbacks


def modules() -> Iterator[Tuple[str, ast.Module]]:
    for path in sorted(RUNNER.rglob("*.py")):
        yield str(path.relative_to(RUNNER.parent)), ast.parse(path.read_text(), str(path))


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def test_the_runner_uses_only_public_nn_handler_names():
    found: List[str] = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nn_handler"):
                if _private(node.module or "") or any(_private(alias.name) for alias in node.names):
                    found.append(f"{name}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.startswith("nn_handler") and _private(a.name)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("nn_handler."):
                if _private(node.value):
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in OBJECTS:
                if _private(node.attr):
                    found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private nn_handler names in the runner:\n" + "\n".join(found)


def _imports_launch(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "runner.launch" or a.name.startswith("runner.launch.") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if module in ("runner.launch", "launch") or module.endswith(".launch"):
            return True
        return module in ("runner", "") and any(a.name == "launch" for a in node.names)
    return False


def test_nothing_in_the_runner_but_main_imports_launch():
    found = [f"{name}:{node.lineno}" for name, tree in modules() if not name.endswith("__main__.py")
             for node in ast.walk(tree) if _imports_launch(node)]
    assert not found, f"runner.launch imported by {found} (the order: context/errors <- tasks <- launch <- __main__)"


def test_each_runner_module_starts_with_a_docstring():
    names = [name for name, _ in modules()]
    assert "runner/tasks/__init__.py" in names and "runner/context.py" in names
    missing = [name for name, tree in modules() if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring: {missing}"
