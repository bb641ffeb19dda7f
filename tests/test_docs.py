"""The documentation: no placeholders, no dead links, nothing outside the repository cited, a README
that stays a front page, and the code it shows runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_have_no_placeholders_and_no_dead_links(page):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"PLACEHOLDER|\bTODO\b|\bTBD\b|FIXME", text), f"{page.name} has a placeholder"
    # the product cites only itself: no relative path, linked or quoted, leads out of the repository
    for target in re.findall(r"(?<![\w.])(?:\.\./)+[\w./-]*", text):
        assert (page.parent / target).resolve().is_relative_to(ROOT), f"{page.relative_to(ROOT)} cites {target}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    for section in ("## Quickstart", "## In Python", "## Command line", "## Tests"):
        assert section in lines


def test_the_strategy_example_runs(digits10, context_of):
    from planner.search import _REGISTRY
    from planner.search.budget import Budget

    code = _code_blocks(ROOT / "docs" / "adding-a-strategy.md", "python")[0]
    namespace: dict = {"__name__": "docs_example"}
    try:
        exec(compile(code, "adding-a-strategy.md", "exec", dont_inherit=True), namespace)
        strategy = namespace["EveryOther"](start=2)
        plan = strategy.search(context_of(digits10), Budget.parse("1.2x"))
        assert plan.provenance.strategy == "every_other" and plan.prediction.speedup >= 1.2
    finally:
        _REGISTRY.pop("every_other", None)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").symlink_to(ROOT / "profiles")
    (tmp_path / "plans").mkdir()
    code = next(b for b in _code_blocks(ROOT / "README.md", "python") if "my-plan.json" in b)
    exec(compile(code, "README.md", "exec", dont_inherit=True), {"__name__": "readme_example"})
    assert (tmp_path / "plans" / "my-plan.json").is_file()
