"""The device's own privacy policy: plans outside it are refused before any data is read, whatever the server says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedrec.client.app import build_client_app
from fedrec.client.nodes import STATE_FILE
from fedrec.shared import protocol as P
from fedrec.shared.config import RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.eval_release import EvaluationPlan
from fedrec.shared.policy import PolicyError, PrivacyPolicy, simulated_policy
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.state import FileStateStore
from tests.helpers import message, plan, tables

# Each plan breaks exactly one rule of the default policy (budget 8, delta <= 1e-5, sigma >= 0.3, q <= 1, 8 steps).
BAD_PLANS = {
    "allow-no-dp": dict(dp=False, noise_multiplier=0.0, user_noise_multiplier=0.0),
    "max-delta": dict(delta=1e-3),
    "min-noise-multiplier": dict(noise_multiplier=0.1, user_noise_multiplier=1.0),
    "min-user-noise-multiplier": dict(noise_multiplier=1.0, user_noise_multiplier=0.1),
    "max-steps": dict(steps=5, user_steps=4),
}


def untouchable() -> None:
    raise AssertionError("the device read its data for a plan it should have refused")


def device(path, **policy) -> Device:
    return Device("dev", 1, untouchable, FileStateStore(path), DeviceSettings(embedding_dim=4, init_scale=0.1, seed=0),
                  PrivacyPolicy(**policy))


@pytest.mark.parametrize("rule", sorted(BAD_PLANS))
def test_a_plan_outside_the_policy_is_refused_without_reading_data(tmp_path, rule):
    d = device(tmp_path / "s.json")
    outcome = d.train(plan(**BAD_PLANS[rule]), tables())
    assert outcome.declined and outcome.refused == rule and outcome.embedding_delta is None
    state = FileStateStore(tmp_path / "s.json").load()
    assert state.history == () and state.rounds == () and state.refused == ((1, rule),)
    assert outcome.epsilon == 0.0


def test_the_sampling_rate_is_held_to_the_policy(tmp_path):
    outcome = device(tmp_path / "s.json", max_sample_rate=0.5).train(plan(sample_rate=0.9), tables())
    assert outcome.refused == "max-sample-rate"


def test_popularity_and_evaluation_plans_are_held_to_the_same_policy(tmp_path):
    d = device(tmp_path / "s.json", min_noise_multiplier=2.0)
    outcome, report = d.report_popularity(PopularityPlan(server_round=0, dp=True, noise_multiplier=1.0, delta=1e-5), 20)
    assert outcome.refused == "min-noise-multiplier" and report is None
    outcome, metrics = d.evaluate(EvaluationPlan(server_round=3, dp=False, noise_multiplier=0.0, delta=1e-5,
                                                 refit_l2=1.0), tables())
    assert outcome.refused == "allow-no-dp" and metrics is None
    assert FileStateStore(tmp_path / "s.json").load().history == ()


def test_a_device_that_allows_no_dp_reports_infinite_epsilon_ever_after(tmp_path):
    settings = DeviceSettings(embedding_dim=4, init_scale=0.1, seed=0)
    from fedrec.shared.data.interactions import DeviceEvents

    events = DeviceEvents(items=np.arange(8, dtype=np.int64), times=np.arange(8, dtype=np.int64),
                          weights=np.ones(8, np.float32))
    d = Device("dev", 1, lambda: events, FileStateStore(tmp_path / "s.json"), settings,
               PrivacyPolicy(allow_no_dp=True))
    assert d.train(plan(server_round=1, dp=False, noise_multiplier=0.0, user_noise_multiplier=0.0),
                   tables()).epsilon == float("inf")
    assert d.train(plan(server_round=2), tables()).epsilon == float("inf")  # a private round cannot undo it


def test_policy_settings_are_parsed_strictly():
    with pytest.raises(PolicyError, match="unknown privacy policy key"):
        PrivacyPolicy.from_mapping({"epsilon-budgett": 3}, source="node config")
    with pytest.raises(PolicyError, match="max-delta='0.5x' is not a valid float"):
        PrivacyPolicy.from_mapping({"max-delta": "0.5x"}, source="node config")
    with pytest.raises(PolicyError, match="out of range"):
        PrivacyPolicy.from_mapping({"max-sample-rate": 2.0}, source="node config")
    config = RunConfig(epsilon_budget=3.0, device_policy="min-noise-multiplier=0.9 allow-no-dp=true")
    assert simulated_policy(config) == PrivacyPolicy(epsilon_budget=3.0, min_noise_multiplier=0.9, allow_no_dp=True)
    assert simulated_policy(RunConfig().without_dp()).allow_no_dp


# --- through the real ClientApp, as a deployed device (its own node config; the run config cannot widen it) ----

def write_catalogue(folder) -> int:
    Catalogue.anonymous(30).write_csv(folder / "catalogue.csv")
    return 30


def deployed(tmp_path, data_file, **policy) -> Context:
    node_config = {"data-path": str(data_file), "catalogue-path": str(tmp_path / "catalogue.csv"),
                   "state-path": str(tmp_path / "state"), "device-id": Path(data_file).stem, **policy}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def request(t, **plan_changes):
    content = RecordDict({P.TABLES: ArrayRecord({k: Array(v) for k, v in P.tables_to_arrays(t).items()}),
                          P.PLAN: ConfigRecord(plan(**plan_changes).to_config()),
                          P.COHORT: ConfigRecord({P.DEVICE_IDS: ["d"], P.DELTA_CLIP: 0.0})})
    return message(content, dst=7, message_type="train")


@pytest.mark.parametrize("rule", ["allow-no-dp", "max-delta", "min-noise-multiplier", "max-steps"])
def test_a_deployed_device_refuses_through_the_client_app_before_reading_its_file(tmp_path, rule):
    t = tables(num_items=write_catalogue(tmp_path), dim=4)
    missing = tmp_path / "d.csv"  # does not exist: reading it would be an error reply, not a refusal
    # The server's run config asks for no DP and a huge budget: the device's own settings rule.
    app = build_client_app(RunConfig(embedding_dim=4, epsilon_budget=1000.0).without_dp())
    reply = app(request(t, **BAD_PLANS[rule]), deployed(tmp_path, missing))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[P.REPORT]["declined"] == [1] and reply.content[P.DEVICE][P.REFUSED] == [rule]
    assert P.DELTA not in reply.content
    state = FileStateStore(tmp_path / "state" / STATE_FILE).load()
    assert state.history == () and state.refused == ((1, rule),)


def test_a_deployed_device_takes_its_budget_from_its_own_settings(tmp_path):
    t = tables(num_items=write_catalogue(tmp_path), dim=4)
    data = tmp_path / "d.csv"
    data.write_text("item_index,timestamp,weight\n" + "".join(f"{i},{10 * i},1.0\n" for i in range(8)))
    app = build_client_app(RunConfig(embedding_dim=4, epsilon_budget=1000.0))
    first = app(request(t, noise_multiplier=3.0), deployed(tmp_path, data, **{"epsilon-budget": 1.0}))
    assert first.content[P.REPORT]["declined"] == [1] and first.content[P.DEVICE][P.REFUSED] == [""]
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('epsilon-budget = 50.0\nmax-delta = 1e-4\n')
    second = app(request(t, noise_multiplier=3.0, delta=1e-4),
                 deployed(tmp_path, data, **{"policy-path": str(policy_file)}))
    assert second.content[P.REPORT]["declined"] == [0] and P.DELTA in second.content


def test_data_errors_leave_the_device_as_a_code_without_data(tmp_path, caplog):
    t = tables(num_items=write_catalogue(tmp_path), dim=4)
    data = tmp_path / "d.csv"
    data.write_text("item_index,timestamp,weight\n7,10,1.0\nsecret-value,20,1.0\n")
    reply = build_client_app(RunConfig(embedding_dim=4))(request(t), deployed(tmp_path, data))
    assert reply.has_error() and reply.error.reason == "device-data"
    assert "secret-value" in caplog.text  # the detail is in the device's own log only
    # the round was charged before the data was read (write-ahead): a failure is never free to repeat
    assert FileStateStore(tmp_path / "state" / "state.json").load().rounds == (1,)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "catalogue.csv").write_bytes((tmp_path / "catalogue.csv").read_bytes())
    data.write_text("item_index,timestamp,weight\n29,10,1.0\n")  # one item only: too few to train
    reply = build_client_app(RunConfig(embedding_dim=4))(request(t), deployed(fresh, data))
    assert reply.has_error() and reply.error.reason == "device-data"
    unknown = build_client_app(RunConfig(embedding_dim=4))(request(t), deployed(fresh, data, **{"budget": 3}))
    assert unknown.has_error() and unknown.error.reason == "node-config"


# --- hostile inputs: what a server crafts is refused before it can shape what leaves the device ----------------

HOSTILE_REQUESTS = {
    "NaN item table": ("tables", lambda t: t.embedding.__setitem__((3, 0), np.nan), "bad-message", "not finite"),
    "huge item bias": ("tables", lambda t: t.bias.__setitem__(5, -3e38), "bad-message", "not finite or exceed"),
    "infinite user scale": ("plan", {"user_scale": float("inf")}, "bad-plan", "not finite"),
    "vanishing user scale": ("plan", {"user_scale": 1e-40}, "bad-plan", "user_scale=1e-40 is out of range"),
    "infinite noise": ("plan", {"noise_multiplier": float("inf")}, "bad-plan", "not finite"),
    # in float32's subnormal range C, the clip factor and the clipped sum round coarsely: one example moved the
    # release 5x C in a review, while the noise was drawn for the exact C
    "subnormal clip norm": ("plan", {"clip_norm": 7e-46}, "bad-plan", "clip_norm=7e-46 is out of range"),
    "clip norm below the floor": ("plan", {"clip_norm": 1e-4}, "bad-plan", "clip_norm=0.0001 is out of range"),
    "NaN delta clip": ("clip", float("nan"), "bad-message", "delta-clip-norm"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUESTS))
def test_crafted_tables_and_plans_are_refused_before_the_data_is_read(tmp_path, case, caplog):
    where, change, code, reason = HOSTILE_REQUESTS[case]
    t = tables(num_items=write_catalogue(tmp_path), dim=4)
    plan_changes = change if where == "plan" else {}
    if where == "tables":
        change(t)
    try:
        req = request(t, **plan_changes)
    except Exception:  # the plan builder itself refuses it: send the raw config as a server would
        good = plan().to_config()
        good.update({k.replace("_", "-"): v for k, v in plan_changes.items()})
        req = request(t)
        req.content[P.PLAN] = ConfigRecord(good)
    if where == "clip":
        req.content[P.COHORT][P.DELTA_CLIP] = change
    reply = build_client_app(RunConfig(embedding_dim=4))(req, deployed(tmp_path, tmp_path / "d.csv"))  # no such file
    assert reply.has_error() and reply.error.reason == code  # not device-data: the file was never opened
    assert reason in caplog.text
    assert not (tmp_path / "state" / STATE_FILE).exists()  # nothing spent, nothing stored


def test_an_evaluation_release_stays_finite_whatever_the_metrics(tmp_path):
    from fedrec.shared.eval_release import noisy_metrics

    eval_plan = EvaluationPlan(server_round=1, dp=True, noise_multiplier=1.0, delta=1e-5, refit_l2=1.0)
    released = noisy_metrics({"hr@10": float("nan"), "ndcg@10": float("inf"), "recall@20": -3.0}, eval_plan,
                             np.random.default_rng(0))
    assert all(np.isfinite(v) for v in released.values())
    with pytest.raises(Exception, match="refit-l2"):
        EvaluationPlan(server_round=1, dp=True, noise_multiplier=1.0, delta=1e-5, refit_l2=1e-300)


def test_an_evaluation_budgeted_at_the_user_level_is_refused_where_user_level_is_not_accepted():
    """The server marks an evaluation of a user-level run unit='user' (budgeted there); a device that leaves 'user'
    out of allowed-modes wants its budget read at the record level, so it refuses such a plan by rule."""
    plan = EvaluationPlan(server_round=1, dp=True, noise_multiplier=5.0, delta=1e-5, refit_l2=1.0, unit="user")
    assert PrivacyPolicy(allowed_modes="local,distributed").refusal(plan) == "allowed-modes"
    assert PrivacyPolicy().refusal(plan) == ""


def test_a_user_level_plan_cannot_demand_unbounded_local_steps():
    # One accounted release whatever the local steps, but the steps still bound the work (and the timing) a
    # server can demand: a review sent steps = user_steps = 10**9 and the device accepted.
    from tests.helpers import plan

    huge = plan(privacy="user", dp=True, update_clip=1.0, steps=10**9, user_steps=10**9, user_noise_multiplier=0.0)
    assert PrivacyPolicy().refusal(huge, 10, 1) == "max-steps"
    assert PrivacyPolicy().refusal(plan(privacy="user", dp=True, update_clip=1.0, steps=2, user_steps=1,
                                        user_noise_multiplier=0.0), 10, 1) == ""

