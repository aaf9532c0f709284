"""The sides stay apart: the server never imports device code, shared/ neither side, and no client module imports
the ClientApp module it is wired into (what both sides agree on lives in shared/protocol.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package (fedrec.<folder>)."""
    package = f"fedrec.{path.parent.name}"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_server_never_imports_device_code_and_shared_imports_neither_side():
    for folder, forbidden in (("server", ("fedrec.client",)), ("shared", ("fedrec.client", "fedrec.server", "flwr"))):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = sorted(n for n in imported(path) if n.startswith(forbidden))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_client_module_imports_the_client_app_module():
    for path in sorted((ROOT / "client").glob("*.py")):
        if path.name != "app.py":
            assert not {n for n in imported(path) if n == "fedrec.client.app" or n.startswith("fedrec.client.app.")}, \
                path.name
