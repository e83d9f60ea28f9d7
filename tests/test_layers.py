"""The house check (docs/architecture.md): the engine imports nothing above it, the evaluation does not import the
demo (it is given the demo's judge and world), no import cycle anywhere in studio/, no function over 60 lines.

Imports are read from the source at any depth (module level, inside `if`/`try` blocks, TYPE_CHECKING blocks and
function bodies), so a cycle hidden in a function's late import counts as one."""

import ast
from pathlib import Path

import pytest

STUDIO = Path(__file__).resolve().parents[1] / "studio"
MAX_FUNCTION_LINES = 60
ABOVE_THE_ENGINE = ("gradio", "studio.ui", "studio.demo", "studio.evaluation", "studio.training", "studio.library",
                    "studio.jobs", "studio.cli")


def module_name(path: Path) -> str:
    parts = ("studio", *path.relative_to(STUDIO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`, e.g. "studio.engine.generate") imports, at any depth, with
    relative imports resolved and `from a import b` counted as both `a` and `a.b`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            target = ".".join(part for part in (base, node.module or "") if part)
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return found


def studio_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(STUDIO.rglob("*.py"))}


def forbidden_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file: module` for every import under studio/<package>/ (or in studio/<package>.py) of a module in (or
    under) `forbidden`."""
    bad = []
    single = STUDIO / f"{package}.py"
    for path in [single] if single.is_file() else sorted((STUDIO / package).rglob("*.py")):
        for name in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(STUDIO.parent)}: {name}")
    return bad


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `files` (module -> source) it imports; a package's __init__ counts only where it is
    imported by name (`from studio.engine import families` is studio.engine.families)."""
    graph = {}
    for module, source in files.items():
        names = imported_modules(source, module, is_package=module + ".__init__" in files)
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_functions(source: str, where: str) -> list[str]:
    """`where:line name (n lines)` for every function over MAX_FUNCTION_LINES, from its `def` (or first decorator)
    to its last line, nested functions counted in their parent."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


ABOVE_TRAINING = ("gradio", "studio.ui", "studio.cli", "studio.jobs", "studio.library", "studio.demo",
                  "studio.evaluation")


@pytest.mark.parametrize("package, forbidden", [("engine", ABOVE_THE_ENGINE), ("training", ABOVE_TRAINING),
                                                ("library", ("gradio", "studio.ui", "studio.cli", "studio.jobs")),
                                                ("evaluation", ("studio.demo",))])
def test_a_layer_does_not_import_the_layers_above_it(package, forbidden):
    assert (STUDIO / package / "__init__.py").is_file() or (STUDIO / f"{package}.py").is_file()
    assert forbidden_imports(package, forbidden) == []


def test_no_import_cycle_in_studio():
    files = {module: path.read_text() for module, path in studio_files().items()}
    assert cycles(import_graph(files)) == []


def test_no_function_in_studio_is_over_60_lines():
    found = []
    for module, path in studio_files().items():
        found += long_functions(path.read_text(), str(path.relative_to(STUDIO.parent)))
    assert found == []


def test_the_import_finder_sees_every_way_of_writing_an_import():
    """A checker that misses an import would pass a package that breaks the rule."""
    source = ("import studio.demo.judge\nfrom studio import demo\nfrom ..demo.world import render\n"
              "if TYPE_CHECKING:\n    from studio.jobs.session import Session\n"
              "def later():\n    from studio.evaluation.scoring import score_concept\n")
    found = imported_modules(source, "studio.engine.generate")
    assert {"studio.demo.judge", "studio.demo", "studio.demo.world", "studio.evaluation.scoring",
            "studio.jobs.session"} <= found


def test_the_cycle_finder_and_the_length_check_catch_what_they_guard():
    files = {"studio.a": "from studio.b import x\n", "studio.b": "def f():\n    from studio import a\n",
             "studio": "", "studio.c": "import studio.a\n"}
    assert cycles(import_graph(files)) == [["studio.a", "studio.b"]]
    body = "".join(f"    x = {k}\n" for k in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def short():\n{body[:-12]}\n", "f") == []
    assert long_functions(f"def outer():\n    def inner():\n        pass\n{body}", "f") == ["f:1 outer (63 lines)"]
