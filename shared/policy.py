"""A device's own privacy policy: the limits every plan from the server is held to, before any data is read.

The device is the root of trust for its own privacy. In deployment the policy comes from the
device's settings (its SuperNode's node config, or a TOML file it names), never from the run
config; in simulation every device builds it from the run config through the same parser. A
plan outside the policy is refused with the name of the rule it breaks (never a data value);
a plan inside it still has to fit the epsilon budget, or the device declines.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig, unknown_keys_message
from .memory import training_memory_bytes
from .privacy.accounting import HistoryEntry


RULES = ("allow-no-dp", "max-delta", "min-noise-multiplier", "min-user-noise-multiplier", "max-sample-rate",
         "max-steps", "min-aggregation-threshold", "max-aggregation-threshold", "max-colluders", "enrolment",
         "allowed-modes", "max-subverted-epsilon", "max-memory-mb")  # the names a refusal may carry

# What Shamir-sharing its two secrets costs a device grows with t x |U1| <= 2t^2: about 1.7 s on one core of a
# 2-core laptop at t = 128 (0.26 s per 16-byte half at t = 100). The default cap keeps that bounded and keeps
# the own-share figure (which grows with t) in sight.
DEFAULT_MAX_AGGREGATION_THRESHOLD = 128


class PolicyError(ValueError):
    """A policy setting is unknown, of the wrong type or out of range."""


def _rule(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrivacyPolicy:
    """Every field has a default a device gets when its settings are silent (keys: kebab-case field names)."""

    epsilon_budget: float = _rule(8.0, "the device's lifetime epsilon budget: it declines a round that would take "
                                       "it past this")
    max_delta: float = _rule(1e-5, "the largest delta it accepts in a plan (its epsilon is accounted at the "
                                   "plan's delta, never above this one)")
    min_noise_multiplier: float = _rule(0.3, "the smallest noise multiplier it accepts for what it sends: item "
                                             "steps, the popularity report, an evaluation release")
    min_user_noise_multiplier: float = _rule(0.3, "the smallest noise multiplier of its user-row steps")
    max_sample_rate: float = _rule(1.0, "the largest Poisson sampling rate q of its interactions per step")
    max_steps: int = _rule(8, "the most DP steps (user-row and item steps together) it takes in one round")
    allow_no_dp: bool = _rule(False, "whether it ever trains or reports without differential privacy")
    min_aggregation_threshold: int = _rule(2, "distributed and user modes: the fewest devices' shares it accepts in "
                                              "a sum the server can decrypt (t, from the secure-aggregation "
                                              "parameters it enforces itself); its noise share is 1/t of the sum's")
    allowed_modes: str = _rule("local,distributed,user", "the privacy modes whose plans it accepts: its budget is "
                                                          "enforced at the mode's unit (user level in 'user'), so a "
                                                          "device that wants its budget read at the record level "
                                                          "only leaves 'user' out")
    exact_clipping: bool = _rule(False, "clip every example from the very gradient it applies (Opacus hooks), never "
                                        "with ghost clipping, whose norm and applied gradient come from two float32 "
                                        "passes that can disagree where a gradient nearly cancels; the item tables' "
                                        "per-example gradients are then dense (batch x items x dim floats)")
    max_aggregation_threshold: int = _rule(DEFAULT_MAX_AGGREGATION_THRESHOLD,
                                           "distributed and user modes: the largest t it accepts (Shamir sharing "
                                           "costs it about t x |U1| field operations, and its own-share figure "
                                           "grows with t)")
    max_colluders: str = _rule("auto", "distributed and user modes: the devices it assumes may collude with a "
                                       "malicious server in one sum (an integer, or auto = ceil(t / 10)); it refuses a "
                                       "plan that assumes fewer, a t not above them, or |U1| >= 2t - c, and its "
                                       "noise share makes a sum of t - c honest shares carry the full noise")
    enrolment_authority: str = _rule("", "distributed and user modes: the enrolment authority's Ed25519 public key "
                                         "(64 hex digits, from fedrec enrol authority); it shares secrets only with "
                                         "members certified by it (simulation: the run's own authority)")
    max_subverted_epsilon: float = _rule(0.0, "a cap on its own-share epsilon, the figure against a server that "
                                              "also controls enrolment (only its own noise share protects it): it "
                                              "declines a round past it (0 = no cap; the figure is always "
                                              "reported, with a warning past 10x the budget)")
    max_memory_mb: float = _rule(2048.0, "the most memory (MiB) a plan may need at its peak (table copies and "
                                         "per-example work) in one training round, computed from public plan "
                                         "quantities only before any data is read; a plan needing more is refused")

    def __post_init__(self) -> None:
        checks = {"epsilon_budget": self.epsilon_budget > 0, "max_delta": 0 < self.max_delta < 1,
                  "min_noise_multiplier": self.min_noise_multiplier >= 0,
                  "min_user_noise_multiplier": self.min_user_noise_multiplier >= 0,
                  "max_sample_rate": 0 < self.max_sample_rate <= 1, "max_steps": self.max_steps >= 1,
                  "min_aggregation_threshold": self.min_aggregation_threshold >= 1,
                  "max_aggregation_threshold": self.max_aggregation_threshold >= 2,
                  "max_colluders": self.max_colluders == "auto" or (self.max_colluders.isdigit()),
                  "enrolment_authority": self.enrolment_authority == "" or _is_key_hex(self.enrolment_authority),
                  "max_memory_mb": self.max_memory_mb > 0,
                  "max_subverted_epsilon": self.max_subverted_epsilon >= 0,
                  "allowed_modes": bool(self.modes) and self.modes <= {"local", "distributed", "user"}}
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise PolicyError(f"{_key(name)}={value!r} is out of range")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str) -> PrivacyPolicy:
        """Parse kebab-case settings (node config, TOML, or 'key=value' pairs); errors name the source and key."""
        fields = {_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - set(fields))
        if unknown:
            raise PolicyError(unknown_keys_message(source, unknown, fields, what="privacy policy key",
                                                   listing="fedrec config --policy"))
        values = {fields[k].name: _coerce(fields[k].default, k, v, source) for k, v in mapping.items()}
        try:
            return cls(**values)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    def colluders(self, t: int) -> int:
        """c, the colluding devices it assumes in a sum of threshold t."""
        return math.ceil(t / 10) if self.max_colluders == "auto" else int(self.max_colluders)

    def secure_refusal(self, t: int, colluders: int) -> str:
        """The rule a secure sum's threshold t and assumed colluders c break ('' if none): t within its bounds,
        the plan assuming at least the colluders it assumes itself, and c < t (so a decryptable sum always holds
        honest shares)."""
        if t < max(2, self.min_aggregation_threshold):
            return "min-aggregation-threshold"
        if t > self.max_aggregation_threshold:
            return "max-aggregation-threshold"
        if colluders < self.colluders(t) or colluders >= t:
            return "max-colluders"
        return ""

    @property
    def modes(self) -> set[str]:
        """allowed-modes as a set (comma- or space-separated in the settings)."""
        return set(self.allowed_modes.replace(",", " ").split())

    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        return {_key(f.name): f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Every policy key with its default, value type and help (as from_mapping parses them)."""
        return [{"key": _key(f.name), "default": f.default, "allowed": _kind(f.default), "help": f.metadata["help"]}
                for f in dataclasses.fields(cls)]

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def refusal(self, plan: Plan, t_min: int = 0, colluders: int = 0, *, num_items: int = 0, dim: int = 0) -> str:
        """The rule `plan` breaks ('' if none). Reads only the plan, the secure sum's threshold `t_min` and the
        colluders `colluders` it assumes (both of which the device enforces in the protocol itself): no device
        data, no state. With the received item tables' shape (`num_items` x `dim`), a training plan's peak memory
        need (shared/memory.py, public quantities only, the device training alone) is held to max-memory-mb."""
        if num_items and dim and hasattr(plan, "num_negatives") and training_memory_bytes(
                plan, num_items=num_items, dim=dim, exact_clipping=self.exact_clipping) > self.max_memory_mb * 2**20:
            return "max-memory-mb"
        if not plan.dp:
            return "" if self.allow_no_dp else "allow-no-dp"
        if getattr(plan, "privacy", "local") not in self.modes or \
                (getattr(plan, "unit", "record") == "user" and "user" not in self.modes):
            return "allowed-modes"  # (an evaluation budgeted at the user level belongs to a user-level run)
        if getattr(plan, "privacy", "local") != "local":
            rule = self.secure_refusal(t_min, colluders)
            if rule:
                return rule
        if plan.delta > self.max_delta:
            return "max-delta"
        if not plan.noise_multiplier >= self.min_noise_multiplier:
            return "min-noise-multiplier"
        # A training plan's user-row steps have their own multiplier; every step the accountant is given must
        # clear the lower of the two floors whatever the plan's fields claim.
        # (In 'user' mode the user row is fitted without noise: it never leaves, and the whole item update that
        # does leave is clipped and noised as one.)
        if getattr(plan, "user_steps", 0) and getattr(plan, "privacy", "local") != "user" and \
                not getattr(plan, "user_noise_multiplier", 0.0) >= \
                self.min_user_noise_multiplier:
            return "min-user-noise-multiplier"
        if any(not sigma >= min(self.min_noise_multiplier, self.min_user_noise_multiplier)
               for sigma, _, _ in plan.privacy_steps()):
            return "min-noise-multiplier"
        if any(not q <= self.max_sample_rate for _, q, _ in plan.privacy_steps()):
            return "max-sample-rate"
        if sum(steps for _, _, steps in plan.privacy_steps()) > self.max_steps:
            return "max-steps"
        # user mode: one accounted release whatever the local steps, which still bound the work a plan can demand
        if getattr(plan, "steps", 0) + getattr(plan, "user_steps", 0) > self.max_steps:
            return "max-steps"
        return ""


class Plan(Protocol):
    """What the policy reads of a plan (training round, popularity report or evaluation release)."""

    dp: bool
    delta: float
    noise_multiplier: float

    def privacy_steps(self) -> list[HistoryEntry]: ...


def simulated_policy(config: RunConfig) -> PrivacyPolicy:
    """Every simulated device's policy: the run's budget and delta, then the run config's device-policy pairs.

    The same parser as a deployed device's settings; in simulation the experimenter owns the data and
    the devices alike, so the run config is where the devices' settings live.
    """
    settings: dict[str, Any] = {"epsilon-budget": config.epsilon_budget, "max-delta": config.delta}
    settings.update(parse_pairs(config.device_policy, source="run config device-policy"))
    return PrivacyPolicy.from_mapping(settings, source="run config device-policy")


def parse_pairs(text: str, *, source: str) -> dict[str, str]:
    """'key=value key=value' (as in --run-config) -> {key: value}; values are coerced by from_mapping."""
    pairs: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise PolicyError(f"{source}: '{token}' is not key=value")
        pairs[key.strip()] = value.strip().strip('"')
    return pairs


def read_policy_file(path: Path) -> dict[str, Any]:
    """A TOML file of policy keys (a device may keep its policy next to its state)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"{path}: cannot read the privacy policy ({type(err).__name__}: {err})") from None


def _is_key_hex(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


def _key(name: str) -> str:
    return name.replace("_", "-")


def _kind(default: Any) -> str:
    """The type _coerce accepts for a key with this default; the ranges are checked in __post_init__."""
    return {bool: "true or false", int: "integer", float: "number", str: "text"}[type(default)]


def _coerce(default: Any, key: str, value: Any, source: str) -> Any:
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif isinstance(default, float):
        try:
            if not isinstance(value, bool):
                number = float(value)
                if math.isfinite(number):
                    return number
        except (TypeError, ValueError):
            pass
    raise PolicyError(f"{source}: privacy policy {key}={value!r} is not a valid {type(default).__name__}")
