"""The lean runtime distribution (`runtime/pyproject.toml`, `mpt-edge-runtime`): it imports nothing beyond the
standard library and what it declares, it declares what it imports, and it agrees with the kit (`mpt-edge`,
the repository root), which contains the same package. No torch: `make test-lean` runs this file against the
lean install alone (MPT_EDGE_LEAN=1), where the last test checks that install itself."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpt_edge_runtime

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mpt_edge_runtime.__file__).parent          # in the lean run: the installed copy
DECLARED = {"numpy", "tokenizers", "safetensors"}          # runtime/pyproject.toml's dependencies
BACKENDS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
IMPORT_NAMES = {"numpy": "numpy", "tokenizers": "tokenizers", "safetensors": "safetensors",
                "onnxruntime": "onnxruntime"}              # top-level module → the distribution(s) that hold it
NEVER = ("torch", "transformers", "typer", "rich", "click", "huggingface_hub", "onnx", "ray", "fastapi",
         "mpt_edge", "mpt_edge_export", "mpt_edge_serve")
STDLIB = set(sys.stdlib_module_names) | set(sys.builtin_module_names)


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _closure(names: set[str]) -> set[str]:
    """The installed distributions `names` need, transitively (requirements under an extra left out)."""
    seen, todo = set(), [n.lower().replace("_", "-") for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r.replace("extra==", "extra ==")]
    return seen


def test_importing_the_runtime_loads_only_the_standard_library_and_its_dependencies():
    code = ("import importlib, json, pkgutil, sys; before = set(sys.modules); import mpt_edge_runtime; "
            "[importlib.import_module('mpt_edge_runtime.' + m.name) for m in pkgutil.iter_modules(mpt_edge_runtime.__path__)]; "
            "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert not loaded & set(NEVER), f"the runtime imports {sorted(loaded & set(NEVER))}"
    allowed = _closure(DECLARED | set(BACKENDS.values()))
    owners = md.packages_distributions()
    foreign = {m: owners.get(m, ["?"]) for m in loaded - STDLIB - {"mpt_edge_runtime"}
               if not {d.lower().replace("_", "-") for d in owners.get(m, [])} & allowed}
    assert not foreign, f"modules outside the runtime's declared dependencies: {foreign}"


def test_the_runtime_declares_exactly_what_its_code_imports():
    imported = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - STDLIB - {"__future__", "mpt_edge_runtime"}
    assert third_party <= set(IMPORT_NAMES), f"imports nobody declared: {sorted(third_party - set(IMPORT_NAMES))}"
    project = _pyproject(ROOT / "runtime" / "pyproject.toml")["project"]
    declared = {_name(r) for r in project["dependencies"]}
    assert declared == DECLARED == {IMPORT_NAMES[m] for m in third_party} - {"onnxruntime"}
    assert {k: [_name(r) for r in v] for k, v in project["optional-dependencies"].items()} == \
        {k: [v] for k, v in BACKENDS.items()}


def test_the_runtime_and_the_kit_agree_on_version_and_requirements():
    kit, lean = _pyproject(ROOT / "pyproject.toml"), _pyproject(ROOT / "runtime" / "pyproject.toml")
    assert lean["project"]["name"] == "mpt-edge-runtime"
    assert lean["project"]["version"] == kit["project"]["version"] == mpt_edge_runtime.__version__
    assert set(lean["project"]["dependencies"]) <= set(kit["project"]["dependencies"])
    for extra in BACKENDS:
        assert lean["project"]["optional-dependencies"][extra] == kit["project"]["optional-dependencies"][extra]
    assert lean["tool"]["setuptools"]["packages"] == ["mpt_edge_runtime"]
    # the kit installs with one command and no index holding mpt-edge-runtime: it carries the package itself
    assert "runtime" in kit["tool"]["setuptools"]["packages"]["find"]["where"]
    assert not any(_name(r) == "mpt-edge-runtime" for r in kit["project"]["dependencies"])


@pytest.mark.skipif(os.environ.get("MPT_EDGE_LEAN") != "1", reason="only against the lean install (make test-lean)")
def test_the_lean_install_is_the_runtime_alone():
    assert md.version("mpt-edge-runtime") == mpt_edge_runtime.__version__
    assert Path(mpt_edge_runtime.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    assert "mpt-edge" not in installed
    assert not installed & {"torch", "transformers", "typer", "rich", "onnx", "ray", "fastapi", "peft"}
    extras = _closure({"pytest"}) - _closure({"mpt-edge-runtime", "onnxruntime"})
    assert installed - extras - {"pip", "setuptools"} <= _closure({"mpt-edge-runtime", "onnxruntime"})
