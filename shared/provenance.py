"""Versions of fedrec and of the dependencies its privacy claims rest on, read from package metadata (nothing imported)."""

from __future__ import annotations

import platform
from importlib import metadata

# The distributions whose code decides what a run releases or how its epsilon is computed: the federation (flwr),
# DP-SGD (opacus, torch), the audit's accountant (dp-accounting), noise and sums (numpy), secure aggregation
# (cryptography).
PACKAGES = ("fedrec", "flwr", "opacus", "torch", "dp-accounting", "numpy", "cryptography")


def versions() -> dict[str, str | None]:
    """{distribution: version (None where it is not installed), 'python': the interpreter's version}."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def describe(found: dict[str, str | None]) -> str:
    """One line of versions, in PACKAGES order then python ('fedrec 0.1.0, flwr 1.42.0, ...'), whatever order a
    file stored them in."""
    order = [*PACKAGES, "python"]
    names = sorted(found, key=lambda name: order.index(name) if name in order else len(order))
    return ", ".join(f"{name} {found[name] or 'not installed'}" for name in names)


def version_text() -> str:
    """`fedrec --version`: fedrec's version on the first line, then one line per dependency."""
    found = versions()
    lines = [f"fedrec {found.pop('fedrec') or 'unknown (not installed as a distribution)'}"]
    lines += [f"  {name} {version or 'not installed'}" for name, version in found.items()]
    return "\n".join(lines)
