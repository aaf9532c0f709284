"""A deployed device (one SuperNode): its own file, state that survives restarts, and `fedrec recommend`."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedrec.client.app import build_client_app
from fedrec.client.nodes import MODEL_FILE, NODE_FILE, STATE_FILE
from fedrec.shared import protocol as P
from fedrec.shared.config import RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.loaders import load_taobao
from fedrec.shared.data.prepare import prepare_log
from fedrec.shared.state import load_item_model
from fedrec.simulation.cli import main
from tests.helpers import message, plan, tables

CONFIG = RunConfig(embedding_dim=4, num_negatives=3, epsilon_budget=8.0)


@pytest.fixture
def prepared(tmp_path):
    """A behaviour log of 8 users over 20 items, prepared into per-device files and a catalogue."""
    rows = [f"{u},{100 + i},{i % 4},{'pv' if (u + i) % 3 else 'buy'},{1511000000 + 60 * i + u}"
            for u in range(1, 9) for i in range(1, 21) if (u * 7 + i) % 3 == 0 or i <= 3]
    (tmp_path / "UserBehavior.csv").write_text("\n".join(rows) + "\n")
    prepare_log(load_taobao(tmp_path), tmp_path / "prep", dataset="taobao")
    return tmp_path / "prep"


def node_context(prepared, state, device_file="0.csv", node_id=7):
    node_config = {"data-path": str(prepared / "devices" / device_file),
                   "catalogue-path": str(prepared / "catalogue.csv"), "state-path": str(state),
                   "device-id": device_file.rsplit(".", 1)[0]}
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def train_request(t, server_round, device="0"):
    content = RecordDict({P.TABLES: ArrayRecord({k: Array(v) for k, v in P.tables_to_arrays(t).items()}),
                          P.PLAN: ConfigRecord(plan(server_round=server_round, noise_multiplier=2.0).to_config()),
                          P.COHORT: ConfigRecord({P.DEVICE_IDS: [device], P.DELTA_CLIP: 0.0})})
    return message(content, dst=7, message_type="train")


def test_a_device_trains_from_its_own_file_and_its_budget_survives_a_restart(prepared, tmp_path):
    items = Catalogue.read_csv(prepared / "catalogue.csv").num_items
    t = tables(num_items=items, dim=4)
    state = tmp_path / "state"
    hello = build_client_app(CONFIG)(message(RecordDict(), dst=7, message_type="query"), node_context(prepared, state))
    assert hello.content[P.DEVICE][P.DEVICE_IDS] == ["0"]
    first = build_client_app(CONFIG)(train_request(t, 1), node_context(prepared, state))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    eps1 = first.content[P.REPORT]["epsilon"][0]
    assert {p.name for p in state.iterdir()} >= {STATE_FILE, MODEL_FILE, NODE_FILE}
    assert load_item_model(state / MODEL_FILE)[1] == 1
    # a new process (new ClientApp, empty Context) continues from the files: epsilon grows, never resets
    second = build_client_app(CONFIG)(train_request(t, 2), node_context(prepared, state))
    eps2 = second.content[P.REPORT]["epsilon"][0]
    assert eps2 > eps1 > 0


def test_a_deployed_reply_freezes_the_heap_for_the_exit_and_the_next_message_thaws_it(prepared, tmp_path):
    """Flower 1.42 ends a deployed ClientApp process after one reply: frozen objects spare its exit the cycle
    collections (import_bench: wall - reply). A process that answers again must collect as usual."""
    app = build_client_app(CONFIG)
    hello = message(RecordDict(), dst=7, message_type="query")
    gc.unfreeze()
    assert not app(hello, node_context(prepared, tmp_path / "state")).has_error()
    assert gc.get_freeze_count() > 0
    simulated = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                        state=RecordDict(), run_config={})
    app(hello, simulated)  # a simulation's worker answers many messages: it must not keep the heap frozen
    assert gc.get_freeze_count() == 0


def test_a_corrupt_state_stops_the_device_instead_of_resetting_its_budget(prepared, tmp_path, caplog):
    items = Catalogue.read_csv(prepared / "catalogue.csv").num_items
    state = tmp_path / "state"
    build_client_app(CONFIG)(train_request(tables(num_items=items, dim=4), 1), node_context(prepared, state))
    (state / STATE_FILE).write_text((state / STATE_FILE).read_text()[:-20])
    reply = build_client_app(CONFIG)(train_request(tables(num_items=items, dim=4), 2), node_context(prepared, state))
    assert reply.has_error() and reply.error.reason == "device-state"  # a code to the server,
    assert STATE_FILE in caplog.text and "refusing to train" in caplog.text  # the reason in the device's log


def test_node_config_errors_name_what_is_missing(prepared, tmp_path, caplog):
    context = node_context(prepared, tmp_path / "state")
    del context.node_config["catalogue-path"]
    reply = build_client_app(CONFIG)(message(RecordDict(), dst=7, message_type="query"), context)
    assert reply.has_error() and reply.error.reason == "node-config" and "catalogue-path" in caplog.text
    other = build_client_app(CONFIG)(train_request(tables(num_items=3, dim=4), 1, device="5"),
                                     node_context(prepared, tmp_path / "state"))
    assert other.has_error() and other.error.reason == "bad-message" and "does not host" in caplog.text


def test_recommend_lists_unseen_items_with_titles(prepared, tmp_path, capsys):
    catalogue = Catalogue.read_csv(prepared / "catalogue.csv")
    state = tmp_path / "state"
    build_client_app(CONFIG)(train_request(tables(num_items=catalogue.num_items, dim=4), 1),
                             node_context(prepared, state))
    assert main(["recommend", "--state-path", str(state), "--catalogue", str(prepared / "catalogue.csv"),
                 "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top 5") and len(lines) == 6
    seen = {catalogue.item_ids[i] for i in np.loadtxt(prepared / "devices" / "0.csv", delimiter=",", skiprows=1,
                                                      usecols=0, dtype=int, ndmin=1)}
    shown = [line.split("[item ")[1].split(",")[0] for line in lines[1:]]
    assert len(set(shown)) == 5 and not set(shown) & seen
    assert main(["recommend", "--state-path", str(tmp_path / "nowhere"), "--catalogue",
                 str(prepared / "catalogue.csv")]) == 2
