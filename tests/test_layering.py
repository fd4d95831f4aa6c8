"""The library's rooms keep their boundaries (read from the source, so the test needs no imports).

Recipes sit on top; training, data, models, losses, weighting, distributed and eval below; the
kernels (``wmtp.kernels``) at the bottom. Two rooms never import each other,
evaluation never reaches up into training, data never into evaluation, the kernels import no room,
and recipes take what they need from the library, never from the kernels directly.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("config", "data", "distributed", "eval", "losses", "models", "training", "weighting")
"""Rooms above the kernels (wmtp/kernels)."""
FORBIDDEN = {("eval", "training"), ("data", "eval")}
"""(importer, imported) pairs named by the layout rules, besides any pair of rooms in both directions."""


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "wmtp" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS or parts[1] == "kernels" else None


def _room_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for room in ROOMS:
        for path in sorted((ROOT / "wmtp" / room).rglob("*.py")):
            for module in _imported_modules(path):
                target = _room(module)
                if target is not None and target != room:
                    edges[(room, target)].append(f"{path.relative_to(ROOT)} imports {module}")
    for path in sorted((ROOT / "wmtp" / "kernels").rglob("*.py")):
        for module in _imported_modules(path):
            if module.startswith("wmtp") and not module.startswith("wmtp.kernels"):
                edges[("kernels", _room(module) or module)].append(f"{path.relative_to(ROOT)} imports {module}")
    return edges


def test_the_reader_sees_every_import():
    # The checks below are only as good as the import reader: it must see a known edge.
    edges = _room_edges()
    assert any("imports wmtp.data" in line for line in edges[("eval", "data")])
    assert ("losses", "kernels") in edges


@pytest.mark.parametrize("importer, imported", sorted(FORBIDDEN))
def test_named_boundaries(importer, imported):
    assert _room_edges().get((importer, imported), []) == []


def test_no_two_rooms_import_each_other():
    edges = _room_edges()
    both = {tuple(sorted(pair)) for pair in edges if (pair[1], pair[0]) in edges}
    assert not both, {pair: edges[pair] + edges[pair[::-1]] for pair in both}


def test_kernels_import_no_room():
    assert [lines for (src, _), lines in _room_edges().items() if src == "kernels"] == []


def test_recipes_do_not_import_kernels():
    offenders = [
        f"{path.name} imports {module}"
        for path in sorted((ROOT / "recipes").glob("*.py"))
        for module in _imported_modules(path)
        if module == "wmtp.kernels" or module.startswith("wmtp.kernels.")
    ]
    assert offenders == []
