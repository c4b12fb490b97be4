"""Rules the repository keeps: layers as folders with no upward import and no import cycle, short
functions, thin stage scripts that import their runner, no citation of documents outside the
repository."""

import ast
import re

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.config import STAGES

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


RUNNERS = {"stage1": "dreamdiffusion.train.stage1", "stage2": "dreamdiffusion.train.stage2",
           "stage3": "dreamdiffusion.evaluation.stage3"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_scripts_are_thin_and_import_their_runner(stage):
    text = STAGES[stage].script_path.read_text()
    assert f"from {RUNNERS[stage]} import main" in text and len(text.splitlines()) <= 30
    assert STAGES[stage].defaults_path.is_file()


# ---------------------------------------------------------------------------------------------------
# The layers: a module may import its own layer and the layers below it, never one above. The two
# front doors sit at the package top: config.py (above core) and dataset.py (above data/).
LAYERS = ["core", "config", "models", "data", "dataset", "evaluation", "train", "tools"]
# Imports allowed inside a function: optional extras and heavy libraries only one path needs (each
# such import carries a comment saying which).
LAZY_OK = ("open_clip", "moabb", "mne", "wandb", "pytorch_lightning.loggers", "torchmetrics.image.fid",
           "torchmetrics.image.inception", "torchmetrics.image.kid", "torchmetrics.image.lpip", "matplotlib",
           "transformers.models.clip.image_processing_pil_clip", "huggingface_hub",
           "dreamdiffusion.evaluation.generation")  # diffusers: only the generate phase needs it


def _module_name(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("dreamdiffusion", *parts)).removesuffix(".__init__")


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path):
    """(imported module or name, line, inside a function) for every import of `path`, at any depth."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    own = _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = own.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in in_function


def _package_target(name):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph():
    return {m: {t for name, _, _ in _imports(p) if (t := _package_target(name)) and t != m}
            for m, p in MODULES.items()}


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m != "dreamdiffusion" and _layer(m) not in LAYERS]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_layer_imports_a_layer_above_it():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
              if m != "dreamdiffusion" and LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))]
    assert not upward, upward


def test_no_import_cycle_counting_imports_inside_functions():
    graph, cycles = _graph(), []

    def visit(module, trail):
        for target in sorted(graph[module]):
            if target in trail:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in done:
                visit(target, trail + [target])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles


def test_imports_inside_functions_are_only_optional_or_heavy_libraries():
    lazy = [f"{m}:{line} {name}" for m, p in MODULES.items() for name, line, inner in _imports(p)
            if inner and not any(name == k or name.startswith(k + ".") for k in LAZY_OK)]
    assert not lazy, lazy
