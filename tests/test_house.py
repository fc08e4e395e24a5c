"""The house rules that hold across rooms: no import cycles among our modules, modules that fit in a read,
each test file named after the module it covers.

Read from the source with `ast` (nothing is imported), so a cycle hidden inside a function counts too.
"""

import ast
import pathlib

import pytest

from tests.conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "xray_dit"
MAX_LINES = 450
MAX_FUNCTION_LINES = 80   # "fits on a screen", with a little slack for long signatures and docstrings
# Functions allowed over that limit, each with why; the test fails while a listed one already fits, so the list
# only shrinks.
LONG_FUNCTIONS = {"xray_dit/train/loop.py:train": "the readable linear loop is the project's example"}


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name → file, for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, name: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """The modules of ours that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle (as a path back to its start) per strongly connected component that has one."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(_path_through(graph, set(component), node))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _path_through(graph, component: set[str], start: str) -> list[str]:
    """A shortest import path from `start` back to itself inside one strongly connected component."""
    paths = {target: [start, target] for target in graph[start] if target in component}
    frontier = list(paths)
    while start not in paths:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target in component and target not in paths:
                    paths[target] = paths[node] + [target]
                    next_frontier.append(target)
        frontier = next_frontier
    return paths[start]


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_our_modules():
    graph = _graph()
    assert graph["xray_dit.study.phases"] >= {"xray_dit.study.context", "xray_dit.study.filters"}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(cycle) for cycle in cycles)


def test_no_two_rooms_import_each_other():
    """A room is a package or module right under xray_dit (data, models, train, study, sharding, ...)."""
    rooms: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        room = ".".join(name.split(".")[:2])
        rooms.setdefault(room, set()).update(".".join(t.split(".")[:2]) for t in targets)
        rooms[room].discard(room)
    cycles = _cycles(rooms)
    assert not cycles, "rooms importing each other: " + "; ".join(" → ".join(cycle) for cycle in cycles)


def test_nothing_imports_the_study_runner_back():
    importers = [name for name, targets in _graph().items() if "xray_dit.study.phases" in targets]
    assert importers == []


def test_modules_fit_in_a_read():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in _modules().values()}
    oversize = {path: lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not oversize, f"modules over {MAX_LINES} lines: {oversize}"


def test_functions_fit_on_a_screen():
    long, sizes = {}, {}
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(ROOT)}:{node.name}"
                sizes[name] = lines
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    fitting = [name for name in LONG_FUNCTIONS if sizes.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not fitting, f"listed in LONG_FUNCTIONS but gone or within {MAX_FUNCTION_LINES} lines: {fitting}"


def test_missing_reference_material_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    def outcome(path):   # a skip must not escape: it would skip this test instead of failing it
        try:
            return require(path, "golden tensors")
        except (pytest.skip.Exception, pytest.fail.Exception) as stop:
            return type(stop), str(stop)

    missing = tmp_path / "golden"
    monkeypatch.delenv("CI", raising=False)
    kind, message = outcome(missing)
    assert kind is pytest.skip.Exception and f"golden tensors not found at {missing}" in message
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        kind, message = outcome(missing)
        assert kind is pytest.fail.Exception and f"golden tensors not found at {missing}" in message, value
    missing.mkdir()
    assert outcome(missing) == missing


# ---- the test tree: each test file is named after the module it covers ---------------------------------
TESTS = ROOT / "tests"
# Where the modules a test file may be named after live, besides the package (launch/ holds shell scripts).
NAMED_ROOTS = ("bench", "configs", "launch", "tools")
# Test files that name no single module, each with why; the test fails while a listed one is gone.
UNNAMED_TESTS = {
    "test_house.py": "the house rules themselves, read across the whole tree",
    "test_sharding_multiprocess.py": "two processes on one mesh through sharding, the loop and checkpoints together",
    "test_vae.py": "xray_dit/models/vae.py, the model (the trainer's tests are test_train_vae.py)",
    "test_dit.py": "xray_dit/models/dit.py, the model (the trainer's tests are test_train_dit.py)",
}


def _test_names() -> dict[str, set[str]]:
    """Test-file name → the modules it would name: a module's dotted path after `xray_dit.` (or from its top
    folder, e.g. bench.nih_cv) with dots → underscores, or any tail of that path, e.g. train_vae or vae."""
    names: dict[str, set[str]] = {}
    for root in (PACKAGE, *NAMED_ROOTS):
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if root == PACKAGE:
                parts = parts[1:]
            for start in range(len(parts)):
                names.setdefault("_".join(parts[start:]), set()).add(str(path.relative_to(ROOT)))
        if root != PACKAGE:
            names.setdefault(root, set()).add(root + "/")
    return names


def _misnamed(files: list[str], names: dict[str, set[str]]) -> dict[str, str]:
    """File → what is wrong with its name, for the test files that break the rule and are not listed."""
    wrong = {}
    for file in files:
        name = file.removeprefix("test_").removesuffix(".py")
        modules = names.get(name, set())
        if file in UNNAMED_TESTS:
            continue
        if not modules:
            wrong[file] = "names no module of xray_dit/, " + ", ".join(f"{r}/" for r in NAMED_ROOTS)
        elif len(modules) > 1:
            wrong[file] = f"'{name}' could be any of {sorted(modules)}: name it after one by its longer path"
    return wrong


def test_the_naming_rule_refuses_a_file_named_after_no_module_or_several():
    names = _test_names()
    assert names["train_vae"] == {"xray_dit/train/vae.py"} and names["bench_nih_cv"] == {"bench/nih_cv.py"}
    assert names["builders"] == {"xray_dit/data/builders/__init__.py"} and names["launch"] == {"launch/"}
    wrong = _misnamed(["test_misc.py", "test_classifier.py", "test_train_classifier.py", "test_house.py"], names)
    assert set(wrong) == {"test_misc.py", "test_classifier.py"}
    assert "configs/classifier.py" in wrong["test_classifier.py"] and "xray_dit/train/classifier.py" in wrong[
        "test_classifier.py"]


def test_each_test_file_is_named_after_the_module_it_covers():
    files = sorted(path.name for path in TESTS.glob("test_*.py"))
    wrong = _misnamed(files, _test_names())
    assert not wrong, f"test files not named after one module (rename, or list in UNNAMED_TESTS with why): {wrong}"
    assert set(UNNAMED_TESTS) <= set(files), f"listed but gone: {set(UNNAMED_TESTS) - set(files)}"
    undocumented = [file for file in files if not ast.get_docstring(ast.parse((TESTS / file).read_text()))]
    assert not undocumented, f"test files without a docstring saying what they cover: {undocumented}"
