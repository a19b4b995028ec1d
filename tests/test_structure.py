"""The code's shape, checked: no import cycle between the project's modules, and no module outside the family
folders that decides by a family's name (it asks the `Family` object instead)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mpt_edge": ROOT / "mpt_edge", "mpt_edge_export": ROOT / "export" / "mpt_edge_export",
            "mpt_edge_runtime": ROOT / "runtime" / "mpt_edge_runtime", "mpt_edge_serve": ROOT / "serve" / "mpt_edge_serve"}
FAMILY_FOLDER = ROOT / "export" / "mpt_edge_export" / "families"


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:     # `from pkg import name`: the module pkg.name, else pkg
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):   # a module's own parents run first
                out.add(target)
    return out


def test_no_import_cycle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from mpt_edge import b_mod\n")
    b.write_text("import mpt_edge.a_mod\n")
    known = {"mpt_edge.a_mod", "mpt_edge.b_mod", "mpt_edge"}
    assert imports("mpt_edge.a_mod", a, known) == {"mpt_edge.b_mod"}
    assert imports("mpt_edge.b_mod", b, known) == {"mpt_edge.a_mod"}


def family_names() -> set[str]:
    from mpt_edge_export.families import FAMILIES

    return set(FAMILIES)


def decisions_by_family_name(source: str, names: set[str]) -> list[str]:
    """Places in `source` that decide by a family's name: a comparison with it (==, !=, in), a mapping keyed by
    it, or a family looked up by a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            literals = [o for o in operands if isinstance(o, ast.Constant) and o.value in names]
            literals += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                         if isinstance(e, ast.Constant) and e.value in names]
            if literals:
                found.append(f"line {node.lineno}: compares with {literals[0].value!r}")
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if keys:
                found.append(f"line {node.lineno}: a mapping keyed by {keys[0]!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "adapter_for", "family_named"):
            if any(isinstance(a, ast.Constant) and a.value in names for a in node.args):
                found.append(f"line {node.lineno}: looks a family up by name")
    return found


def test_no_module_outside_the_family_folders_decides_by_a_family_name():
    names = family_names()
    offenders = [f"{path.relative_to(ROOT)} {place}" for path in modules().values()
                 if FAMILY_FOLDER not in path.parents for place in decisions_by_family_name(path.read_text(), names)]
    offenders += [f"{path.relative_to(ROOT)} {place}" for path in (ROOT / "bench").glob("*.py")
                  for place in decisions_by_family_name(path.read_text(), names)]
    assert not offenders, "ask the Family object instead: " + "; ".join(offenders)


def test_the_family_name_check_finds_each_kind_of_decision():
    names = {"causal", "encoder"}
    source = ('if backbone.family == "encoder": pass\n'
              'if family not in ("causal",): pass\n'
              'TYPES = {"causal": 1}\n'
              'adapter_for("encoder")\n'
              'message = "needs a causal backbone"\n')
    assert [place.split(":")[0] for place in decisions_by_family_name(source, names)] == ["line 1", "line 2", "line 3",
                                                                                          "line 4"]
