"""The layout is part of the architecture (issue 12): one job per folder, imports one way.

``agent/``, ``coordinator/`` and ``shared/`` hold only what runs on an agent box, in the
coordinator service, and in both; offline and operator tooling lives in ``tools/``. These checks
read the source (AST), so they hold for lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - JetPack 6 ships 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
RUNTIME = ("agent", "coordinator", "shared")
#: who may import whom among moe2's top-level packages (everyone may import the standard library)
ALLOWED: dict[str, set[str]] = {
    "shared": {"shared"},
    "agent": {"agent", "shared"},
    "coordinator": {"coordinator", "shared"},
    "tools": {"agent", "coordinator", "shared", "tools"},
    "gateway": {"shared", "tools", "gateway"},
    "cli": {"agent", "coordinator", "shared", "tools", "gateway", "cli"},
}
#: heavy or process-spawning modules the coordinator service must never pull in
COORDINATOR_FORBIDDEN = ("torch", "sklearn", "matplotlib", "subprocess", "llama_cpp")
MAX_LINES = 700


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((f"<relative {node.level}>.{node.module or ''}", node.lineno))
    return out


def test_src_links_match_the_package_dirs() -> None:
    """``src/moe2/X`` -> ``X/`` for exactly the packages setuptools maps, so mypy checks what
    the install ships and no package escapes it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    top = {name.split(".", 1)[1]: folder for name, folder in package_dir.items()}
    links = {p.name: p for p in (REPO / "src" / "moe2").iterdir()}
    assert set(links) == set(top), (sorted(links), sorted(top))
    for name, link in links.items():
        assert link.is_symlink(), f"src/moe2/{name} must be a link"
        assert link.resolve() == (REPO / top[name]).resolve(), name
    mypy_packages = set(pyproject["tool"]["mypy"]["packages"])
    assert mypy_packages == {f"moe2.{n}" for n in top}
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    for name, folder in top.items():  # every subpackage is in the wheel
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            assert ".".join(("moe2", name, *rel)) in listed, init


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package: str) -> None:
    bad = []
    for path in _sources(package):
        for module, line in _imports(path):
            if module.startswith("<relative"):
                bad.append(f"{path.relative_to(REPO)}:{line} relative import")
                continue
            if not module.startswith("moe2."):
                continue
            target = module.split(".")[1]
            if target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_coordinator_service_imports_no_training_or_process_tools() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _sources("coordinator")
           for m, line in _imports(p) if m.split(".")[0] in COORDINATOR_FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_agent_boxes_need_no_coordinator_extras() -> None:
    """An agent box installs moe2[agent]: no onnxruntime, tokenizers, torch."""
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _sources("agent")
           for m, line in _imports(p)
           if m.split(".")[0] in ("onnxruntime", "tokenizers", "torch", "sklearn", "gguf")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", RUNTIME)
def test_runtime_modules_stay_small(folder: str) -> None:
    big = {str(p.relative_to(REPO)): n for p in _sources(folder)
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these (over {MAX_LINES} lines): {big}"


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import torch\n    from moe2.tools.x import y\n"
                 "    from . import z\n")
    assert [m for m, _ in _imports(f)] == ["torch", "moe2.tools.x", "<relative 1>."]
