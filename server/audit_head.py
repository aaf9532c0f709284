"""The audit's check of the trained head: re-derived from the recorded noisy prior, equal in every round's plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedrec.shared.config import RunConfig
from fedrec.shared.head import head_digest

from .core import trained_head
from .records import RunRecords


def head_flags(entries: list[dict[str, Any]], config: RunConfig, run_dir: Path) -> tuple[dict[str, Any], list]:
    """(what the audit found about the head, its flags). The head is public and chosen from the noisy popularity
    sum alone (post-processing); a head that the recorded sum and the run's settings do not give could have been
    chosen from something else (true counts), so it is an error."""
    from .audit import Flag  # the audit's flag type (imported here: audit.py imports this module)

    plans = [(int(e["round"]), e["plan"]) for e in entries if e.get("kind") == "train" and "plan" in e]
    digests = {(p.get("head-size", 0), p.get("head-sha256", "")) for _, p in plans}
    checkpoint = RunRecords(run_dir).load_checkpoint()
    found: dict[str, Any] = {"sizes": sorted({size for size, _ in digests})}
    if not plans:
        return found, []
    if checkpoint is None or checkpoint.prior is None:
        if any(size for size, _ in digests):
            return found, [Flag("error", "head_unverifiable", "training rounds name a trained head, but the run "
                                "directory holds no recorded noisy prior to re-derive it from")]
        return found, []
    expected = trained_head(config, checkpoint.prior, checkpoint.tables.num_items)
    want = (0 if expected is None else len(expected), head_digest(expected))
    found["re_derived"] = {"size": want[0], "sha256": want[1]}
    flags = [Flag("error", "head_not_from_prior", f"round {rnd}: the plan trains a head of {plan.get('head-size', 0)} "
                  f"items (sha256 {str(plan.get('head-sha256', ''))[:12]}...), the recorded noisy prior and the "
                  f"run's settings give {want[0]} (sha256 {want[1][:12]}...)", round=rnd)
             for rnd, plan in plans if (plan.get("head-size", 0), plan.get("head-sha256", "")) != want]
    return found, flags
