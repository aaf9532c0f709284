"""What a message costs a deployed device: Flower starts a fresh ClientApp process for each one.

Messages that do not train (the hello, the popularity report, an evaluation release) must be
answered without importing torch or Opacus; only a train message loads them. Checked in fresh
interpreters, through the app Flower loads (fedrec.client.app:app) and real messages; the wall
times are measured by `python -m fedrec.simulation.import_bench`, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedrec.simulation import import_bench

TRAINING_ONLY = {"torch", "opacus"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A deployed device (prepared catalogue and events file) and the server's plans and tables for it."""
    return import_bench.prepare(tmp_path_factory.mktemp("device"))


def test_messages_that_do_not_train_import_neither_torch_nor_opacus(spec, tmp_path):
    # One fresh process answers them in turn, the train message last; each reply must be the real answer
    # (a release, not an error or a refusal), so no handler skipped the work that would need torch.
    _, reports = import_bench.run_child(spec, ["hello", "popularity", "evaluate", "train"], tmp_path / "state")
    loaded = {r["kind"]: set(r["heavy"]) for r in reports}
    for report in reports:
        assert set(report["records"]) == import_bench.EXPECTED[report["kind"]], report
    assert not loaded["hello"] & (TRAINING_ONLY | {"scipy", "pandas"}), loaded["hello"]
    assert not loaded["popularity"] & TRAINING_ONLY, loaded["popularity"]
    assert not loaded["evaluate"] & TRAINING_ONLY, loaded["evaluate"]
    assert TRAINING_ONLY <= loaded["train"], "the check would not see torch or Opacus if they were loaded"


MESSAGE_PATH_MODULES = ("fedrec.shared.privacy.accounting", "fedrec.shared.plans", "fedrec.shared.model",
                        "fedrec.shared.protocol", "fedrec.shared.evaluation", "fedrec.shared.ranking",
                        "fedrec.shared.popularity", "fedrec.shared.eval_release", "fedrec.shared.state",
                        "fedrec.shared.policy", "fedrec.shared.device", "fedrec.client.nodes", "fedrec.client.app")


def test_the_modules_a_message_needs_import_no_torch_opacus_scipy_or_pandas():
    """Module by module, in import order, so a failure names the module that brought one in."""
    code = ("import importlib, json, sys\n"
            f"for name in {MESSAGE_PATH_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opacus', 'scipy', 'pandas'})\n"
            "    print(json.dumps([name, heavy]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = [json.loads(line) for line in out.splitlines()]
    assert [name for name, _ in loaded] == list(MESSAGE_PATH_MODULES)
    assert [(name, heavy) for name, heavy in loaded if heavy] == []


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_the_torch_free_accountant_equals_opacus():
    """q = 1 (closed form, no Opacus) and the conversion to epsilon, against Opacus's own accountant."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedrec.shared.privacy import accounting

    assert accounting.RDP_ORDERS == tuple(RDPAccountant.DEFAULT_ALPHAS)
    orders = list(accounting.RDP_ORDERS)
    for sigma in (0.3, 0.7, 1.0, 1.3, 2.5, 5.0, 40.0):
        for q in (0.001, 0.02, 0.25, 0.5, 0.97, 1.0):
            ours = accounting._rdp_one_step(sigma, q)
            theirs = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, err_msg=str((sigma, q)))
            for steps in (1, 50):
                accountant = RDPAccountant()
                accountant.history = [(sigma, q, steps)]
                assert accounting.epsilon([(sigma, q, steps)], delta=1e-5) == \
                    pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_the_old_import_paths_still_name_the_moved_classes():
    from fedrec.shared import model, model_torch

    assert model.MatrixFactorization is model_torch.MatrixFactorization
    assert model.SampledSoftmaxLoss is model_torch.SampledSoftmaxLoss
    with pytest.raises(AttributeError):
        _ = model.NoSuchThing


def test_device_and_server_hold_plans_to_the_same_classes():
    """The device parses plans with shared/plans.py (no torch); shared/training.py must re-export those very
    classes, or a server's LocalTrainingPlan and a device's could drift apart."""
    from fedrec.shared import plans, training

    for name in ("PlanError", "LocalTrainingPlan", "plan_from_config", "MAX_NOISE_MULTIPLIER", "SCALE_RANGE",
                 "MAX_LR", "MAX_NEGATIVES"):
        assert getattr(training, name) is getattr(plans, name), f"shared/training.py defines its own {name}"


def test_a_deployed_serverapp_imports_neither_torch_nor_opacus():
    """The deployed server only aggregates: torch comes in only with a simulation's central baselines."""
    code = "import sys, fedrec.server.app; print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _fresh(code: str) -> list:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


REGISTRIES = ("sorted(k.__name__ for k in GradSampleModule.GRAD_SAMPLERS)",
              "sorted(k.__name__ for k in GradSampleModuleFastGradientClipping.NORM_SAMPLERS)")
SAMPLER_CLASSES = "from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping\n"


def test_training_loads_opacus_without_its_package_init_and_the_same_samplers():
    """shared/opacus_lean.py defers opacus/__init__ (PrivacyEngine, every accountant: scipy.stats); the modules
    training uses must still register every grad and norm sampler a plain `import opacus` does."""
    lean = _fresh("import json, sys\nimport fedrec.shared.training\n"
                  + SAMPLER_CLASSES +
                  f"print(json.dumps([sorted(m for m in ('opacus.privacy_engine', 'scipy.stats', "
                  f"'opacus.accountants.gdp', 'opacus.optimizers.fsdpoptimizer_fast_gradient_clipping') "
                  f"if m in sys.modules), {', '.join(REGISTRIES)}]))")
    plain = _fresh("import json\nimport opacus\nimport fedrec.shared.training\n" + SAMPLER_CLASSES +
                   f"print(json.dumps([[], {', '.join(REGISTRIES)}]))")
    assert lean[0] == [], f"the training path ran Opacus's package __init__ after all: {lean[0]}"
    assert lean[1:] == plain[1:]
    assert "Embedding" in lean[1]


@pytest.mark.e2e
def test_a_deferred_opacus_package_runs_its_init_on_first_use():
    """Anything that later needs the rest of Opacus in the same process gets it, as from a plain import."""
    got = _fresh("import json\nimport fedrec.shared.training\nimport opacus\n"
                 "from opacus import PrivacyEngine\nfrom opacus.accountants import GaussianAccountant, RDPAccountant\n"
                 "from opacus.accountants.rdp import RDPAccountant as Same\n"
                 "from opacus.optimizers import DPOptimizer, DistributedDPOptimizer\n"
                 "from fedrec.shared.training import DPOptimizer as Ours\n"
                 "print(json.dumps([opacus.__version__, PrivacyEngine.__module__, GaussianAccountant.__module__, "
                 "RDPAccountant is Same, DPOptimizer is Ours, DistributedDPOptimizer.__module__]))")
    assert got == ["1.6.0", "opacus.privacy_engine", "opacus.accountants.gdp", True, True,
                   "opacus.optimizers.ddpoptimizer"]
    with pytest.raises(AssertionError, match="has no attribute 'no_such_name'"):
        _fresh("import fedrec.shared.training, opacus\nopacus.no_such_name")


@pytest.mark.e2e
def test_a_deferred_opacus_init_that_fails_is_run_again_and_threads_wait_for_it():
    """As with a plain import: a failed __init__ leaves the package importable later, and a thread that reads the
    package while another runs its __init__ waits for it instead of seeing half a module."""
    got = _fresh("import json, sys, threading\nimport fedrec.shared.training\nimport opacus\n"
                 "sys.modules['opacus.data_loader'] = None  # the next import of it fails\n"
                 "try:\n    from opacus import PrivacyEngine\n    first = 'imported'\n"
                 "except ImportError:\n    first = 'failed'\n"
                 "del sys.modules['opacus.data_loader']\n"
                 "got = []\n"
                 "def read():\n"
                 "    from opacus import PrivacyEngine\n"
                 "    got.append(PrivacyEngine.__name__)\n"
                 "threads = [threading.Thread(target=read) for _ in range(4)]\n"
                 "[t.start() for t in threads]; [t.join() for t in threads]\n"
                 "print(json.dumps([first, got, opacus.__version__]))")
    assert got == ["failed", ["PrivacyEngine"] * 4, "1.6.0"]
