"""The import rule of docs/architecture.md, enforced on every module's imports (top level and inside functions):
each part of the pipeline imports only the parts below it, the base layer nothing of patcher above it, and the
records that cross process boundaries (run manifest, export contract) import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import patcher

ROOT = Path(patcher.__file__).parent

# part -> the parts it may import (besides itself). runs/layout (file names) sits low enough that data, models and
# training may read it; the records that cross process boundaries copy what they record rather than import it.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "runs": {"base"},
    "data": {"base", "runs.layout"},
    "models": {"base", "data", "runs.layout"},
    "training": {"base", "data", "models", "runs.layout"},
    "patching": {"base", "data", "models", "training", "runs"},
    "export": {"base", "data", "models", "runs"},
    "stages": {"base", "data", "models", "training", "patching", "runs", "export", "triton", "benchmark"},
    "triton": {"base", "runs.layout", "runs.manifest", "export.contract", "export.tokenizer", "export.openvocab"},
    "benchmark": {"base", "data", "models", "runs", "export", "triton"},
    "deploy": {"base", "triton"},
    "cli": {"base", "data", "models", "training", "patching", "runs", "export", "stages", "triton", "benchmark",
            "deploy"},
}
TOP_LEVEL = {"__init__", "__main__", "__version__"}
TORCH_FREE = ["patcher.base.records", "patcher.base.files", "patcher.base.staging", "patcher.base.tensorfile",
              "patcher.runs.layout", "patcher.runs.manifest", "patcher.runs.weights", "patcher.runs.summary",
              "patcher.runs.per_class",
              "patcher.training.config", "patcher.data.options", "patcher.export.contract",
              "patcher.export.parity", "patcher.export.tokenizer", "patcher.export.openvocab"]


HEAVY = ("torch", "open_clip")


def part_of(module: str) -> str:
    """The pipeline part a `patcher.x.y` module belongs to: its top-level package."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def is_patcher(module: str) -> bool:
    """True for `patcher` and its modules (not for e.g. `patcher_imaging`, a file copied into a Triton model)."""
    return module == "patcher" or module.startswith("patcher.")


def patcher_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `patcher...` module a file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "patcher" else [f"patcher.{a.name}" for a in node.names]
            found += [(node.lineno, name) for name in names if is_patcher(name)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if is_patcher(a.name)]
    return found


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, patcher's and third parties' alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def module_path(module: str) -> Path | None:
    """The file of a `patcher...` module, or None when the name is an attribute, not a module."""
    parts = module.split(".")[1:]
    if not parts:
        return ROOT / "__init__.py"
    relative = Path(*parts)
    for candidate in (ROOT / relative.with_suffix(".py"), ROOT / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def reachable(start: list[str]) -> tuple[set[str], set[str]]:
    """(patcher modules, third-party top-level packages) reachable by any import, at any depth, from `start`."""
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        path = module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        for name in imported_modules(path):
            if is_patcher(name):
                todo.append(name)
            else:
                third_party.add(name.split(".")[0])
    return seen, third_party


def allowed(source_part: str, target: str) -> bool:
    if target == "patcher" or part_of(target) in (source_part, *TOP_LEVEL):
        return True
    rest = target.removeprefix("patcher.")
    return any(rest == rule or rest.startswith(rule + ".") for rule in ALLOWED[source_part])


def test_every_part_imports_only_the_parts_below_it() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if len(relative.parts) == 1:
            continue  # patcher/__init__.py, __main__.py
        source = relative.parts[0]
        assert source in ALLOWED, f"{relative}: a new part of the pipeline needs its row in ALLOWED and the docs"
        violations += [f"{relative}:{line} imports {target}" for line, target in patcher_imports(path)
                       if not allowed(source, target)]
    assert violations == []


def test_the_rule_catches_an_inward_pointing_import(tmp_path: Path) -> None:
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from patcher.stages.build import build\n")
    assert [target for _, target in patcher_imports(module)] == ["patcher.stages.build"]
    assert not allowed("base", "patcher.stages.build") and not allowed("triton", "patcher.models.heads")
    assert allowed("triton", "patcher.export.contract") and allowed("export", "patcher.runs.weights")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_records_and_the_export_contract_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'open_clip', 'onnx') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_triton_parts_import_no_torch_at_any_depth() -> None:
    """The repository writer, serving and the client, followed through every import they make."""
    start = [f"patcher.{p.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')}"
             for p in (ROOT / "triton").rglob("*.py")]
    modules, third_party = reachable([m.removesuffix(".__init__") for m in start])
    assert "patcher.triton.serving.server" in modules and "patcher.export.contract" in modules
    assert third_party & set(HEAVY) == set(), sorted(m for m in modules if not m.startswith("patcher.triton"))


def test_the_static_check_sees_torch_behind_an_import() -> None:
    _, third_party = reachable(["patcher.export.trace"])
    assert "torch" in third_party


def test_the_repository_writer_does_not_reach_serving_or_the_client() -> None:
    modules, _ = reachable(["patcher.triton.repository.writer"])
    assert not [m for m in modules if m.startswith(("patcher.triton.serving", "patcher.triton.client"))]


def test_the_manifest_copies_the_runtime_configs_it_records() -> None:
    """TrainingRecord and DataRecord repeat TrainConfig's and DataOptions' fields (same names, order, defaults)
    instead of inheriting them, so a new hyperparameter changes patcher-run/1 only where someone decides it should."""
    from dataclasses import fields

    from patcher.data.options import DataOptions
    from patcher.runs.manifest import DataRecord, TrainingRecord
    from patcher.training.config import TrainConfig

    for runtime, record in ((TrainConfig, TrainingRecord), (DataOptions, DataRecord)):
        assert not issubclass(record, runtime)
        copied = [(f.name, f.default) for f in fields(record)][:len(fields(runtime))]
        assert copied == [(f.name, f.default) for f in fields(runtime)], record.__name__


def test_the_parts_form_no_circle() -> None:
    """Drawn from every import of every module, the parts' graph has no circle: nothing climbs back up."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if len(relative.parts) > 1:
            edges.setdefault(relative.parts[0], set()).update(
                part_of(target) for _, target in patcher_imports(path)
                if target != "patcher" and part_of(target) not in (relative.parts[0], *TOP_LEVEL))

    def above(part: str) -> set[str]:
        seen, todo = set(), [part]
        while todo:
            for target in edges.get(todo.pop(), set()) - seen:
                seen.add(target)
                todo.append(target)
        return seen

    assert "stages" not in above("benchmark") and "training" not in above("runs")
    assert sorted(part for part in edges if part in above(part)) == []


# --- shape: what a newcomer reads (issue 31's "Must show") ------------------------------------------------------
MAX_LINES, MAX_PARAMETERS, MAX_POSITIONAL = 60, 6, 6
# functions still taking more than MAX_PARAMETERS (a wide one takes a keyword-only record instead): none may join
WIDE: set[str] = set()
# calls still passing more than MAX_POSITIONAL arguments by position: none
POSITIONAL: set[str] = set()


def _functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    arguments = node.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def _shape() -> tuple[list[str], list[str], list[str]]:
    """(long functions, wide functions, wide positional calls) outside the CLI's typer commands."""
    long, wide, positional = [], [], []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("cli/"):
            continue
        tree = ast.parse(path.read_text())
        for name, node in _functions(tree):
            if node.end_lineno - node.lineno + 1 > MAX_LINES:  # type: ignore[operator]
                long.append(f"{relative}:{name}")
            if _parameters(node) > MAX_PARAMETERS:
                wide.append(f"{relative}:{name}")
        positional += [f"{relative}:{node.lineno}" for node in ast.walk(tree)
                       if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL]
    return long, wide, positional


def test_functions_are_short_narrow_and_called_by_keyword() -> None:
    """No function over 60 lines, none over 6 parameters (records are dataclasses, not functions), no call passing
    more than 6 arguments by position: a wide call takes a keyword-only record instead."""
    long, wide, positional = _shape()
    assert long == []
    assert sorted(set(wide) - WIDE) == [] and sorted(WIDE - set(wide)) == []
    assert [call for call in positional if call.split(":")[0] not in POSITIONAL] == []


def test_no_module_imports_itself_back() -> None:
    """Module by module (a package's __init__ counting as the package, `from package import x` as an import of the
    package), no import leads back to where it started: records below, recipes above, inside a part too."""
    modules = {f"patcher.{p.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
               for p in ROOT.rglob("*.py")}
    edges = {module: {name for _, name in patcher_imports(module_path(module))  # type: ignore[arg-type]
                      if name in modules and name != module} for module in modules}
    circles = []
    for start in sorted(modules):
        seen, todo = set(), list(edges[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += edges[module]
        if start in seen:
            circles.append(start)
    assert circles == []


def test_no_file_name_repeats_across_packages() -> None:
    """A file's name says what it holds, once: two `loading.py` in two packages make a reader open the wrong one."""
    names = sorted(path.name for path in ROOT.rglob("*.py") if path.name != "__init__.py")
    assert sorted({name for name in names if names.count(name) > 1}) == []


@pytest.mark.slow
def test_a_wheel_carries_every_file_the_package_reads(tmp_path: Path) -> None:
    """`pip install .` (not editable) must get the model configs, the shipped reference weights and the compiled
    front's source: every tracked file under patcher/, not only the modules (built from a copy of the tracked files,
    so that no earlier build/ folder hides a missing one)."""
    import shutil
    import zipfile

    tracked = subprocess.run(["git", "ls-files", "patcher", "pyproject.toml", "README.md"], cwd=ROOT.parent,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "source"
    for name in tracked.stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT.parent / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel")], cwd=source, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("patcher-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in tracked.stdout.split() if name.startswith("patcher/") and name not in packaged]
    assert missing == [], missing
