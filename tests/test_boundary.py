"""The trust boundary is in the import graph: the server never imports hospital code or key handling."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "ppcmi"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # resolve relative imports against the file's package
                pkg = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ((base,) if base else ()))
            mods.add(base)
            mods |= {f"{base}.{a.name}" for a in node.names}
    return mods


def _closure(module_path: Path, seen: set[Path] | None = None) -> set[str]:
    """Every ppcmi module reachable from ``module_path`` through imports."""
    seen = seen if seen is not None else set()
    if module_path in seen:
        return set()
    seen.add(module_path)
    found = set()
    for mod in _imports(module_path):
        if not mod.startswith("ppcmi"):
            continue
        found.add(mod)
        rel = mod.split(".")[1:]
        for cand in (PKG.joinpath(*rel).with_suffix(".py"), PKG.joinpath(*rel, "__init__.py")):
            if rel and cand.exists():
                found |= _closure(cand, seen)
    return found


SERVER_FILES = sorted((PKG / "server").glob("*.py")) + [PKG / "flower" / "server_app.py"]  # the Flower ServerApp too


@pytest.mark.parametrize("path", SERVER_FILES, ids=lambda p: p.name)
def test_server_never_reaches_client_or_keys(path):
    reached = _closure(path)
    bad = {m for m in reached if m.startswith(("ppcmi.client", "ppcmi.klt"))}
    assert not bad, f"{path.name} reaches {sorted(bad)}"


def test_protocol_imports_nothing_of_the_package_but_errors():
    reached = {m for m in _imports(PKG / "protocol.py") if m.startswith("ppcmi")}
    assert reached <= {"ppcmi.errors", "ppcmi.errors.ProtocolError"}, reached


def test_the_check_itself_catches_a_violation(tmp_path):
    bad = PKG / "server" / "_probe_violation.py"
    bad.write_text("from ..client.keys import load_key\n")
    try:
        assert any(m.startswith("ppcmi.client") for m in _closure(bad))
    finally:
        bad.unlink()


@pytest.mark.parametrize("name", ["attacks.py", "membership.py", "dp.py", "__init__.py"])
def test_privacy_attack_maths_never_reach_hospital_code_or_keys(name):
    """The attacker's maths work from what an attacker holds; only the audit orchestration reads keys (for its controls)."""
    reached = _closure(PKG / "privacy" / name)
    bad = {m for m in reached if m.startswith(("ppcmi.client", "ppcmi.klt", "ppcmi.privacy.audit"))}
    assert not bad, f"privacy/{name} reaches {sorted(bad)}"
