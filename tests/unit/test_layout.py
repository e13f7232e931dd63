"""Quality gates on the source tree: import direction, documented hooks, packaging, torch-free core."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tessera.core import hookspecs

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("core", "api", "plugins", "backends")
# layer -> the tessera layers its modules must never import
FORBIDDEN = {
    "core": {"api", "plugins", "backends"},
    "api": {"plugins", "backends"},
    "plugins": {"api", "backends"},
    "backends": {"api", "plugins"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, lazy ones inside functions included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(REPO).parent.parts[
                    : len(path.relative_to(REPO).parent.parts) - node.level + 1
                ]
                found.append(
                    (
                        node.lineno,
                        "tessera."
                        + ".".join([*package, *(node.module or "").split(".")]).strip("."),
                    )
                )
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "tessera" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if parts[0] in LAYERS:
        return parts[0]  # a bare `import core` is wrong in itself; the check below names it
    return None


@pytest.mark.parametrize("layer", LAYERS)
def test_import_direction(layer):
    violations = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] in LAYERS:
                violations.append(
                    f"{path.relative_to(REPO)}:{line} imports {module!r}: import through tessera.*"
                )
            target = _layer_of(module)
            if target in FORBIDDEN[layer]:
                violations.append(
                    f"{path.relative_to(REPO)}:{line} imports {module!r} ({layer} must not import {target})"
                )
    assert not violations, "\n".join(violations)


def test_every_hookspec_is_documented():
    docs = (REPO / "docs" / "plugins.md").read_text()
    hooks = [
        name
        for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("tessera_register_")
    ]
    assert set(hooks) == set(hookspecs.PLUGIN_KINDS.values())
    missing = [hook for hook in hooks if f"`{hook}`" not in docs]
    assert not missing, f"hooks not documented in docs/plugins.md: {missing}"


@pytest.mark.parametrize("name", LAYERS)
def test_top_level_folders_are_not_importable_outside_the_repo(name):
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd="/tmp", capture_output=True, text=True
    )
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_every_package_folder_is_declared_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {package: Path(folder) for package, folder in setuptools["package-dir"].items()}
    declared = set(setuptools["packages"])
    found = set()
    for package, folder in folder_of.items():
        if package == "tessera":
            continue
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    missing = sorted(found - declared)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_light_core_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import tessera.core.hookspecs, tessera.core.registry, tessera.core.interfaces, tessera.core.config\n"
        "import tessera.core.plugins, tessera.api.args, tessera.api.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported at start-up: {result.stdout.strip()}"
