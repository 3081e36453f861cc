"""The import layering of docs/design.md, read from its "Layers" table and enforced on the code.

Each table row names a layer, where its code lives and what it depends on. A module of a
checked layer may import, from this repository (``eve_megatron.*``, ``tools.*``), only its
own layer and the layers its row names under "depends on" (by name, or by module for a
one-file layer: ``mcore_compat``). Every import counts, also one inside a function.
Changing the layering means changing the table: this test follows it.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DESIGN = os.path.join(ROOT, "docs", "design.md")
CHECKED = ("Megatron-Core compat", "CPU backend", "checksums", "outputs", "release rules",
           "model", "data", "launch")
"""Layers whose rows hold (issue 12: model and data import nothing from training, HF or
tools). Not checked, because the code imports more than their rows name: parallel (the CPU
backend), training (parallel, outputs, launch, checksums), conversion / HF (release rules,
training, data, checksums, outputs, parallel, launch) and tools (release rules)."""
FOUNDATION = ("eve_megatron.mcore_compat",)
"""Megatron-Core by another name (design.md: "the ONE place our code reaches Megatron-Core
private names"), so a layer that uses Megatron-Core may import it even where its row names
only megatron.core; it imports no other eve_megatron module."""
BUILT = {"eve_megatron._C": "csrc/"}
"""Extension modules without a .py file -> the source folder they are built from (setup.py)."""


def layer_table(path: str = DESIGN) -> Dict[str, Tuple[List[str], List[str]]]:
    """``{layer: (where paths, layers it depends on)}`` from the page's Layers table."""
    text = open(path, encoding="utf-8").read()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header = [h.lower() for h in rows[0]]
    i_layer, i_where, i_dep = header.index("layer"), header.index("where"), header.index("depends on")
    body = [r for r in rows[2:] if len(r) == len(header)]
    names = {r[i_layer].lower(): r[i_layer] for r in body}
    for r in body:  # a one-file layer is also named by its module ("mcore_compat")
        for w in re.findall(r"`([^`]+)\.py`", r[i_where]):
            names.setdefault(os.path.basename(w).lower(), r[i_layer])
    table = {}
    for r in body:
        where = re.findall(r"`([^`]+)`", r[i_where])
        deps = [d.strip().lower() for d in re.sub(r"\([^)]*\)", "", r[i_dep]).split(",")]
        table[r[i_layer]] = (where, [names[d] for d in deps if d in names])
    return table


def layer_of(rel_path: str, table) -> Optional[str]:
    """The layer whose "where" holds ``rel_path`` (longest match), or None."""
    best, best_len = None, -1
    for layer, (where, _) in table.items():
        for w in where:
            hit = rel_path.startswith(w) if w.endswith("/") else rel_path == w
            if hit and len(w) > best_len:
                best, best_len = layer, len(w)
    return best


def module_path(module: str, root: str = ROOT) -> Optional[str]:
    """Repository-relative file of ``module`` (``eve_megatron.x.y`` or ``tools.x``)."""
    if module in BUILT:
        return BUILT[module]
    base = module.replace(".", "/")
    for cand in (base + ".py", base + "/__init__.py"):
        if os.path.exists(os.path.join(root, cand)):
            return cand
    return None


def imported_modules(rel_path: str, root: str = ROOT) -> List[Tuple[int, str]]:
    """``(line, module)`` of every repository-internal import of a file, anywhere in it."""
    tree = ast.parse(open(os.path.join(root, rel_path), encoding="utf-8").read())
    package = os.path.dirname(rel_path).replace("/", ".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if module_path(sub, root) else base))
    return sorted({(n, m) for n, m in out if m.split(".")[0] in ("eve_megatron", "tools")})


def files_of(layer: str, table, root: str = ROOT) -> List[str]:
    """Every .py file under the layer's "where" paths that maps to this layer."""
    files = []
    for w in table[layer][0]:
        full = os.path.join(root, w)
        if w.endswith(".py"):
            files += [w] if os.path.exists(full) else []
            continue
        for folder, _, names in os.walk(full):
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    return sorted(f for f in set(files) if layer_of(f, table) == layer)


def violations(layer: str, table, root: str = ROOT) -> List[str]:
    """``file:line imports module (layer X)`` for each import the table does not allow."""
    allowed = {layer, *table[layer][1]}
    bad = []
    for rel in files_of(layer, table, root):
        for line, module in imported_modules(rel, root):
            if module in FOUNDATION:
                continue
            path = module_path(module, root)
            target = layer_of(path, table) if path else None
            if target not in allowed:
                bad.append(f"{rel}:{line} imports {module} (layer {target})")
    return bad


def test_the_table_is_read():
    table = layer_table()
    assert set(CHECKED) <= set(table), sorted(table)
    assert table["training"][1] == ["model", "data"]
    assert table["CPU backend"][1] == ["Megatron-Core compat"]  # named by its module
    assert "eve_megatron/models/" in table["model"][0]
    assert len(files_of("model", table)) >= 10 and len(files_of("data", table)) >= 8


@pytest.mark.parametrize("layer", CHECKED)
def test_layer_imports_only_what_design_md_allows(layer):
    table = layer_table()
    bad = violations(layer, table)
    assert not bad, (f"{layer} may import only {sorted({layer, *table[layer][1]})} "
                     f"(docs/design.md, Layers):\n" + "\n".join(bad))


def test_foundation_imports_no_eve_megatron_module():
    for module in FOUNDATION:
        rel = module_path(module)
        if rel is not None:  # not written yet: nothing to check
            assert imported_modules(rel) == [], rel


def test_shipped_hf_code_imports_no_eve_megatron():
    """design.md: the shipped code "depends on torch, transformers, numpy and Pillow only,
    never on eve_megatron" (so data may import its image and prompt rules)."""
    from eve_megatron.hf.export_files import CODE_FILES

    shipped = {f"eve_megatron.hf.{name[:-3]}" for name in CODE_FILES}
    for name in CODE_FILES:
        rel = f"eve_megatron/hf/{name}"
        outside = [(n, m) for n, m in imported_modules(rel) if m not in shipped]
        assert not outside, (rel, outside)


def test_a_forbidden_import_is_caught(tmp_path):
    """The checker on a copy of the code with a lazy import added to a model and two data
    modules: of training, of the HF layer, of something no layer holds."""
    import shutil

    table = layer_table()
    shutil.copytree(os.path.join(ROOT, "eve_megatron"), tmp_path / "eve_megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    before = violations("model", table, str(tmp_path)) + violations("data", table, str(tmp_path))
    injected = {"eve_megatron/models/eve/rope.py": "from eve_megatron.training import optim",
                "eve_megatron/data/loader.py": "import eve_megatron.hf.export",
                "eve_megatron/data/images.py": "from tools.checkpoint import export_hf"}
    for rel, line in injected.items():
        with open(tmp_path / rel, "a") as f:
            f.write(f"\n\ndef _late():\n    {line}\n")
    after = violations("model", table, str(tmp_path)) + violations("data", table, str(tmp_path))
    new = [b for b in after if b not in before]
    assert sorted(b.split(":")[0] for b in new) == sorted(injected), new
    assert [b.rsplit("(", 1)[1] for b in new] == ["layer training)", "layer None)",
                                                  "layer conversion / HF)"], new
