"""Imports flow one way: data model -> executor -> profile/runner -> search -> eval/bench -> CLI.

Every import statement of the package (function-level ones included) is read from the source and
checked against the layer table below: a module may import from its own layer or a lower one only,
so there is no cycle between layers and no library module reaches into the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Longest matching prefix wins.
LAYERS = {
    "planner.errors": 0, "planner.io": 0, "planner.cfg": 0, "planner.modules": 0, "planner.artifact": 0,
    "planner.seeds": 0, "planner.plan": 0,
    "planner.executor": 1,
    "planner.runner": 2, "planner.pipelines": 2, "planner.zoo": 2, "planner.profile": 2, "planner.metrics": 2,
    "planner.search": 3,
    "planner.evaluate": 4, "planner.bench": 4,
    "planner.cli": 5, "planner.commands": 5, "planner.__main__": 5,
    # the package root holds __version__ and resolves its public names lazily, on first use
    "planner": 0,
}
NAMES = ["data model", "executor", "profile / runner / zoo", "search", "eval / bench", "CLI"]


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def package_modules() -> dict[str, Path]:
    """Module name -> file, with search/ under its installed name planner.search."""
    out = {}
    for folder, prefix in ((ROOT / "planner", "planner"), (ROOT / "search", "planner.search")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """``(imported planner module, line)`` for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "planner"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "planner":
                found.append((target, node.lineno))
    return found


def test_every_import_goes_down_the_layers():
    wrong = []
    modules = package_modules()
    assert "planner.search.greedy" in modules and "planner.executor.session" in modules
    for module, path in modules.items():
        for target, line in imports_of(path, module):
            if layer(target) > layer(module):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({NAMES[layer(module)]}) imports "
                             f"{target} ({NAMES[layer(target)]})")
    assert not wrong, "\n".join(wrong)


def test_every_package_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in package_modules().items() if p.name == "__init__.py"}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages must list: {sorted(found - listed)}"


def test_no_top_level_search_package_is_installed():
    import importlib.util
    import subprocess
    import sys

    # outside the repository (whose root would put search/ on the path), only planner.search exists
    code = ("import importlib.util, sys; import planner.search; "
            "sys.exit(0 if importlib.util.find_spec('search') is None else 1)")
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
    assert importlib.util.find_spec("planner.search") is not None


@pytest.mark.parametrize("module", ["planner.plan", "planner.artifact", "planner.cfg", "planner.search.settings"])
def test_data_model_imports_need_no_torch(module):
    import subprocess
    import sys

    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"importing {module} pulls in torch"
