"""Memory that does not depend on the data: public chunking, a public memory need, and the max-memory-mb rule.

A hostile server that could make a device fail for memory exactly when |D| > n would find |D| by binary search
(issue 17). Every memory-relevant choice comes from public quantities (shared/memory.py), the per-example work runs
in padded chunks of a public size, and a plan whose need passes the device's cap is refused before data is read.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from fedrec.shared import memory, training
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.policy import RULES, PrivacyPolicy
from fedrec.shared.state import FileStateStore
from fedrec.shared.training import DeviceTrainingData, train_cohort
from tests.helpers import plan, tables

PUBLIC = {"requested", "rows", "dim", "limit", "plan", "num_items", "cohort", "hooks_limit", "exact_clipping",
          "mode", "trained", "lookups", "per_example_bytes"}


def interactions(n: int, num_items: int, seed: int = 0) -> DeviceTrainingData:
    items = np.random.default_rng(seed).integers(0, num_items, n).astype(np.int64)
    return DeviceTrainingData(items=items, weights=np.ones(n, np.float32), seed=(3, seed))


def test_the_memory_module_reads_public_quantities_only_and_imports_no_torch():
    for fn in (memory.choose_grad_sample_mode, memory.blocks, memory.example_bytes, memory.chunk_size,
               memory.table_bytes, memory.training_memory_bytes):
        assert set(inspect.signature(fn).parameters) <= PUBLIC, fn.__name__  # no data, no batch size
    code = "import sys, fedrec.shared.memory, fedrec.shared.policy; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modes_and_chunk_sizes_are_the_same_for_every_data_size(monkeypatch):
    """Spy on what training actually does: the grad-sample mode and the chunk size of every block, for devices of
    10 to 2000 interactions at several q, equal each other and memory.blocks of the plan and the tables' shape."""
    seen: list[tuple[str, ...]] = []
    modes: list[str] = []
    real_private, real_chunks = training.make_private, training._chunks
    monkeypatch.setattr(training, "make_private",
                        lambda *a, mode, **k: modes.append(mode) or real_private(*a, mode=mode, **k))
    monkeypatch.setattr(training, "_chunks", lambda *a: seen.append(a[-1]) or real_chunks(*a))
    t = tables(num_items=300, dim=8)
    for requested in ("auto", "ghost", "hooks"):
        for user_steps in (0, 1):
            p = plan(grad_sample_mode=requested, user_steps=user_steps, num_negatives=5)
            layouts = set()
            for n in (10, 200, 2000):
                for q in (1.0, 0.05):
                    seen.clear(), modes.clear()
                    train_cohort(replace(p, sample_rate=q), t, np.zeros((1, 8), np.float32), [interactions(n, 300)],
                                 [[]], noise_seed=0)
                    layouts.add((tuple(modes), tuple(sorted(set(seen)))))
            expected = memory.blocks(p, num_items=300, dim=8)
            assert layouts == {(tuple(b.mode for b in expected), tuple(sorted({b.chunk for b in expected})))}


def test_auto_picks_from_the_shape_alone():
    assert memory.choose_grad_sample_mode("auto", rows=20, dim=4) == "hooks"
    assert memory.choose_grad_sample_mode("auto", rows=100_000, dim=16) == "ghost"
    assert memory.choose_grad_sample_mode("hooks", rows=100_000, dim=16) == "hooks"
    assert "batch" not in inspect.signature(training.choose_grad_sample_mode).parameters


@pytest.mark.parametrize("user_steps, privacy", [(0, "local"), (1, "local"), (1, "distributed")])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_chunked_training_is_the_one_pass_mechanism(monkeypatch, mode, user_steps, privacy):
    """The same noise seed gives the same release whatever the chunk size (1: no padding; 3: chunks cross devices
    and the last is padded; the default: one chunk): per-example clipping, one noise draw a step, same accounting."""
    t = tables(num_items=40, dim=4)
    p = plan(grad_sample_mode=mode, user_steps=user_steps, privacy=privacy, steps=1 if privacy == "distributed" else 2,
             sample_rate=0.6, noise_multiplier=1.0, user_noise_multiplier=1.5, clip_norm=0.3, lr=0.5, user_lr=0.5)
    devices = [interactions(7, 40, seed=1), interactions(1, 40, seed=2), interactions(12, 40, seed=3)]
    users = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)

    def run(per_device: int):
        monkeypatch.setattr(memory, "CHUNK_EXAMPLES_PER_DEVICE", per_device)
        return train_cohort(p, t, users, devices, [[], [], []], noise_seed=5)

    one_pass, *chunked = run(10_000), run(1), run(3)
    assert {b.chunk for b in memory.blocks(p, num_items=40, dim=4, cohort=3)} == {9}  # 3 per device x 3 devices
    for update in chunked:
        np.testing.assert_allclose(update.embedding_delta, one_pass.embedding_delta, atol=1e-5)
        np.testing.assert_allclose(update.bias_delta, one_pass.bias_delta, atol=1e-5)
        np.testing.assert_allclose(update.user_rows, one_pass.user_rows, atol=1e-5)
        assert update.histories == one_pass.histories
        assert update.examples_used.tolist() == one_pass.examples_used.tolist()
    monkeypatch.setattr(memory, "CHUNK_EXAMPLES_PER_DEVICE", 3)
    for k, device in enumerate(devices):  # each device alone is charged as in the cohort
        alone = train_cohort(p, t, users[k:k + 1], [device], [[]], noise_seed=5)
        assert alone.histories[0] == one_pass.histories[k]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_noiseless_chunked_cohort_equals_each_device_alone(monkeypatch, mode):
    monkeypatch.setattr(memory, "CHUNK_EXAMPLES_PER_DEVICE", 2)  # chunks of 2 x K examples: several per step
    t = tables(num_items=30, dim=4)
    p = plan(grad_sample_mode=mode, noise_multiplier=1e-9, clip_norm=0.4, steps=2, lr=0.5, user_lr=0.5)
    devices = [interactions(9, 30, seed=1), interactions(2, 30, seed=2), interactions(15, 30, seed=3)]
    users = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    cohort = train_cohort(p, t, users, devices, [[]] * 3, noise_seed=0)
    for k, device in enumerate(devices):
        alone = train_cohort(p, t, users[k:k + 1], [device], [[]], noise_seed=0)
        np.testing.assert_allclose(cohort.embedding_delta[k], alone.embedding_delta[0], atol=1e-6)
        np.testing.assert_allclose(cohort.bias_delta[k], alone.bias_delta[0], atol=1e-6)
        np.testing.assert_allclose(cohort.user_rows[k], alone.user_rows[0], atol=1e-6)


def test_the_memory_need_grows_with_the_plan_and_never_with_the_data():
    p = plan(grad_sample_mode="auto", num_negatives=16)
    need = lambda q, **shape: memory.training_memory_bytes(q, **{"num_items": 1000, "dim": 16, **shape})
    assert need(p) < need(p, num_items=10_000) < need(p, num_items=10_000, dim=64)
    assert need(p) < need(p, cohort=10)
    assert need(replace(p, num_negatives=200)) > need(p)
    assert need(replace(p, sample_rate=0.01, steps=3)) == need(p)  # q and the steps set time, never memory
    assert need(p, num_items=200_000) < need(p, num_items=200_000, exact_clipping=True)  # hooks: dense gradients


def test_a_plan_past_max_memory_mb_is_refused_by_rule():
    assert "max-memory-mb" in RULES
    p = plan(num_negatives=16, grad_sample_mode="auto")
    policy = PrivacyPolicy()  # max-memory-mb = 2048
    assert policy.refusal(p, num_items=1000, dim=16) == ""
    assert policy.refusal(p, num_items=2_000_000, dim=256) == "max-memory-mb"  # 25 GB of stacked-table copies
    assert policy.refusal(p) == ""  # without the tables' shape the rule cannot apply (Device.admit passes it)
    mid = memory.training_memory_bytes(p, num_items=200_000, dim=16) / 2**20
    exact = memory.training_memory_bytes(p, num_items=200_000, dim=16, exact_clipping=True) / 2**20
    cap = (mid + exact) / 2
    assert PrivacyPolicy(max_memory_mb=cap).refusal(p, num_items=200_000, dim=16) == ""
    assert PrivacyPolicy(max_memory_mb=cap, exact_clipping=True).refusal(p, num_items=200_000, dim=16) == \
        "max-memory-mb"


def untouchable():
    raise AssertionError("the device read its data for a plan it should have refused")


def test_a_device_refuses_a_plan_past_its_memory_cap_before_reading_data(tmp_path):
    device = Device("dev", 1, untouchable, FileStateStore(tmp_path / "s.json"),
                    DeviceSettings(embedding_dim=4, init_scale=0.1, seed=0), PrivacyPolicy(max_memory_mb=0.5))
    outcome = device.train(plan(), tables())
    assert outcome.declined and outcome.refused == "max-memory-mb" and outcome.embedding_delta is None
    assert FileStateStore(tmp_path / "s.json").load().history == ()


# One device's round in a fresh process: its peak memory above what the process held before (VmHWM, reset through
# clear_refs: ru_maxrss would carry the parent's peak across fork and exec), and whether it finished under an
# address-space limit of (what it holds before training + `limit`).
CHILD = r"""
import json, resource, sys
import numpy as np
from fedrec.shared import training
from fedrec.shared.model import ItemTables
from fedrec.shared.plans import LocalTrainingPlan

args = json.loads(sys.argv[1])
plan = LocalTrainingPlan.from_config(args["plan"])
n_items, dim, n = args["num_items"], args["dim"], args["n"]

def status(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def device(n, num_items, seed):
    items = np.random.default_rng(seed).integers(0, num_items, n).astype(np.int64)
    return [training.DeviceTrainingData(items=items, weights=np.ones(n, np.float32), seed=(1, seed))]

tables = ItemTables.initial(n_items, dim, scale=0.3, rng=np.random.default_rng(0))
data = device(n, n_items, 1)
# warm up on a 5-item catalogue (imports, thread pools), so what follows is the round itself
training.train_cohort(plan, ItemTables.initial(5, dim, scale=0.3, rng=np.random.default_rng(0)),
                      np.zeros((1, dim), np.float32), device(3, 5, 0), [[]], noise_seed=0)
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to what the process holds now
    f.write("5")
before = status("VmRSS")
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + args["limit"], resource.RLIM_INFINITY))
try:
    training.train_cohort(plan, tables, np.zeros((1, dim), np.float32), data, [[]], noise_seed=0)
    outcome = "ok"
except (MemoryError, RuntimeError) as err:  # torch: "DefaultCPUAllocator: can't allocate memory"
    outcome = type(err).__name__
print(json.dumps({"outcome": outcome, "growth": status("VmHWM") - before}))
"""


def run_alone(p, *, num_items: int, dim: int, n: int, limit: int) -> dict:
    args = json.dumps({"plan": p.to_config(), "num_items": num_items, "dim": dim, "n": n, "limit": limit})
    done = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets RLIMIT_AS")
def test_devices_of_n_and_10n_interactions_fit_the_same_memory(tmp_path):
    """|D| = 300 and 3000 at q = 1, hooks (dense per-example gradients over 1000 x 17 floats): before chunking the
    second needed ~380 MB more than the first and failed under a limit the first fit. Now both finish under the
    plan's public memory need, and their peaks differ by a small constant (their own interactions, under 40 bytes each)."""
    num_items, dim = 1000, 16
    p = plan(grad_sample_mode="hooks", num_negatives=16, sample_rate=1.0, steps=1)
    need = memory.training_memory_bytes(p, num_items=num_items, dim=dim)
    small, large = (run_alone(p, num_items=num_items, dim=dim, n=n, limit=need) for n in (300, 3000))
    assert small["outcome"] == large["outcome"] == "ok"
    assert abs(large["growth"] - small["growth"]) <= 8 * 2**20
    assert max(small["growth"], large["growth"]) <= need  # the public need bounds what a round takes


def test_a_failure_of_the_machine_after_the_charge_is_answered_as_a_decline(tmp_path, monkeypatch):
    """Local mode through the ClientApp: an allocation that fails after the write-ahead charge gives a reply that
    reads like a decline (no update, the figures as charged), never an error code whose presence the data (its
    size) could have shaped."""
    from fedrec.shared.config import RunConfig
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedrec.client.app import build_client_app
    from fedrec.shared import protocol as P
    from tests.helpers import message
    from tests.test_messages import arrays_record

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the plan's tensors do not fit")

    monkeypatch.setattr(training, "train_cohort", out_of_memory)
    config = RunConfig(devices=4, synthetic_items=30, synthetic_topics=3, synthetic_mean_events=10, embedding_dim=4,
                       num_negatives=4, state_dir=str(tmp_path / "state"))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={})
    t = tables(num_items=30, dim=4)
    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)), P.PLAN: ConfigRecord(plan().to_config()),
                          P.COHORT: ConfigRecord({P.DEVICE_IDS: ["sim-0"], P.NONCE: 0, P.DELTA_CLIP: 10.0})})
    reply = build_client_app(config)(message(content, dst=1, message_type="train"), context)
    assert not reply.has_error() and P.DELTA not in reply.content
    assert list(reply.content[P.REPORT]["declined"]) == [1] and reply.content[P.REPORT]["epsilon"][0] > 0
