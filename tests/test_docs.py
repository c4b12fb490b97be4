"""The documentation points at things that exist: every `python -m dreamdiffusion.X` names a runnable
module, every script or config path it mentions is there, every relative link (and its #anchor)
resolves, docs/architecture.md names every module of the package, and the README stays a short
newcomer's page."""

import re

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "code" / "dreamdiffusion"
README_MAX_LINES = 300
PAGES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "datasets" / "README.md", REPO_ROOT / "pretrains" / "README.md",
                *(REPO_ROOT / "docs").glob("*.md")])
PAGE_IDS = [str(p.relative_to(REPO_ROOT)) for p in PAGES]

MODULE_RUN = re.compile(r"python -m (dreamdiffusion(?:\.\w+)*)")
# Paths of the repository's own files (outputs, data and weights folders are made by the user).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:code|configs|benchmarks|tests|docs)/[\w/.-]*\w\.(?:py|yaml|md))(?![\w*])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text):
    """The page without its HTML comments (markers such as <!-- deviations:start -->)."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def github_anchor(heading):
    """The #fragment GitHub gives a heading: lower case, punctuation (backticks too) dropped, spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def _module_file(name):
    base = PACKAGE.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("The paper's ablation table: `code/paper_table.py`") == "the-papers-ablation-table-codepaper_tablepy"
    assert github_anchor("Stage 2: one training step at SD1.5 size") == "stage-2-one-training-step-at-sd15-size"
    assert github_anchor("Does the 10x faster sampler lose accuracy?") == "does-the-10x-faster-sampler-lose-accuracy"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_python_m_module_exists_and_runs_as_a_script(page):
    problems = []
    for name in sorted(set(MODULE_RUN.findall(page.read_text()))):
        path = _module_file(name)
        if path is None:
            problems.append(f"{name}: no such module")
        elif path.name != "__main__.py" and '__name__ == "__main__"' not in path.read_text():
            problems.append(f"{name}: {path.relative_to(REPO_ROOT)} has no `if __name__ == \"__main__\"` block")
    assert not problems, f"{page.relative_to(REPO_ROOT)}: {problems}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_script_and_config_path_named_exists(page):
    missing = sorted({p for p in REPO_PATH.findall(page.read_text()) if not (REPO_ROOT / p).exists()})
    assert not missing, f"{page.relative_to(REPO_ROOT)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.relative_to(REPO_ROOT)}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: {broken}"


def test_architecture_names_every_module_of_the_package_in_its_layer():
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    sections = {}
    for match in re.finditer(r"^### `(\w+)/`.*?(?=^##|\Z)", text, flags=re.M | re.S):
        sections[match.group(1)] = match.group(0)
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            continue
        where = text if len(rel.parts) == 1 else sections.get(rel.parts[0], "")
        if f"`{path.name}`" not in where:
            unnamed.append(str(rel))
    assert not unnamed, ("docs/architecture.md does not name these modules in their layer's table (add a line "
                         f"saying what each holds): {unnamed}")


def test_the_readme_stays_a_short_newcomers_page():
    lines = len((REPO_ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): put the details "
                                       "in a page under docs/ and link it")
