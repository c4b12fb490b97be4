"""Rules the repository keeps: short functions, thin stage scripts, no citation of documents outside
the repository, and the stage registry as the one place that knows the stages."""

import ast
import re

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.stages import STAGES

PACKAGE = REPO_ROOT / "code" / "dreamdiffusion"
MAX_FUNCTION_LINES = 80


def _functions(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_of_the_package_is_longer_than_80_lines():
    long = [f"{p.name}:{line} {name} ({n} lines)" for p in sorted(PACKAGE.rglob("*.py"))
            for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, long


def test_nothing_cites_a_document_outside_the_repository():
    pattern = re.compile(r"REFERENCE(\.md| section)|shared/(REFERENCE|STYLE)")
    places = [*(REPO_ROOT / "code").rglob("*.py"), *(REPO_ROOT / "tests").rglob("*.py"), *(REPO_ROOT / "configs").rglob("*.yaml"),
              *(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md", REPO_ROOT / "datasets" / "README.md",
              REPO_ROOT / "pretrains" / "README.md"]
    citing = [str(p.relative_to(REPO_ROOT)) for p in places if p.is_file() and pattern.search(p.read_text())]
    assert not citing, citing


def test_docs_cited_by_the_code_have_those_sections():
    method = (REPO_ROOT / "docs" / "method.md").read_text()
    headings = set(re.findall(r"^#+ (.+)$", method, flags=re.M))
    cited = set()
    for path in (REPO_ROOT / "code").rglob("*.py"):
        cited |= set(re.findall(r'docs/method\.md, \\?"([^"\\]+)\\?"', path.read_text()))
    assert cited and cited <= headings, cited - headings
    assert (REPO_ROOT / "docs" / "architecture.md").is_file()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_scripts_are_thin_and_go_through_the_registry(stage):
    text = STAGES[stage].script_path.read_text()
    assert f'STAGES["{stage}"].main(argv)' in text and len(text.splitlines()) <= 30
    assert STAGES[stage].defaults_path.is_file()
