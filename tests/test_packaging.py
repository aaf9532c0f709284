"""The package owns one import name: fedrec.* (the folders stay at the top of the repository)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from fedrec.simulation.deploy import write_flower_app

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "client", "shared", "simulation")
BARE_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s)", re.MULTILINE)


def test_no_source_file_imports_a_bare_top_level_name():
    offenders = [str(path.relative_to(ROOT)) for folder in (*FOLDERS, "tests")
                 for path in (ROOT / folder).rglob("*.py") if BARE_IMPORT.search(path.read_text())]
    assert offenders == []


def test_the_app_imports_outside_the_checkout_without_bare_names(tmp_path):
    # From another folder the checkout is not on sys.path: everything must come from the installed fedrec.*,
    # and importing the apps and the CLI must not pull in a top-level server/client/shared/simulation module.
    code = ("import sys, fedrec.server.app, fedrec.client.app, fedrec.simulation.cli; "
            f"print(sorted(set(sys.modules) & {set(FOLDERS)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_component_paths_and_console_script_name_the_package():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedrec.server.app:app",
                                                        "clientapp": "fedrec.client.app:app"}
    assert doc["project"]["scripts"]["fedrec"] == "fedrec.simulation.cli:main"


def test_deploy_local_app_folder_carries_only_its_config(tmp_path):
    app = write_flower_app(tmp_path / "app")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    written = tomllib.loads((app / "pyproject.toml").read_text())
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert written["tool"]["flwr"]["app"]["components"] == repo["tool"]["flwr"]["app"]["components"]
    assert written["tool"]["flwr"]["app"]["config"] == repo["tool"]["flwr"]["app"]["config"]
