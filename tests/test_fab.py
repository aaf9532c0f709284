"""What `flwr run` ships: the app bundle (FAB) holds the code, never a run or data folder; no output inside the app."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.prepare import prepare_log
from fedrec.shared.data.prepared import flower_app_holding
from fedrec.server.app import check_output_folders
from fedrec.simulation.deploy import deploy_local

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "README.md", ".gitignore")
PROJECT_FOLDERS = ("server", "client", "shared", "simulation", "tests", "docs")


def project_copy(tmp_path: Path) -> Path:
    """The checkout's tracked layout (no .venv or build output) in a folder named like the app."""
    app = tmp_path / "fedrec"
    app.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, app / name)
    for name in PROJECT_FOLDERS:
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return app


def fake_run(folder: Path) -> set[str]:
    """A run and deployment folder's personal files: state, ledger, events, summary."""
    files = {"state.json": "{}", "ledger.jsonl": '{"round": 1}\n', "metrics.jsonl": "{}\n", "summary.json": "{}",
             "devices/0.csv": "item_index,timestamp,weight\n1,2,1\n", "device-state/0/state.json": "{}",
             "data/manifest.json": '{"num_devices": 3}', "server/manifest.json": "{}", "notes.md": "# run\n",
             "report.toml": "x = 1\n"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return set(files)


def fab_names(app: Path) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return set(fab.namelist())


@pytest.mark.parametrize("keep_gitignore", [True, False])
def test_the_fab_ships_code_and_no_run_or_data_file(tmp_path, keep_gitignore):
    app = project_copy(tmp_path)
    if not keep_gitignore:  # fab-include alone must keep them out
        (app / ".gitignore").unlink()
    run_files = {f"runs/20250101-000000/{name}" for name in fake_run(app / "runs" / "20250101-000000")}
    run_files |= {f"my-run/{name}" for name in fake_run(app / "my-run")}  # a name .gitignore does not know
    run_files |= {f"server/run/{name}" for name in fake_run(app / "server" / "run")}  # even inside a code folder
    names = fab_names(app)
    assert not names & run_files, sorted(names & run_files)
    shipped_data = sorted(n for n in names if n.rsplit(".", 1)[-1] in ("json", "jsonl", "csv", "npz", "npy"))
    assert shipped_data == []
    assert {"pyproject.toml", "README.md", "server/app.py", "server/loop.py", "client/app.py", "shared/model.py",
            "shared/data/prepared.py", "simulation/deploy.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "docs/"))]
    expected_code = {p.relative_to(app).as_posix() for folder in ("server", "client", "shared", "simulation")
                     for p in (app / folder).rglob("*.py") if "run" not in p.relative_to(app).parts}
    assert names - {".info/CONTENT"} == expected_code | {"pyproject.toml", "README.md"}


def test_the_repository_itself_builds_a_fab_with_the_app_components():
    """fab-include patterns must each match a file (Flower 1.42 refuses the build otherwise)."""
    names = fab_names(ROOT)
    assert {"server/app.py", "client/app.py", "pyproject.toml"} <= names
    assert all(n.endswith(".py") or n in ("pyproject.toml", "README.md", ".info/CONTENT") for n in names)


def test_output_folders_inside_the_flower_app_are_refused(tmp_path):
    app = project_copy(tmp_path)
    assert flower_app_holding(app / "runs" / "x") == app and flower_app_holding(tmp_path / "elsewhere") is None
    with pytest.raises(ConfigError, match=rf"out-dir {app}/my-run: inside the Flower app folder {app} .*outside"):
        check_output_folders(RunConfig(out_dir=str(app / "my-run")))
    check_output_folders(RunConfig(out_dir=str(app / "runs" / "x")))  # runs/: ignored and never in the bundle
    with pytest.raises(ConfigError, match=rf"state-dir {app}/state: inside the Flower app folder {app}"):
        check_output_folders(RunConfig(out_dir=str(tmp_path / "run"), state_dir=str(app / "state")))
    check_output_folders(RunConfig(out_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state")))
    with pytest.raises(ConfigError, match=rf"deploy-local --out {app}/deploy: inside the Flower app folder"):
        deploy_local(RunConfig(devices=2), app / "deploy")
    with pytest.raises(ConfigError, match=rf"prepared folder {app}/data: inside the Flower app folder"):
        prepare_log(None, app / "data", dataset="movielens")  # refused before the log is read
    assert not (app / "deploy").exists() and not (app / "data").exists()
