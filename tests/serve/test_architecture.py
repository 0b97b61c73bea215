"""The layers hold: who may import whom, and every DVC stage depends on the code it runs.

Read from the source (ast), never imported, so the rules are checked in any environment:

    catsdogs   <- the ground floor: imports no other part of the project, and no torch,
                  mlflow, dvc, scikit-learn or web framework
    server     <- catsdogs and itself only (the serving image copies catsdogs/ and server/)
    training   <- catsdogs and itself;  export <- catsdogs, training and itself
    monitoring <- catsdogs and itself;  loadtest <- catsdogs and itself
                  (loadtest.torch_ref also loads training's checkpoint code)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.serve

PACKAGES = ("catsdogs", "server", "training", "export", "monitoring", "loadtest")
ALLOWED: dict[str, set[str]] = {
    "catsdogs": {"catsdogs"},
    "server": {"catsdogs", "server"},
    "training": {"catsdogs", "training"},
    "export": {"catsdogs", "training", "export"},
    "monitoring": {"catsdogs", "monitoring"},
    "loadtest": {"catsdogs", "loadtest"},
}
EXCEPTIONS = {"loadtest/torch_ref.py": {"training"}}  # PyTorch reference on the checkpoint
# third-party packages the ground floor must never need (it runs in every environment)
CORE_FORBIDDEN = {"torch", "torchvision", "mlflow", "dvc", "sklearn", "starlette", "uvicorn"}
SERVER_FORBIDDEN = {"torch", "torchvision", "mlflow", "dvc", "sklearn", "matplotlib"}


def imports(path: Path) -> set[str]:
    """Top-level modules a file imports, at any depth (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_layer_may(package: str) -> None:
    wrong = []
    for path in sources(package):
        rel = str(path.relative_to(ROOT))
        allowed = ALLOWED[package] | EXCEPTIONS.get(rel, set())
        for name in imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top not in allowed:
                wrong.append(f"{rel} imports {name}")
            if package == "catsdogs" and top in CORE_FORBIDDEN:
                wrong.append(f"{rel} imports {name} (the core must stay light)")
            if package == "server" and top in SERVER_FORBIDDEN:
                wrong.append(f"{rel} imports {name} (not in the serving environment)")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from server.app import create_app\n")
    assert "server.app" in imports(sample)


# ---------------------------------------------------------------------- dvc.yaml dependencies
def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not the project's."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_closure(module: str) -> set[Path]:
    """Every project file that running ``python -m module`` can import, transitively."""
    todo = [module]
    seen: set[Path] = set()
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in imports(path):
            if name.split(".")[0] in PACKAGES:
                todo.append(name)
                todo.append(name.rsplit(".", 1)[0])  # ``from a.b import c``: c may be a name
    return {p for p in seen if not docstring_only(p)}


def docstring_only(path: Path) -> bool:
    """A package ``__init__.py`` with nothing but a docstring changes no stage's result."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_modules() -> dict[str, str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        match = re.search(r"python -m ([\w.]+)", stage["cmd"])
        assert match, f"stage {name}: cmd does not run `python -m <module>`"
        found[name] = match.group(1)
    return found


def listed(stage: dict, path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage_name", sorted(stage_modules()))
def test_every_stage_depends_on_the_code_it_runs(stage_name: str) -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage_name]
    module = stage_modules()[stage_name]
    missing = sorted(
        str(p.relative_to(ROOT)) for p in project_closure(module) if not listed(stage, p)
    )
    assert not missing, f"stage {stage_name} runs {module} but does not list: {missing}"


def test_the_closure_follows_imports_transitively() -> None:
    closure = {p.relative_to(ROOT).as_posix() for p in project_closure("export.evaluate")}
    assert {"export/evaluate.py", "catsdogs/preprocessing.py", "catsdogs/contract.py"} <= closure
