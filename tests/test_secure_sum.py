"""A real secure sum through the real ClientApp: what the server receives is masked, the decrypted sum is the plain
sum plus exactly the noise of the shares, dropouts at each stage, and refusals before commitment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fedrec.client.app import build_client_app
from fedrec.client.nodes import open_node
from fedrec.server.secagg import run_secure_sum
from fedrec.shared import protocol as P
from fedrec.shared.config import RunConfig
from fedrec.shared.device import train_devices
from fedrec.shared.distributed_dp import GridSum
from fedrec.shared.plans import PlanError
from fedrec.shared.secure_release import training_mechanism
from fedrec.shared.state import SlotStateStore
from flwr.app import Context, Message, RecordDict

from tests.helpers import message, plan, tables
from tests.test_messages import arrays_record

DEVICES = 8


def colluders(t_min: int) -> int:
    """The colluders a device's default policy assumes in a sum of threshold t (and the server's 'auto')."""
    return math.ceil(t_min / 10)


class LoopbackGrid:
    """The transport only: each message goes to the real ClientApp of its node, in this process. `drop(stage, node)`
    makes a node miss a stage (no reply, as after a timeout)."""

    def __init__(self, config: RunConfig, drop=lambda stage, node: False) -> None:
        self.client = build_client_app(config)
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config={"partition-id": k,
                                                                                  "num-partitions": DEVICES},
                                          state=RecordDict(), run_config={}) for k in range(DEVICES)}
        self.drop = drop
        self.received: dict[str, list[Message]] = {}
        self.sent: list[Message] = []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            stage, node = m.metadata.message_type.split("_")[-1], m.metadata.dst_node_id
            if self.drop(stage, node):
                continue
            replies.append(self.client(message(m.content, dst=node, message_type=m.metadata.message_type),
                                       self.contexts[node]))
        self.received.setdefault(stage, []).extend(replies)
        return replies


pytestmark = pytest.mark.usefixtures("server_process_identity")  # conftest.py: this test is the server process


@pytest.fixture
def config(tmp_path) -> RunConfig:
    return RunConfig(devices=DEVICES, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12,
                     embedding_dim=4, num_negatives=4, devices_per_round=DEVICES, privacy="distributed",
                     out_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))


def secure_round(config: RunConfig, grid: LoopbackGrid, t_min: int, noise_multiplier: float = 1.0):
    p = plan(privacy="distributed", noise_multiplier=noise_multiplier, lr=0.5, num_negatives=4)
    t = tables(num_items=config.synthetic_items, dim=config.embedding_dim)
    mechanism = training_mechanism(p, t.num_items, t.dim, t_min, colluders(t_min))
    content = {P.TABLES: arrays_record(P.tables_to_arrays(t)), P.PLAN: P_config(p)}
    asked = {100 + k: [f"sim-{k}"] for k in range(DEVICES)}
    replies, total, shares = run_secure_sum(grid, config, 1, "train", content, asked, mechanism, nonce=0,
                                            message_type="train", epsilon_budget=config.epsilon_budget)
    return p, t, mechanism, replies, total, shares


def P_config(p):
    from flwr.app import ConfigRecord

    return ConfigRecord(p.to_config())


def plain_grids(config: RunConfig, p, t, t_min: int, devices: list[str], tmp_state) -> dict[str, np.ndarray]:
    """Each device's quantised update without noise, trained again from a fresh state (training is seeded)."""
    fresh = config.replace(state_dir=str(tmp_state))
    out = {}
    for name in devices:
        k = int(name.split("-")[1])
        context = Context(run_id=1, node_id=100 + k, node_config={"partition-id": k, "num-partitions": DEVICES},
                          state=RecordDict(), run_config={})
        node = open_node(context, fresh)
        device = node.devices(RecordDict({P.COHORT: P_cohort([name])}))[0]
        grid = GridSum.zeros(training_mechanism(p, t.num_items, t.dim, t_min, colluders(t_min)))
        train_devices([device], p, t, secure=grid, t_min=t_min, colluders=colluders(t_min))
        out[name] = grid.total
    return out


def P_cohort(devices):
    from flwr.app import ConfigRecord

    return ConfigRecord({P.DEVICE_IDS: devices, P.NONCE: 0})


def test_the_server_sees_masked_vectors_and_decrypts_the_plain_sum_plus_the_shares_noise(config, tmp_path):
    grid = LoopbackGrid(config)
    p, t, mechanism, replies, total, shares = secure_round(config, grid, t_min=6)
    assert total is not None and shares == DEVICES and len(replies.trained) == DEVICES
    plain = plain_grids(config, p, t, 6, replies.trained, tmp_path / "fresh")
    for reply in grid.received["masked"]:  # every vector the server got is masked: nowhere near the device's own
        device = reply.content[P.DEVICE][P.DEVICE_IDS][0]
        masked = reply.content[P.GRID][P.GRID_SUM].numpy().view(np.int64)
        assert np.median(np.abs(masked.astype(np.float64) - plain[device])) > 2.0**40
    for stage, replies_of_stage in grid.received.items():  # beside the protocol's values: public figures only
        for reply in replies_of_stage:
            assert set(reply.content.keys()) <= {P.REPORT, P.DEVICE, P.GRID, "secagg"}, stage
            assert set(reply.content[P.REPORT].keys()) <= {"declined", "epsilon", "epsilon-subverted", "epsilon-honest",
                                                           P.THRESHOLD, P.COLLUDERS}, stage
            if stage == "masked":  # each device names the t and c it accounted its release with
                assert (reply.content[P.REPORT][P.THRESHOLD], reply.content[P.REPORT][P.COLLUDERS]) == ([6], [1])
            assert P.GRID not in reply.content or stage == "masked"
    residual = total - mechanism.decode(np.sum(list(plain.values()), axis=0))
    # the noise of s = 8 shares, each of variance sigma^2 C'^2 / (t_min - c): std sigma C' sqrt(s / (t_min - c))
    assert np.std(residual) == pytest.approx(mechanism.sum_noise_std(DEVICES), rel=0.15)
    assert mechanism.sum_noise_std(DEVICES) == pytest.approx(1.0 * 0.5 * 1.0 * np.sqrt(DEVICES / 5), rel=1e-9)
    assert abs(np.mean(residual)) < 4 * mechanism.sum_noise_std(DEVICES) / np.sqrt(residual.size)
    # the three figures reported by every device: honest < malicious with c colluders (headline) < own share
    assert all(replies.epsilon_subverted[d] > replies.epsilon[d] > replies.epsilon_honest[d] > 0
               for d in replies.trained)
    assert all(replies.secure_seen[d] == (6, 1) for d in replies.trained)


def test_a_device_dropping_after_its_masked_vector_is_declared_dead_and_the_sum_still_decrypts(config, tmp_path):
    dropped = 103
    grid = LoopbackGrid(config, drop=lambda stage, node: stage == "masked" and node == dropped)
    p, t, mechanism, replies, total, shares = secure_round(config, grid, t_min=6)
    assert total is not None and shares == DEVICES - 1 and "sim-3" not in replies.trained
    plain = plain_grids(config, p, t, 6, replies.trained, tmp_path / "fresh")
    residual = total - mechanism.decode(np.sum(list(plain.values()), axis=0))
    assert np.std(residual) == pytest.approx(mechanism.sum_noise_std(DEVICES - 1), rel=0.15)


def test_a_round_that_cannot_be_decrypted_aborts_before_anyone_trains(config):
    grid = LoopbackGrid(config, drop=lambda stage, node: stage == "shares" and node >= 105)  # 5 of 8 left, t = 6
    _, _, _, replies, total, shares = secure_round(config, grid, t_min=6)
    assert total is None and not replies.trained and "masked" not in grid.received
    for k in range(DEVICES):  # nobody trained, nobody was charged
        state = SlotStateStore(config.state_dir, f"sim-{k}").load()
        assert state is None or not state.history


def test_too_few_masked_vectors_abort_the_round(config):
    grid = LoopbackGrid(config, drop=lambda stage, node: stage == "masked" and node >= 104)  # 4 of 8 mask, t = 6
    _, _, _, replies, total, _ = secure_round(config, grid, t_min=6)
    assert total is None and len(replies.trained) == 4


def test_a_device_whose_policy_demands_a_larger_threshold_refuses_before_committing(config):
    strict = config.replace(device_policy="min-aggregation-threshold=7")
    grid = LoopbackGrid(strict)
    _, _, _, replies, total, _ = secure_round(strict, grid, t_min=6)
    assert total is None and not replies.trained
    assert set(replies.refused.values()) == {"min-aggregation-threshold"}
    assert all(P.GRID not in r.content and "secagg" not in r.content for r in grid.received["keys"])


@pytest.mark.parametrize("engine,mode,aggregation", [
    pytest.param("device", "distributed", "real", marks=pytest.mark.e2e), ("cohort", "user", "modelled")])
def test_a_secure_mode_run_states_both_figures_and_its_audit_recomputes_them(tmp_path, engine, mode, aggregation,
                                                                             monkeypatch):
    from fedrec.server.audit import audit_run
    from fedrec.simulation.runner import simulate
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # the simulation sets its own identity
        monkeypatch.setattr(TaskIdentity, attr, None)
    config = RunConfig(devices=8, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12, embedding_dim=4,
                       num_negatives=4, rounds=2, devices_per_round=6, privacy=mode, simulation_engine=engine,
                       baselines=False, simulation_shards=2, out_dir=str(tmp_path / "run"))
    summary = simulate(config)
    privacy = summary["privacy"]
    assert (privacy["mode"], privacy["secure_aggregation"]) == (mode, aggregation)
    figures = privacy["user_level"] if mode == "user" else privacy["record_level"]
    assert 0 < figures["epsilon_max"] <= config.epsilon_budget < figures["epsilon_max_subverted"]
    audit = audit_run(tmp_path / "run")
    assert audit["verdict"] == "pass", [f for f in audit["flags"] if f["severity"] == "error"]
    assert audit["secure_aggregation"]["epsilon_max_subverted_recomputed"] == \
        pytest.approx(figures["epsilon_max_subverted"], rel=1e-6)
    ledger = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    sums = [e["secure_sum"] for e in ledger if e.get("status") == "done" and e.get("kind") == "train"]
    assert sums and all(s["aggregation"] == aggregation and s["decrypted"] and s["shares"] >= s["t_min"]
                        for s in sums)
    if engine == "cohort":  # the plain loop (report, attacks) models the same sums: the same model comes out
        from fedrec.server.core import shrink_embeddings
        from fedrec.server.records import RunRecords
        from fedrec.simulation.plain import run_plain

        plain = run_plain(config.replace(out_dir=""))
        checkpoint = RunRecords(tmp_path / "run").load_checkpoint()
        from fedrec.shared.data.population import open_population
        from fedrec.shared.head import fill_tail

        flower = shrink_embeddings(checkpoint.tables, checkpoint.noise_variance)
        categories = open_population(config).catalogue().categories  # as devices rank: the tail by its category
        filled = fill_tail(flower.embedding, checkpoint.head, list(categories) if categories else None)
        np.testing.assert_allclose(plain.tables.embedding, filled, rtol=0, atol=1e-6)
        np.testing.assert_allclose(plain.tables.bias, flower.bias, rtol=0, atol=1e-6)


def test_a_replayed_masked_request_neither_trains_nor_charges_again(config):
    grid = LoopbackGrid(config)
    secure_round(config, grid, t_min=6)
    state = SlotStateStore(config.state_dir, "sim-0").load()
    first = grid.received["masked"][0]
    assert first.content[P.DEVICE][P.DEVICE_IDS] == ["sim-0"]
    request = next(m for m in grid.sent if m.metadata.message_type.endswith("masked") and m.metadata.dst_node_id == 100)
    reply = grid.client(message(request.content, dst=100, message_type=request.metadata.message_type),
                        grid.contexts[100])
    assert reply.has_error() and reply.error.reason == "secure-aggregation"
    again = SlotStateStore(config.state_dir, "sim-0").load()
    assert (again.rounds, again.history) == (state.rounds, state.history)


def test_a_deployed_style_node_refuses_a_secure_plan_outside_the_protocol(config):
    """Only the cohort engine models sums; a node that is one device never sends its vector outside the protocol
    (it would carry only its own noise share, with a threshold the server chose)."""
    device_engine = config.replace(simulation_engine="device")
    grid = LoopbackGrid(device_engine)
    t = tables(num_items=config.synthetic_items, dim=config.embedding_dim)
    from flwr.app import ConfigRecord

    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)),
                          P.PLAN: ConfigRecord(plan(privacy="distributed", num_negatives=4).to_config()),
                          P.COHORT: ConfigRecord({P.DEVICE_IDS: ["sim-1"], P.NONCE: 0, P.THRESHOLD: 10**9})})
    reply = grid.client(message(content, dst=101, message_type="train"), grid.contexts[101])
    assert reply.has_error() and reply.error.reason == "bad-message"
    assert SlotStateStore(config.state_dir, "sim-1").load() is None  # nothing trained, nothing charged


def test_a_device_refuses_a_mode_its_policy_leaves_out(config):
    strict = config.replace(device_policy="allowed-modes=local,distributed")
    grid = LoopbackGrid(strict)
    p = plan(privacy="user", update_clip=0.5, noise_multiplier=1.0, num_negatives=4, user_noise_multiplier=0.0)
    t = tables(num_items=config.synthetic_items, dim=config.embedding_dim)
    mechanism = training_mechanism(p, t.num_items, t.dim, 6, 1)
    asked = {100 + k: [f"sim-{k}"] for k in range(DEVICES)}
    replies, total, _ = run_secure_sum(grid, strict, 1, "train", {P.TABLES: arrays_record(P.tables_to_arrays(t)),
                                                                  P.PLAN: P_config(p)}, asked, mechanism, nonce=0,
                                       message_type="train", epsilon_budget=strict.epsilon_budget)
    assert total is None and set(replies.refused.values()) == {"allowed-modes"}


def test_a_threshold_at_or_below_half_the_participants_and_colluders_is_refused_by_each_device(config):
    """2t > |U1| + c, checked by every device on its own view before any share leaves; the server's own check is
    defence in depth only, so the device is asked directly here."""
    from fedrec.shared.identity import Authority, DeviceIdentity
    from fedrec.shared.secagg import ClientSession, SecAggError, SessionParams

    authority = Authority.create()
    params = SessionParams(session_id=b"x" * 16, threshold=4, vector_length=4, colluders=1)
    sessions = {f"d{k}": ClientSession.start(params, DeviceIdentity.enrol(f"d{k}", authority)) for k in range(7)}
    adverts = {d: advert for d, (_, advert) in sessions.items()}  # |U1| = 7 = 2t - c: refused
    with pytest.raises(SecAggError, match="needs"):
        sessions["d0"][0].share_keys(adverts, authority.key.public_key())
    fewer = {d: adverts[d] for d in sorted(adverts)[:6]}
    assert sessions["d1"][0].share_keys(fewer, authority.key.public_key())  # |U1| = 6 < 2t - c


def test_a_device_refuses_a_plan_assuming_fewer_colluders_than_its_policy_before_committing(config):
    grid = LoopbackGrid(config.replace(device_policy="max-colluders=2"))
    _, _, _, replies, total, _ = secure_round(config, grid, t_min=6)  # c = 1
    assert total is None and not replies.trained and set(replies.refused.values()) == {"max-colluders"}
    assert all(P.GRID not in r.content and "secagg" not in r.content for r in grid.received["keys"])


def test_a_threshold_past_the_policy_cap_is_refused_at_the_key_stage(config):
    grid = LoopbackGrid(config.replace(device_policy="max-aggregation-threshold=5"))
    _, _, _, replies, total, _ = secure_round(config, grid, t_min=6)
    assert total is None and set(replies.refused.values()) == {"max-aggregation-threshold"}


def test_bias_updates_go_on_the_grid_unscaled_so_the_sensitivity_holds_at_any_bias_scale():
    from fedrec.shared.secure_release import split_update, update_vector

    p = plan(privacy="distributed", bias_scale=1000.0, train_biases=True)
    emb, bias = np.ones((5, 4)) * 0.01, np.ones(5) * 10.0  # a raw step of 0.01 shows as 10 in the biases
    vector = update_vector(p, emb, bias)
    assert np.allclose(vector[20:], 0.01)
    back_emb, back_bias = split_update(p, vector, 5, 4)
    assert np.allclose(back_emb, emb) and np.allclose(back_bias, bias)


def test_popularity_sums_hold_at_least_half_a_round_of_devices():
    from fedrec.server.core import popularity_groups

    def sizes(asked):
        return [sum(len(v) for v in group.values()) for group in popularity_groups(asked, 100)]

    assert sizes({k: [f"d{k}"] for k in range(230)}) == [100, 130]  # a remainder of 30 joins the last sum
    assert sizes({k: [f"d{k}"] for k in range(260)}) == [100, 100, 60]
    # nodes of many devices (cohort engine) are split across sums: t stays that of a round of 100, within what a
    # device's policy accepts (two sums of 305 asked t = 244, past max-aggregation-threshold: every device refused)
    assert sizes({0: [f"a{k}" for k in range(305)], 1: [f"b{k}" for k in range(305)]}) == [100] * 5 + [110]
    groups = popularity_groups({0: [f"a{k}" for k in range(150)], 1: [f"b{k}" for k in range(60)]}, 100)
    assert [sorted(g) for g in groups] == [[0], [0, 1]] and groups[1][0] == [f"a{k}" for k in range(100, 150)]


@pytest.mark.parametrize("privacy, dp", [("local", True), ("local", False), ("distributed", False)])
def test_a_plan_that_does_not_share_out_its_noise_is_refused_by_every_secure_stage(config, privacy, dp):
    """A local plan in a secure sum would carry 1/t of the noise its accounting assumes (and a plan without DP
    none): each stage refuses it before the device commits, and nothing is read or charged."""
    from fedrec.shared.popularity import PopularityPlan
    from flwr.app import ConfigRecord

    grid = LoopbackGrid(config)
    prior = PopularityPlan(server_round=0, dp=dp, noise_multiplier=2.0 if dp else 0.0, delta=1e-5, privacy=privacy)
    for stage in ("keys", "shares", "masked", "unmask"):
        content = RecordDict({P.PRIOR: ConfigRecord(prior.to_config()),
                              P.COHORT: ConfigRecord({P.DEVICE_IDS: ["sim-2"], P.NONCE: 0, P.THRESHOLD: 6}),
                              "secagg": ConfigRecord({"stage": stage})})
        reply = grid.client(message(content, dst=102, message_type=f"train.secagg_{stage}"), grid.contexts[102])
        # keys: the plan itself is refused; later stages find no session this plan could belong to
        assert reply.has_error() and (stage != "keys" or reply.error.reason == "bad-message"), stage
    assert "fedrec-secagg-session" not in grid.contexts[102].state
    assert SlotStateStore(config.state_dir, "sim-2").load() is None


def test_a_noise_multiplier_beyond_exact_sampling_is_refused_at_the_key_stage(config):
    """Poisson draws at rates near 2^53 and above come out as multiples of 2^k, leaving a vector's low bits
    noise-free: a plan asking for such a rate is refused before the device commits."""
    from dataclasses import replace

    grid = LoopbackGrid(config)
    p = plan(privacy="distributed", noise_multiplier=2e5, lr=0.5, num_negatives=4)
    t = tables(num_items=config.synthetic_items, dim=config.embedding_dim)
    with pytest.raises(PlanError, match="draws exactly"):
        training_mechanism(p, t.num_items, t.dim, 6)
    mechanism = training_mechanism(replace(p, noise_multiplier=1.0), t.num_items, t.dim, 6, 1)  # the server's side
    replies, total, _ = run_secure_sum(grid, config, 1, "train", {P.TABLES: arrays_record(P.tables_to_arrays(t)),
                                                                  P.PLAN: P_config(p)},
                                       {100 + k: [f"sim-{k}"] for k in range(DEVICES)}, mechanism, nonce=0,
                                       message_type="train", epsilon_budget=config.epsilon_budget)
    assert total is None and not replies.trained
    assert all(r.has_error() and r.error.reason == "bad-plan" for r in grid.received["keys"])
    assert all(SlotStateStore(config.state_dir, f"sim-{k}").load() is None for k in range(DEVICES))
