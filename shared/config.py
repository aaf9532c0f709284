"""Typed, frozen run configuration, parsed once from a flat kebab-case mapping."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUTO = "auto"
AUTO_SERVER_LR_DP, AUTO_SERVER_LR_NO_DP = 0.1, 3.0  # measured on the synthetic default (see README, Results)
AUTO_SERVER_LR_SECURE = 1.5  # distributed/user: the ceiling of the rate that follows the sum's noise (server/core.py)
USER_LEVEL_CLIP = 0.5  # privacy='user': the whole item update's L2 bound S when delta-clip-norm is auto
PRIVACY_MODES = ("local", "distributed", "user", "none")
SECURE_MODES = ("distributed", "user")  # the modes whose noise is shared out over a secure sum
SYNTHETIC_DEVICES = 500  # the synthetic population when devices = 0 (real data then uses all its users)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _opt(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Keys are the field names in kebab-case (``local-lr``).

    The defaults here are the single source of truth; ``[tool.flwr.app.config]`` in
    pyproject.toml repeats them for ``flwr run`` (a test keeps the two equal).
    """

    # --- data -------------------------------------------------------------------
    dataset: str = _opt("synthetic", "data source: synthetic | prepared | movielens | taobao | retailrocket | counts | csv",
                        choices=("synthetic", "prepared", "movielens", "taobao", "retailrocket", "counts", "csv"))
    data_path: str = _opt("", "file or folder of the data set (not used for synthetic)")
    columns: str = _opt("", "csv/parquet column mapping, e.g. 'user=uid,item=sku,time=ts,event=type,weight=w'")
    separator: str = _opt(",", "field separator of csv data")
    encoding: str = _opt("", "text encoding of the data file ('' = the data set's own, utf-8 for csv)")
    event_weights: str = _opt("", "weight per behaviour type, e.g. 'pv=1,cart=2,fav=2,buy=4' ('' = the data set's "
                                  "defaults)")
    min_weight: float = _opt(0.0, "drop events weaker than this after weighting (e.g. 4 with buy=4: purchases only)",
                             min=0.0)
    min_user_items: int = _opt(5, "devices with fewer distinct items are dropped when preparing data", min=3)
    min_item_users: int = _opt(1, "items with fewer devices are dropped (k-core, alternating with devices)", min=1)
    skip_bad_rows: bool = _opt(False, "drop malformed rows of the data file (counted and reported) instead of "
                                      "stopping at the first")
    devices: int = _opt(0, "devices to simulate: for real data a seeded random subset of its users, 0 = all of "
                           f"them; for synthetic data the population size, 0 = {SYNTHETIC_DEVICES}", min=0)
    synthetic_items: int = _opt(1000, "synthetic catalogue size", min=10)
    synthetic_topics: int = _opt(30, "number of planted taste topics in the synthetic data", min=1)
    synthetic_mean_events: int = _opt(60, "mean number of events per synthetic device", min=5)
    synthetic_popularity_skew: float = _opt(1.1, "Zipf exponent of synthetic item popularity", min=0.0)
    synthetic_taste_share: float = _opt(0.9, "share of a synthetic device's picks driven by its favourite topics "
                                             "(the rest follow global popularity)", min=0.0, max=1.0)
    seed: int = _opt(42, "seed of every random choice in the run", min=0)

    # --- model --------------------------------------------------------------------
    embedding_dim: int = _opt(16, "dimension of user and item embeddings", min=1)
    num_negatives: int = _opt(16, "negative items sampled from the public catalogue per positive", min=1)
    init_scale: float = _opt(0.1, "standard deviation of the initial embeddings", min_exclusive=0.0)
    category_init: float = _opt(1.0, "scale of a shared random direction per public item category added to the "
                                     "initial embeddings (0 = ignore categories)", min=0.0)
    trained_items: float | str = _opt(AUTO, "items whose embeddings train, chosen from the noisy popularity prior "
                                            "alone (post-processing: no extra release): 'auto' = those whose noisy "
                                            "count is at least head-z standard deviations of its noise (at least "
                                            "10), N = the N largest noisy counts, 0 = every item; the rest of the "
                                            "catalogue ranks by its prior bias and its category's mean trained "
                                            "embedding. Without popularity-prior every item trains",
                                      auto_ok=True, min=0.0)
    head_z: float = _opt(3.0, "'auto' trained-items: how many noise standard deviations an item's noisy count must "
                              "reach to train", min_exclusive=0.0)

    # --- federation -----------------------------------------------------------------
    rounds: int = _opt(50, "number of federated training rounds", min=1)
    devices_per_round: int = _opt(100, "devices sampled for training in each round", min=1)
    round_timeout: float = _opt(600.0, "seconds to wait for the replies of one round", min_exclusive=0.0)
    node_wait_timeout: float = _opt(120.0, "seconds to wait for enough devices to come online", min_exclusive=0.0)
    min_devices: int = _opt(1, "before each round, fewer devices online than this: wait node-wait-timeout, then stop "
                               "the run cleanly (its checkpoint stays; --resume continues). A device that does not "
                               "answer within round-timeout is recorded as failed and the round goes on", min=1)

    # --- local training ---------------------------------------------------------------
    local_steps: int = _opt(1, "DP-SGD steps on the item tables a device takes per round", min=1)
    user_steps: int = _opt(1, "DP-SGD steps on the user row alone, before the item steps of a round (0 = train "
                              "user row and items together in the same steps)", min=0)
    user_noise_ratio: float = _opt(2.0, "noise multiplier of the user-row steps relative to the item steps",
                                   min_exclusive=0.0)
    sample_rate: float = _opt(1.0, "Poisson sampling rate q of a device's interactions per step", min_exclusive=0.0, max=1.0)
    local_lr: float = _opt(0.5, "learning rate for the item tables on the device", min_exclusive=0.0)
    user_lr: float = _opt(1.0, "learning rate for the device's own user row", min=0.0)
    user_step_cap: float = _opt(1.0, "largest step of the user row per local step, applied to the noisy gradient "
                                     "(0 = no cap)", min=0.0)
    user_scale: float = _opt(1.0, "reparameterisation scale of the user row: its share of each example's clipping "
                                  "budget grows with it, its effective learning rate with its square",
                             min_exclusive=0.0)
    bias_scale: float = _opt(1.0, "reparameterisation scale of the item biases (clipping share and learning rate as "
                                  "for user-scale)", min_exclusive=0.0)

    # --- privacy ----------------------------------------------------------------------
    dp: bool = _opt(True, "differential privacy on every device (false is privacy='none')")
    privacy: str = _opt("local", "local: record-level DP, every device adds the full noise to what it sends (trusts "
                                 "no one) | distributed: record-level DP, devices mask their updates so the server "
                                 "decrypts only sums (secure aggregation) and each adds 1/(t - c) of the noise | user: "
                                 "user-level DP (the whole device is the unit) on the same secure sums | none: no DP "
                                 "(what --no-dp sets)", choices=PRIVACY_MODES)
    aggregation_threshold: float = _opt(0.8, "distributed and user modes: the secure sum decrypts only with at least "
                                             "this share of the round's devices (t = ceil(share x devices asked)); "
                                             "each device adds 1/t of the noise, so fewer survivors abort the "
                                             "round; above 0.5, as secure aggregation needs t > n / 2",
                                        min_exclusive=0.5, max=1.0)
    colluders: float | str = _opt(AUTO, "distributed and user modes: c, the devices of a sum assumed to collude "
                                        "with a malicious server ('auto' = ceil(t / 10), the devices' default "
                                        "policy); each device's noise share is 1/(t - c), so a sum stripped of c "
                                        "shares still carries the full noise; devices refuse fewer than they assume",
                                  auto_ok=True, min=0.0)
    noise_multiplier: float | str = _opt(AUTO, "DP-SGD noise multiplier sigma, or 'auto' to calibrate it to the "
                                               "epsilon budget from the expected participation", auto_ok=True, min_exclusive=0.0)
    clip_norm: float = _opt(1.0, "per-example gradient clipping bound C", min_exclusive=0.0)
    delta: float = _opt(1e-5, "delta of the per-device (epsilon, delta) guarantee", min_exclusive=0.0, max_exclusive=1.0)
    epsilon_budget: float = _opt(8.0, "per-device epsilon budget; a device declines a round that would exceed it",
                                 min_exclusive=0.0)
    popularity_prior: bool = _opt(True, "before training, every device reports its items once with Gaussian noise; "
                                        "the server turns the sum into item biases (a private popularity prior)")
    prior_noise_multiplier: float | str = _opt(AUTO, "noise multiplier of the popularity report (sensitivity 1), or "
                                                     "'auto': the report alone may spend half the epsilon budget",
                                               auto_ok=True, min_exclusive=0.0)
    device_policy: str = _opt("", "simulation: every device's privacy policy, as 'key=value ...' pairs with the keys "
                                  "of a deployed device's policy (see shared/policy.py), on top of epsilon-budget "
                                  "and delta (its budget and largest delta); a deployed device ignores it and "
                                  "follows its own settings")
    train_biases: bool = _opt(False, "also train the item biases with DP-SGD (they start from the prior)")
    grad_sample_mode: str = _opt(AUTO, "Opacus per-sample gradients: hooks | ghost | auto (ghost for large catalogues)",
                                 choices=("hooks", "ghost", AUTO))

    # --- server -----------------------------------------------------------------------
    server_optimizer: str = _opt("fedavg", "how the server applies the mean item delta: fedavg | fedadam",
                                 choices=("fedavg", "fedadam"))
    server_lr: float | str = _opt(AUTO, "server learning rate on the mean item delta, or 'auto': 0.1 with local DP "
                                        "(the noise grows with it), 3.0 without; distributed/user: up to 1.5, lower "
                                        "as the sum's noise grows", auto_ok=True, min_exclusive=0.0)
    delta_clip_norm: float | str = _opt(AUTO, "clip each device's whole update (item embeddings and biases) to this L2 "
                                              "norm before it is summed, bounding any one device's influence; 'auto': "
                                              "the envelope of an honest update under the round's plan (its DP noise "
                                              "plus a few hundred clipped examples per step); 0 = off",
                                        auto_ok=True, min=0.0)
    central_noise_multiplier: float = _opt(0.0, "user-level DP (DP-FedAvg): Gaussian noise with std this x "
                                                "delta-clip-norm on the sum of clipped updates (0 = off)", min=0.0)
    device_sampling: str = _opt("fixed", "how a round's devices are drawn: fixed (exactly devices-per-round, "
                                         "without replacement) | poisson (each with rate devices-per-round / devices)",
                                choices=("fixed", "poisson"))
    server_beta1: float = _opt(0.9, "FedAdam first-moment decay", min=0.0, max_exclusive=1.0)
    server_beta2: float = _opt(0.99, "FedAdam second-moment decay", min=0.0, max_exclusive=1.0)
    server_tau: float = _opt(1e-3, "FedAdam adaptivity (epsilon in the denominator)", min_exclusive=0.0)

    # --- evaluation -------------------------------------------------------------------
    eval_every: int = _opt(10, "federated evaluation every N rounds (and always after the last)", min=1)
    eval_devices: int = _opt(100, "devices sampled for a federated evaluation round (0 = all)", min=0)
    final_eval_devices: int = _opt(0, "devices in the evaluation after the last round (0 = all)", min=0)
    federated_eval: bool = _opt(False, "devices evaluate the model on their own held-out items and reply with their "
                                       "metrics, Gaussian-noised and charged to their epsilon budget (false: no "
                                       "evaluation leaves a device; a simulation still evaluates centrally)")
    eval_noise_multiplier: float = _opt(5.0, "noise multiplier of a device's evaluation release (its metrics lie in "
                                             "[0, 1], so the L2 sensitivity is the square root of their number)",
                                        min_exclusive=0.0)
    refit_l2: float = _opt(3.0, "ridge penalty of the on-device user re-fit used for ranking", min_exclusive=0.0)
    baselines: bool = _opt(True, "simulation: after the run, evaluate the model and the random, popularity and central "
                                 "MF baselines centrally on every device (false: the federated evaluation only)")
    central_eval_every: int = _opt(0, "simulation: evaluate the model centrally on every device's held-out items "
                                      "every N rounds (and before the first): a learning curve at no privacy cost, "
                                      "since the experimenter owns the data (0 = off; a deployment never does)", min=0)
    ranking_shrinkage: bool = _opt(True, "rank with item embeddings shrunk by their known DP noise (FedAvg only)")

    # --- simulation engine (fedrec simulate only; a deployment runs one device per node) --
    simulation_engine: str = _opt("cohort", "cohort: each simulated node hosts a shard of the devices and trains a "
                                            "round's devices of its shard in one batched Opacus pass | device: one "
                                            "node per device (the deployment path)", choices=("cohort", "device"))
    simulation_shards: int = _opt(0, "nodes of the cohort engine (0 = one per CPU of the Ray cluster)", min=0)
    ray_address: str = _opt("", "attach the simulation to a running Ray cluster ('auto' or host:port; '' = start a "
                                "private one)")

    # --- output -----------------------------------------------------------------------
    out_dir: str = _opt("", "run directory (default runs/<timestamp>)")
    state_dir: str = _opt("", "folder for device state files in simulation ('' keeps state in Flower's Context)")
    resume: bool = _opt(False, "continue the run in out-dir from its last checkpoint")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_rules(f, getattr(self, f.name))
        # dp and privacy say the same thing twice (dp=false came first): keep them in step
        if not self.dp and self.privacy == "local":
            object.__setattr__(self, "privacy", "none")
        elif self.privacy == "none" and self.dp:
            object.__setattr__(self, "dp", False)
        elif not self.dp and self.privacy != "none":
            raise ConfigError(f"privacy={self.privacy!r} with dp=false: a private mode needs dp=true "
                              "(or privacy='none')")
        if self.trained_items != AUTO and float(self.trained_items) != int(float(self.trained_items)):
            raise ConfigError(f"trained-items={self.trained_items!r}: expected 'auto' or a whole number of items")
        if self.privacy in SECURE_MODES and self.central_noise_multiplier > 0:
            raise ConfigError(f"central-noise-multiplier: privacy={self.privacy!r} adds its noise on the devices "
                              "(secure sums); the trusted-server variant is privacy='local' with "
                              "central-noise-multiplier")
        if self.privacy == "distributed" and (self.local_steps != 1 or self.user_steps < 1):
            raise ConfigError(f"privacy='distributed': one item step per round (local-steps=1, got "
                              f"{self.local_steps}) after at least one user-row step (user-steps >= 1, got "
                              f"{self.user_steps}): the server sees only the summed delta, and a second step would "
                              "depend on the device's own share of the noise")
        if self.privacy == "user" and (self.delta_clip_norm == AUTO or float(self.delta_clip_norm) <= 0):
            object.__setattr__(self, "delta_clip_norm", USER_LEVEL_CLIP)
        if self.central_noise_multiplier > 0 and (self.delta_clip_norm == AUTO or float(self.delta_clip_norm) <= 0):
            raise ConfigError("central-noise-multiplier: user-level DP needs a fixed delta-clip-norm > 0 (the "
                              "sensitivity)")
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"data-path: dataset '{self.dataset}' needs a data-path (a file or folder)")

    # -- conversion --------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
        """Parse a flat kebab-case mapping; unknown keys and bad values raise ConfigError."""
        fields = {_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - set(fields))
        if unknown:
            raise ConfigError(unknown_keys_message(source, unknown, fields, listing="fedrec config"))
        values = {fields[k].name: _coerce(fields[k], k, v, source) for k, v in mapping.items()}
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @property
    def synthetic_devices(self) -> int:
        """Size of the synthetic population: `devices`, or SYNTHETIC_DEVICES where it is 0 (the default)."""
        return self.devices or SYNTHETIC_DEVICES

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr != AUTO:
            return float(self.server_lr)
        if self.privacy in SECURE_MODES:
            return AUTO_SERVER_LR_SECURE
        return AUTO_SERVER_LR_DP if self.dp else AUTO_SERVER_LR_NO_DP

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def without_dp(self) -> RunConfig:
        """The same run without DP: the plans (dp=false) and the devices' policy (allow-no-dp=true), since a
        device's own policy, not the plan, decides whether it ever trains without DP."""
        policy = " ".join(p for p in (self.device_policy, "allow-no-dp=true") if p)
        return dataclasses.replace(self, dp=False, privacy="none", device_policy=policy)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load_json(cls, path: Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read run config ({err})") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        return {_key(f.name): f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Every key with its default, allowed values and help, from the field definitions the parser uses."""
        return [{"key": _key(f.name), "default": f.default, "allowed": allowed_values(f),
                 "help": f.metadata["help"]} for f in dataclasses.fields(cls)]


def allowed_values(f: dataclasses.Field) -> str:
    """A field's rules as text: 'one of a, b', '>= 1', '> 0 and <= 1', 'or auto' (as _check_rules enforces them)."""
    rules = f.metadata
    if "choices" in rules:
        return "one of " + ", ".join(map(str, rules["choices"]))
    bounds = [f"{op} {rules[name]}" for name, op in (("min", ">="), ("min_exclusive", ">"), ("max", "<="),
                                                      ("max_exclusive", "<")) if name in rules]
    kind = "a number" if rules.get("auto_ok") else {bool: "true or false", int: "integer", float: "number",
                                                    str: "text"}[type(f.default)]
    text = " and ".join(bounds) if bounds else kind
    return f"{text} or auto" if rules.get("auto_ok") else text


def unknown_keys_message(source: str, unknown: list[str], known: Mapping[str, Any] | list[str], *,
                         what: str = "key", listing: str = "") -> str:
    """'unknown key(s) [...]' with the closest known key for each (a typo's likely fix) and where to list them all."""
    import difflib

    names = sorted(known)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        if close:
            hints.append(f"did you mean {close[0]}? (for {key})" if len(unknown) > 1 else f"did you mean {close[0]}?")
    message = f"{source}: unknown {what}(s) {unknown}"
    if hints:
        message += "; " + "; ".join(hints)
    where = f" (all of them, with defaults and help: {listing})" if listing else ""
    return f"{message}; known {what}s are {names}{where}"


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, key: str, value: Any, source: str) -> Any:
    """Turn CLI strings and TOML values into the field's type, or raise naming the key."""
    default = f.default
    if f.metadata.get("auto_ok") and isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float) or f.metadata.get("auto_ok"):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    expected = type(default).__name__ if not f.metadata.get("auto_ok") else "a number or 'auto'"
    raise ConfigError(f"{source}: {key}={value!r} is not a valid {expected}")


def _check_rules(f: dataclasses.Field, value: Any) -> None:
    key, rules = _key(f.name), f.metadata
    if value == AUTO and rules.get("auto_ok"):
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key}={value!r}: expected one of {list(rules['choices'])}")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{key}={value!r}: must be >= {rules['min']}")
    if "min_exclusive" in rules and value <= rules["min_exclusive"]:
        raise ConfigError(f"{key}={value!r}: must be > {rules['min_exclusive']}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{key}={value!r}: must be <= {rules['max']}")
    if "max_exclusive" in rules and value >= rules["max_exclusive"]:
        raise ConfigError(f"{key}={value!r}: must be < {rules['max_exclusive']}")
