"""The package layout is the architecture: imports point one way, towards the screening core.

Reads every module's imports (top level and inside functions) with `ast`, so a
lazy import cannot hide an arrow the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "plugin"
# Highest first: each package may import only those after it (and itself).
LAYERS = ["jobs", "app", "ehr", "web", "stores", "fhir", "screening"]
LEAVES = {"settings", "observability"}  # imported by any package but the core; import no package above them
LEAF_MAY_IMPORT = {"settings": {"screening"}, "observability": set()}


def _unit(module: str) -> str:
    """`plugin.web.pages` -> `web`; `plugin.settings` -> `settings`; `plugin` -> `plugin`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "plugin"


def _from_plugin(name: str) -> str:
    """`from plugin import web` names a package; `from plugin import __version__` names `plugin` itself."""
    is_module = (PLUGIN / name).is_dir() or (PLUGIN / f"{name}.py").is_file()
    return f"plugin.{name}" if is_module else "plugin"


def _imports(path: Path) -> set[str]:
    """The plugin modules a file imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "plugin"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "plugin":
            found |= {_from_plugin(a.name) if node.module == "plugin" else node.module for a in node.names}
    return found


def _modules() -> list[tuple[str, Path]]:
    """(unit, path) of every module; a package's __init__ belongs to its package."""
    named = [(p, [part for part in p.relative_to(PLUGIN).with_suffix("").parts if part != "__init__"])
             for p in sorted(PLUGIN.rglob("*.py"))]
    return [(_unit(".".join(["plugin", *parts])), p) for p, parts in named]


def allowed(source: str, target: str) -> bool:
    if source == target or target == "plugin":  # `plugin` itself holds only __version__
        return True
    if source in LEAVES:
        return target in LEAF_MAY_IMPORT[source]
    if target in LEAVES:
        return source != "screening"
    if source == "plugin":
        return False
    return LAYERS.index(target) > LAYERS.index(source)


def test_every_import_points_towards_the_core() -> None:
    wrong = [f"{path.relative_to(PLUGIN.parent)} imports {target}"
             for source, path in _modules() for target in _imports(path)
             if not allowed(source, _unit(target))]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_module_is_in_a_known_place() -> None:
    units = {source for source, _ in _modules()}
    assert units <= set(LAYERS) | LEAVES | {"plugin"}, units - set(LAYERS) - LEAVES


@pytest.mark.parametrize(("source", "target", "ok"), [
    ("web", "screening", True), ("screening", "web", False), ("screening", "settings", False),
    ("stores", "ehr", False), ("ehr", "web", True), ("web", "ehr", False), ("jobs", "app", True),
    ("settings", "screening", True), ("observability", "web", False), ("fhir", "observability", True),
])
def test_the_rule_itself(source: str, target: str, ok: bool) -> None:
    """The checker would catch a wrong arrow (so its silence above means something)."""
    assert allowed(source, target) is ok


def test_each_package_says_what_it_holds_and_may_import() -> None:
    for package in LAYERS:
        init = PLUGIN / package / "__init__.py"
        if package == "app":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init} needs a docstring saying what it holds"
        assert "import" in doc.lower(), f"{init}'s docstring must say what it may import"
