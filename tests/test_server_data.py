"""What the ServerApp reads: deployed, the public catalogue alone; the population only for a simulation's baselines."""

from __future__ import annotations

import pytest
from flwr.superlink.grid import InMemoryGrid

import fedrec.server.app as server_app
from fedrec.server.registry import grid_is_simulated
from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.data.loaders import load_movielens
from fedrec.shared.data.prepare import prepare_log
from fedrec.shared.data.prepared import read_server_folder
from fedrec.shared.data.synthetic import SyntheticSpec

from .test_data import write_movielens_latest


class DeployedGrid:
    """Stands for Flower's gRPC grid: anything that is not the simulation's in-memory grid."""


def simulation_grid() -> InMemoryGrid:
    return InMemoryGrid.__new__(InMemoryGrid)  # only its class matters here


@pytest.fixture
def prepared(tmp_path):
    write_movielens_latest(tmp_path / "ml")
    prepare_log(load_movielens(tmp_path / "ml"), tmp_path / "prep", dataset="movielens")
    return tmp_path / "prep"


@pytest.fixture
def no_population(monkeypatch):
    """Fail the test if the server opens any device's events."""

    def refuse(*args, **kwargs):
        raise AssertionError("the server opened the population")

    monkeypatch.setattr(server_app, "open_population", refuse)
    monkeypatch.setattr(SyntheticSpec, "device_events", refuse)


def test_the_simulation_engines_grid_is_recognised():
    import importlib

    engine = importlib.import_module("flwr.simulation.run_simulation")

    assert engine.InMemoryGrid is InMemoryGrid  # the class run_simulation (and flwr-simulation) builds
    assert grid_is_simulated(simulation_grid()) and not grid_is_simulated(DeployedGrid())


def test_a_deployed_server_reads_only_its_server_folder(prepared, no_population):
    config = RunConfig(dataset="prepared", data_path=str(prepared / "server"), min_devices=4, devices=500)
    inputs = server_app.server_inputs(DeployedGrid(), config)
    assert inputs.population is None and inputs.expected_devices == 4 and inputs.catalogue.num_items == 13
    assert inputs.catalogue.titles[0] == "Movie 1, The (2000)"
    # baselines=true (the default) is a simulation feature: still nothing per device
    assert server_app.server_inputs(DeployedGrid(), config.replace(baselines=True)).population is None


def test_a_deployed_server_refuses_a_folder_with_device_data(prepared, no_population):
    with pytest.raises(DataError, match=r"a prepared folder with every device's events; give the server only"):
        server_app.server_inputs(DeployedGrid(), RunConfig(dataset="prepared", data_path=str(prepared)))


def test_a_deployed_server_builds_the_synthetic_catalogue_from_the_seed(no_population):
    config = RunConfig(synthetic_items=30, synthetic_topics=3, baselines=False)
    inputs = server_app.server_inputs(DeployedGrid(), config)
    assert inputs.population is None and inputs.catalogue.num_items == 30 and inputs.expected_devices == 1


def test_only_a_simulation_with_baselines_opens_the_population(prepared):
    config = RunConfig(dataset="prepared", data_path=str(prepared), devices=0)
    inputs = server_app.server_inputs(simulation_grid(), config)
    assert inputs.population is not None and inputs.expected_devices == 6 and inputs.catalogue.num_items == 13
    synthetic = server_app.server_inputs(simulation_grid(), RunConfig(devices=20, synthetic_items=30))
    assert synthetic.population is not None and synthetic.expected_devices == 20


def test_a_simulation_without_baselines_counts_devices_without_reading_them(prepared, no_population):
    inputs = server_app.server_inputs(simulation_grid(), RunConfig(dataset="prepared", data_path=str(prepared),
                                                                   devices=4, baselines=False))
    assert inputs.population is None and inputs.expected_devices == 4 and inputs.catalogue.num_items == 13
    synthetic = server_app.server_inputs(simulation_grid(), RunConfig(devices=20, synthetic_items=30, baselines=False))
    assert synthetic.population is None and synthetic.expected_devices == 20 and synthetic.catalogue.num_items == 30


def test_deploy_local_gives_the_server_a_folder_apart_from_every_device_file(prepared, tmp_path):
    from fedrec.simulation.deploy import deployment_data, server_run_config

    config = RunConfig(dataset="prepared", data_path=str(prepared), devices=0)
    data = deployment_data(config, tmp_path / "deploy")
    assert data.server == tmp_path / "deploy" / "server" and data.catalogue == prepared / "catalogue.csv"
    assert [p.name for p in data.devices] == [f"{k}.csv" for k in range(6)]
    assert sorted(p.name for p in data.server.rglob("*")) == ["catalogue.csv", "manifest.json"]
    assert read_server_folder(data.server)[1]["dataset"] == "movielens"
    run_config = server_run_config(config, data.server, tmp_path / "run")
    assert run_config["data-path"] == str(data.server) and run_config["baselines"] is False
