"""pyproject.toml's MLX floor is a version whose Python API has every MLX name the code uses.

The floor's API is recorded in fixtures/mlx_api_floor.json (made by fixtures/make_mlx_api_floor.py
with that version installed). A name missing there means the code needs a newer MLX: raise the
floor and record it again.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = json.loads((REPO / "tests" / "fixtures" / "mlx_api_floor.json").read_text())
SOURCES = [*(REPO / "mlx_sd").rglob("*.py"), *(REPO / "convert").rglob("*.py"), *(REPO / "grpc_service").rglob("*.py")]


def mlx_names(tree: ast.AST) -> set[tuple[str, str]]:
    """(module, name) of each MLX attribute the code reads: `mx.x`, `mx.fast.x`, `nn.X`, and names
    imported with `from mlx... import x`."""
    aliases: dict[str, str] = {}
    used: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx."):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in FLOOR["modules"]:
                    aliases[alias.asname or alias.name] = submodule
                else:
                    used.add((node.module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if f"{module}.{node.attr}" not in FLOOR["modules"]:
                used.add((module, node.attr))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and isinstance(node.value.value, ast.Name) and node.value.value.id in aliases):
            module = f"{aliases[node.value.value.id]}.{node.value.attr}"
            if module in FLOOR["modules"]:
                used.add((module, node.attr))
    return used


def test_every_mlx_name_the_code_uses_exists_in_the_floor_version() -> None:
    missing = sorted(f"{path.relative_to(REPO)}: {module}.{name}"
                     for path in SOURCES for module, name in mlx_names(ast.parse(path.read_text()))
                     if module in FLOOR["modules"] and name not in FLOOR["modules"][module]
                     and not name.startswith("__"))  # module metadata such as __version__
    assert not missing, f"not in mlx {FLOOR['version']} (raise the floor, then record it again): {missing}"


def test_the_recorder_sees_the_names_it_should() -> None:
    tree = ast.parse("import mlx.core as mx\nimport mlx.nn as nn\nfrom mlx.utils import tree_flatten\n"
                     "mx.clear_streams(); mx.fast.layer_norm; nn.Linear; mx.not_an_api")
    assert mlx_names(tree) >= {("mlx.core", "clear_streams"), ("mlx.core.fast", "layer_norm"),
                               ("mlx.nn", "Linear"), ("mlx.utils", "tree_flatten"), ("mlx.core", "not_an_api")}
    assert "not_an_api" not in FLOOR["modules"]["mlx.core"] and "clear_streams" in FLOOR["modules"]["mlx.core"]


def test_pyproject_requires_the_recorded_floor() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = project["project"]["dependencies"] + project["build-system"]["requires"]
    floors = {m.group(1) for r in requirements if (m := re.match(r"mlx(?:\[cpu\])?\s*>=\s*([\d.]+)", r))}
    assert floors == {FLOOR["version"]}
