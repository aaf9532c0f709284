"""The round plan a device receives, and the checks it holds every plan to (no torch, no Opacus).

Parsing and validating a plan happens on every message a device answers; training it needs
torch and Opacus (shared/training.py, which re-exports these names). Keeping them apart lets a
device answer the messages that do not train without importing either.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .privacy.accounting import HistoryEntry


class PlanError(ValueError):
    """A round plan from the server is missing a key or holds an invalid value."""


# A device takes a plan's numbers only within these bounds (and finite): a server that sends inf, NaN or
# extreme scales could otherwise overflow the loss, and a non-finite clip factor survives clipping and noise.
SCALE_RANGE = (1e-3, 1e3)  # user-scale, bias-scale
MAX_LR = 1e3  # lr, user-lr, user-step-cap, clip-norm
# Below this a clip norm reaches float32's subnormal range, where C itself, the clip factor and every clipped
# coordinate round to a coarse grid while the noise is drawn for the exact C: a review made one example move the
# release 5x C with C near 1e-45. Received tables are bounded (protocol.MAX_TABLE_ABS), so C / norm stays normal.
MIN_CLIP_NORM = 1e-3
MAX_NOISE_MULTIPLIER = 1e6
MAX_NEGATIVES = 10_000
PLAN_MODES = ("local", "distributed", "user")


@dataclass(frozen=True)
class LocalTrainingPlan:
    """What the server fixes for one round of local training; sent in every train message."""

    server_round: int
    lr: float
    user_lr: float
    steps: int
    user_steps: int
    user_noise_multiplier: float
    sample_rate: float
    num_negatives: int
    user_step_cap: float
    user_scale: float
    bias_scale: float
    train_biases: bool
    dp: bool
    noise_multiplier: float
    clip_norm: float
    delta: float
    grad_sample_mode: str
    privacy: str = "local"  # local | distributed | user (see shared/privacy/releases.py)
    update_clip: float = 0.0  # privacy='user': the L2 bound S of the whole item update (the sensitivity)
    head_size: int = 0  # items whose rows train (shared/head.py), sent beside the tables; 0 = the whole catalogue
    head_sha256: str = ""  # digest of those ids ('' with head_size 0): signed into a secure sum's session

    def __post_init__(self) -> None:
        low, high = SCALE_RANGE
        checks = {
            "server_round": self.server_round >= 1, "lr": 0 < self.lr <= MAX_LR, "user_lr": 0 <= self.user_lr <= MAX_LR,
            "user_step_cap": 0 <= self.user_step_cap <= MAX_LR, "user_scale": low <= self.user_scale <= high,
            "bias_scale": low <= self.bias_scale <= high,
            "user_noise_multiplier": (self.user_noise_multiplier > 0 or not self.dp or self.user_steps == 0 or
                                      self.privacy == "user") and
                                     0 <= self.user_noise_multiplier <= MAX_NOISE_MULTIPLIER,
            "sample_rate": 0 < self.sample_rate <= 1, "num_negatives": 1 <= self.num_negatives <= MAX_NEGATIVES,
            "noise_multiplier": (self.noise_multiplier > 0 or not self.dp) and
                                0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER,
            "clip_norm": MIN_CLIP_NORM <= self.clip_norm <= MAX_LR,
            "delta": 0 < self.delta < 1, "grad_sample_mode": self.grad_sample_mode in ("hooks", "ghost", "auto"),
            "privacy": self.privacy in PLAN_MODES,
            # distributed: one item step, after user-row steps with their own (local) noise
            "steps": self.steps >= 1 and (self.privacy != "distributed" or self.steps == 1),
            "user_steps": self.user_steps >= 0 and (self.privacy != "distributed" or self.user_steps >= 1),
            "head_size": self.head_size >= 0,
            "head_sha256": (len(self.head_sha256) == 64 and all(ch in "0123456789abcdef" for ch in self.head_sha256))
                           if self.head_size else self.head_sha256 == "",
            "update_clip": (MIN_CLIP_NORM <= self.update_clip <= MAX_LR) if self.privacy == "user"
                           else self.update_clip == 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise PlanError(f"round plan: {name}={getattr(self, name)!r} is out of range")

    def privacy_steps(self) -> list[HistoryEntry]:
        """The (sigma, q, steps) of the noise this plan asks for (nothing without DP). In a secure mode the
        item step's noise is shared out over a sum: shared/privacy/releases.py turns that into history."""
        if not self.dp:
            return []
        if self.privacy == "user":
            return [(self.noise_multiplier, 1.0, 1)]
        if self.privacy == "distributed":
            return [(self.noise_multiplier, 1.0, 1), (self.user_noise_multiplier, self.sample_rate, self.user_steps)]
        steps = [(self.noise_multiplier, self.sample_rate, self.steps)]
        if self.user_steps:
            steps.append((self.user_noise_multiplier, self.sample_rate, self.user_steps))
        return steps

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def trained_items(self, num_items: int) -> int:
        """Rows of the item tables this plan trains (and a device's update carries)."""
        return self.head_size or num_items

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LocalTrainingPlan:
        return plan_from_config(cls, config)


def plan_from_config(cls: Any, config: dict[str, Any]) -> Any:
    """Build a frozen plan dataclass from its kebab-case config record, checking every key and type."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f.name.replace("_", "-")
        if key not in config:
            if f.default is not MISSING:
                continue
            raise PlanError(f"round plan: missing key '{key}'")
        value = config[key]
        kind = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PlanError(f"round plan: '{key}'={value!r} should be {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise PlanError(f"round plan: '{key}'={value!r} is not finite")
        values[f.name] = value
    return cls(**values)
