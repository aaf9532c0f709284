"""The README and docs/ name only commands, flags, settings and files that exist."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from fedrec.client.app import ERROR_CODES
from fedrec.client.nodes import DEPLOYED_KEYS, OPTIONAL_KEYS
from fedrec.shared.config import RunConfig
from fedrec.shared.plans import LocalTrainingPlan
from fedrec.shared.policy import PrivacyPolicy, parse_pairs
from fedrec.simulation.cli import build_parser, parse_run_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN_KEYS = set(RunConfig.help_texts())
POLICY_KEYS = set(PrivacyPolicy.keys())
NODE_KEYS = set(DEPLOYED_KEYS) | set(OPTIONAL_KEYS)
PLAN_KEYS = {f.name.replace("_", "-") for f in dataclasses.fields(LocalTrainingPlan)}  # as the ledger writes them
ERROR_NAMES = {code for _, code in ERROR_CODES} | {"internal-error"}
# Kebab-case names the docs use that are not fedrec settings: Flower's and other packages' own.
OTHER_NAMES = {"dp-accounting", "fab-include", "flwr-clientapp", "node-config", "num-supernodes", "root-certificates"}


@dataclasses.dataclass(frozen=True)
class Command:
    page: str
    text: str  # one `fedrec ...` invocation, without the leading "fedrec"


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def split_fences(text: str) -> tuple[list[str], str]:
    """(lines inside fenced code blocks, the prose with those blocks removed)."""
    code, prose, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            code.append(line)
        else:
            prose.append(line)
    return code, "\n".join(prose)


def inline_spans(prose: str) -> list[str]:
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def code_commands(lines: list[str]) -> list[str]:
    """Shell commands in code blocks: comments dropped, continuation lines (indented, or after `\\`) joined."""
    out: list[str] = []
    joining = False
    for line in lines:
        line = re.sub(r"\s#\s.*$", "", line).rstrip()
        if out and (joining or (line[:1].isspace() and out[-1].lstrip().startswith("fedrec "))):
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
        joining = out[-1].endswith("\\")
        out[-1] = out[-1].rstrip("\\").rstrip()
    return out


def fedrec_commands() -> list[Command]:
    found = []
    for page in PAGES:
        code, prose = split_fences(read(page))
        for text in code_commands(code) + inline_spans(prose):
            for part in re.split(r"&&|;|\s\|\s|\$\(", text):
                match = re.match(r"\s*(?:\$\s+)?fedrec\s+(\S.*)$", part)
                if match:
                    found.append(Command(page.name, match.group(1)))
    return found


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def resolve(command: Command) -> tuple[list[str], argparse.ArgumentParser, list[str]]:
    """(subcommand path, its parser, the rest of the words) for one documented command."""
    parser, path = build_parser(), []
    words = command.text.split()
    while words and words[0] in subparsers_of(parser):
        path.append(words[0])
        parser = subparsers_of(parser)[words.pop(0)]
    return path, parser, words


def flags_in(words: list[str]) -> list[str]:
    """The options a synopsis or command line names: `[--out DIR]`, `--privacy MODE|--no-dp`, `--json`, `-k`."""
    text = " ".join(words)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", " ", text)  # quoted values (run-config pairs) are not options
    return re.findall(r"(?:(?<=[\s\[|(])|^)(--?[a-z][a-z0-9-]*)", text)


def run_config_arguments(text: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"--run-config[ =](['\"])(.*?)\1(?=\s|$)", text)]


COMMANDS = fedrec_commands()


def test_the_docs_name_fedrec_commands_at_all():
    """Guards the extraction below: a regex that finds nothing would pass every other test here."""
    assert len(COMMANDS) > 30
    named = {path[0] for path in (resolve(c)[0] for c in COMMANDS) if path}
    assert {"simulate", "audit", "report", "deploy-local", "prepare"} <= named


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.page}:{c.text[:60]}")
def test_every_documented_fedrec_command_and_flag_exists(command: Command):
    path, parser, rest = resolve(command)
    assert path, f"{command.page}: `fedrec {command.text}` names no fedrec subcommand"
    if subparsers_of(parser) and rest:  # a group (`fedrec enrol`, `fedrec device`) names its subcommand or nothing
        assert rest[0] in ("...", "[...]"), f"{command.page}: `fedrec {command.text}`: no subcommand '{rest[0]}'"
    known = {option for action in parser._actions for option in action.option_strings}
    unknown = [flag for flag in flags_in(rest) if flag not in known]
    assert not unknown, f"{command.page}: `fedrec {command.text}`: fedrec {' '.join(path)} has no {unknown}"


def test_every_run_config_pair_in_a_command_parses_and_names_a_setting():
    """`--run-config '...'` in any command (fedrec's or flwr's), parsed by fedrec's own parser."""
    checked = 0
    for page in PAGES:
        code, prose = split_fences(read(page))
        for text in code_commands(code) + inline_spans(prose):
            for argument in run_config_arguments(text):
                mapping = parse_run_config([" ".join(w for w in argument.split() if w != "...")])  # "..." elides
                unknown = sorted(set(mapping) - RUN_KEYS)
                assert not unknown, f"{page.name}: `{text}`: no run-config key {unknown}"
                policy = parse_pairs(str(mapping.get("device-policy", "")), source=page.name)
                unknown = sorted(set(policy) - POLICY_KEYS)
                assert not unknown, f"{page.name}: `{text}`: no policy key {unknown}"
                checked += 1
    assert checked >= 5


def test_every_kebab_case_name_in_the_docs_is_a_setting_or_a_known_name():
    """`local-lr`, `max-steps`, `state-path`, `head-size`, `bad-plan`: a renamed key, plan field or error code leaves
    no stale doc behind."""
    known = (RUN_KEYS | POLICY_KEYS | NODE_KEYS | PLAN_KEYS | ERROR_NAMES | OTHER_NAMES
             | set(subparsers_of(build_parser())))
    for page in PAGES:
        _, prose = split_fences(read(page))
        for span in inline_spans(prose):
            match = re.fullmatch(r"([a-z][a-z0-9]*(?:-[a-z0-9]+)+)(?:\s*=.*)?", span)
            if match:
                assert match.group(1) in known, f"{page.name}: `{span}` is no setting, policy key, plan field, node key or error code"
            for pair_key in re.findall(r"(?:^|\s)([a-z][a-z0-9]*(?:-[a-z0-9]+)+)=", span):
                if not span.startswith(("fedrec", "flwr", "--")):
                    assert pair_key in known, f"{page.name}: `{span}`: no setting '{pair_key}'"


def test_every_standalone_option_in_the_docs_is_a_fedrec_flag_or_setting():
    """A span like `--skip-bad-rows` or `--devices 0`: a flag of some fedrec command, or a run-config key."""
    flags, stack = set(), [build_parser()]
    while stack:
        parser = stack.pop()
        flags |= {option for action in parser._actions for option in action.option_strings}
        stack.extend(subparsers_of(parser).values())
    # Flower's and its SuperLink's own options, named where docs/deploy.md starts them by hand.
    flower = {"--auth-supernode-private-key", "--database", "--enable-supernode-auth", "--host", "--port",
              "--node-config", "--root-certificates", "--stream", "--federation-config"}
    for page in PAGES:
        _, prose = split_fences(read(page))
        for span in inline_spans(prose):
            if span.startswith("-"):
                for option in re.findall(r"--?[a-z][a-z0-9-]*", span.split()[0]):
                    assert option in flags | flower or option[2:] in RUN_KEYS, f"{page.name}: no option `{span}`"


def configuration_tables() -> dict[str, list[str]]:
    """The first column of every table in docs/configuration.md, by the `## ` section it sits in."""
    tables: dict[str, list[str]] = {}
    section = ""
    for line in read(ROOT / "docs" / "configuration.md").splitlines():
        if line.startswith("## "):
            section = line[3:].strip().lower()
        match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if match:
            tables.setdefault(section, []).append(match.group(1))
    return tables


def test_configuration_tables_name_only_real_keys():
    tables = configuration_tables()
    assert tables.get("run config") and tables.get("device policy"), "docs/configuration.md lost a key table"
    assert not sorted(set(tables["run config"]) - RUN_KEYS), "docs/configuration.md: not RunConfig keys"
    assert not sorted(set(tables["device policy"]) - POLICY_KEYS), "docs/configuration.md: not policy keys"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    code, prose = split_fences(read(page))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", prose, flags=re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        _, prose = split_fences(read(page))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"
            checked += 1
    assert checked >= 20


def test_the_readme_keeps_the_two_commands_ci_reads():
    """.ci/run takes the test command from the 2nd line of the README's first code block."""
    code = read(ROOT / "README.md").split("```")[1].splitlines()[1:]
    assert code[0].endswith("fedrec simulate") and code[1].endswith("python -m pytest")
