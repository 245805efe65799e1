"""The layering the README's Architecture section promises: a module of cm_core imports only modules of the layers
below it, so the library never imports a face (CLI, experiments, report) and data/backends know nothing of methods."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cm_core"

# lowest first; a module may import any module of a lower layer, none of its own or a higher one
LAYERS = [
    {"errors"},
    {"data", "bank", "embeddings", "backends", "shrink"},
    {"prompts", "paper", "upload", "misalign", "em"},
    {"methods"},
    {"baselines", "paper_methods", "marginalize", "training"},
    {"cm"},
    {"registry"},
    {"evaluate"},
    {"report"},
    {"experiments", "cli", "__init__"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """cm_core modules imported by the file (relative or absolute), as their top-level name in the package."""
    out = set()
    depth_pkg = len(path.relative_to(PKG).parts) - 1  # 0 for cm_core/x.py, 1 for cm_core/backends/x.py
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to cm_core, then the first part names the module
                if node.level - 1 < depth_pkg:
                    continue  # within the same subpackage
                mod = node.module or ""
                names = [mod.split(".")[0]] if mod else [a.name for a in node.names]
            elif (node.module or "").startswith("cm_core"):
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cm_core."):
                    out.add(a.name.split(".")[1])
    return out


def test_every_module_has_a_layer():
    tops = {_top(p) for p in PKG.rglob("*.py")}
    assert tops <= set(LAYER), f"add to LAYERS: {sorted(tops - set(LAYER))}"


def test_imports_only_go_down():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _top(path)
        for dep in _imports(path):
            if dep == me or dep not in LAYER:
                continue
            if me != "__init__" and LAYER[dep] >= LAYER[me]:
                bad.append(f"{path.relative_to(PKG)} imports {dep}")
    assert bad == []
