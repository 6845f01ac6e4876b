"""The trust boundary is in the import graph, checked by import-linter's contracts in pyproject.toml.

``make test`` runs ``lint-imports`` on the package; these tests run it too and show, on a temporary
copy of the package (never inside ``src/``), that each contract breaks when its rule is broken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "ppcmi"
LINT = Path(sys.executable).with_name("lint-imports")
PROBE = "ppcmi_probe"  # the copy's name: nothing installed can shadow it

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), str(config), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_package_keeps_every_contract():
    res = subprocess.run([str(LINT), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in res.stdout


def test_every_top_level_module_has_a_layer():
    """A new module must be placed in the layer table, or the layers contract would not see it."""
    layers = next(c for c in _contracts() if c["id"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in re.split(r"[|:]", layer)}
    present = {f"ppcmi.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__init__"}
    present |= {f"ppcmi.{p.parent.name}" for p in PKG.glob("*/__init__.py")}
    assert present == placed, f"not in the layer table: {sorted(present - placed)}; gone: {sorted(placed - present)}"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the package named ``ppcmi_probe`` and the contracts rewritten for it."""
    root = tmp_path_factory.mktemp("lint")
    shutil.copytree(PKG, root / PROBE, ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "pyproject.toml").read_text()
    section = text[text.index("[tool.importlinter]"):]
    config = root / "contracts.toml"
    config.write_text(re.sub(r"\bppcmi\b", PROBE, section))
    return root, config


VIOLATIONS = [
    # (file in the package, line appended, contract that must break)
    ("server/mapping.py", "from ..client.keys import load_key", "coordinator"),
    ("server/service.py", "from ..privacy import attacks", "coordinator"),
    ("flower/server_app.py", "from ..data import discover_cases", "coordinator"),
    ("client/inference.py", "from ..server.mapping import MappingServer", "hospital"),
    ("privacy/attacks.py", "from ..klt import KEY_BYTES", "attacks"),
    ("privacy/procedures.py", "from ..client.site import Hospital", "attacks"),
    ("privacy/views.py", "from .run import Run", "attacks"),
    ("protocol.py", "from .config import Config", "layers"),
    ("config.py", "from .data import Preprocess", "layers"),
    ("data/readers.py", "from .discovery import Case", "acyclic"),
]


@pytest.mark.parametrize("where,line,contract", VIOLATIONS, ids=[f"{c}:{w}" for w, _, c in VIOLATIONS])
def test_each_contract_catches_its_violation(probe, where, line, contract):
    root, config = probe
    path = root / PROBE / where
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}\n")
        res = _lint(root, config)
    finally:
        path.write_text(original)
    name = next(c["name"] for c in _contracts() if c["id"] == contract)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{name} BROKEN" in " ".join(res.stdout.split()), res.stdout  # (lint-imports wraps long names)


def test_the_untouched_copy_keeps_every_contract(probe):
    res = _lint(*probe)
    assert res.returncode == 0, res.stdout + res.stderr
