"""Layers: the engine imports neither the demo nor the evaluation, and the evaluation does not import the demo (it is
given the demo's judge and world). Guards against the engine -> demo -> training -> engine cycle coming back."""

import ast
from pathlib import Path

import pytest

STUDIO = Path(__file__).resolve().parents[1] / "studio"


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the text of `module`, e.g. "studio.engine.generate") imports, at any depth, with
    relative imports resolved and `from a import b` counted as both `a` and `a.b`."""
    package = module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            target = ".".join(part for part in (base, node.module or "") if part)
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return found


def forbidden_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file: module` for every import under studio/<package>/ of a module in (or under) `forbidden`."""
    bad = []
    for path in sorted((STUDIO / package).rglob("*.py")):
        module = ".".join(("studio", *path.relative_to(STUDIO).with_suffix("").parts))
        for name in imported_modules(path.read_text(), module):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(STUDIO.parent)}: {name}")
    return bad


@pytest.mark.parametrize("package, forbidden", [("engine", ("studio.demo", "studio.evaluation")),
                                                ("evaluation", ("studio.demo",))])
def test_a_layer_does_not_import_the_layers_above_it(package, forbidden):
    assert (STUDIO / package / "__init__.py").is_file()
    assert forbidden_imports(package, forbidden) == []


def test_the_import_finder_sees_every_way_of_writing_an_import():
    """A checker that misses an import would pass a package that breaks the rule."""
    source = ("import studio.demo.judge\nfrom studio import demo\nfrom ..demo.world import render\n"
              "def later():\n    from studio.evaluation.scoring import score_concept\n")
    found = imported_modules(source, "studio.engine.generate")
    assert {"studio.demo.judge", "studio.demo", "studio.demo.world", "studio.evaluation.scoring"} <= found
