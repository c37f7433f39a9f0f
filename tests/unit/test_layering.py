"""The package layering as a contract (what import-linter's `layers` contract checks, with no
extra dependency): api <- render / sweep / storage <- controller / trainer / local <- cli.
Every import counts, including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.unit

PKG = REPO / "orchestrator"
# package -> the orchestrator packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "api": set(),
    "render": {"api"},
    "sweep": {"api"},
    "storage": set(),
    "controller": {"api", "render", "sweep", "storage"},
    "trainer": {"api", "storage"},
    "local": {"api", "render", "sweep", "storage", "client"},
    "client": {"api", "render", "sweep", "storage", "local"},
    "cli": {"api", "render", "sweep", "storage", "local", "client", "__version__"},
}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "orchestrator":
            names = [f"orchestrator.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("orchestrator.")}
    return out


def test_every_package_imports_only_the_layers_below_it() -> None:
    broken = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts == ("__init__.py",):
            continue  # the distribution's front door re-exports on purpose
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert pkg in ALLOWED, f"new package {pkg}: give it a layer in this test"
        for target in _imports(path) - {pkg} - ALLOWED[pkg]:
            broken.append(f"orchestrator/{rel} imports orchestrator.{target}")
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_the_controller_cli_and_api_never_import_torch() -> None:
    heavy = {"torch", "transformers", "peft", "deepspeed", "accelerate"}
    for pkg in ("api", "controller", "cli", "render", "sweep", "local"):
        for path in (PKG / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                mods = (
                    [a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                )
                assert not {m.split(".")[0] for m in mods} & heavy, f"{path} imports {mods}"
