"""The CLI's help about settings: defaults in every --help, and `fedrec config`'s listing of every key."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fedrec.shared.config import RunConfig


def _default_text(value: Any) -> str:
    return "''" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def config_help() -> dict[str, str]:
    """Each run-config key's help with its default: what the flags that set a key show in --help."""
    return {d["key"]: f"{d['help']} (default: {_default_text(d['default'])})" for d in RunConfig.describe()}


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help with each flag's own default where it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's --help shows defaults, whoever adds the subcommand."""
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                show_defaults(child)


def format_config_keys(*, run_config: bool = True, policy: bool = True, keys: Sequence[str] = ()) -> str:
    """`fedrec config`: every run-config and device policy key with default, allowed values and help."""
    import textwrap

    from fedrec.shared.policy import PrivacyPolicy

    sections = []
    if run_config:
        sections.append(("run-config keys (fedrec simulate/report/deploy-local --run-config 'key=value', a TOML file, "
                         "or pyproject.toml [tool.flwr.app.config])", RunConfig.describe()))
    if policy:
        sections.append(("device policy keys (a deployed device's node config or policy file; in simulation the "
                         "run-config key device-policy='key=value ...')", PrivacyPolicy.describe()))
    lines = []
    for title, rows in sections:
        shown = [r for r in rows if not keys or r["key"] in keys]
        if not shown:
            continue
        lines.append(f"{title}:")
        for row in shown:
            lines.append(f"  {row['key']} = {_default_text(row['default'])}    [{row['allowed']}]")
            lines += textwrap.wrap(row["help"], width=100, initial_indent="      ", subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines).rstrip()
