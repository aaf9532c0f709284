"""What a user meets at the command line: key listings and suggestions, defaults in --help, prepare never mixing
folders, bad rows and Parquet rows named as such, and errors found before Ray starts (leaving no folder behind)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pandas as pd
import pytest

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.data.loaders import LoadOptions, load_csv
from fedrec.shared.data.prepare import prepare_log
from fedrec.shared.policy import PolicyError, PrivacyPolicy
from fedrec.simulation import cli
from fedrec.simulation.runner import RUN_LOG, PlainFormatter, check_run_dir, data_source


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- keys: listing, defaults, suggestions --------------------------------------------------------------------------

def test_unknown_keys_suggest_the_closest_run_config_and_policy_key():
    with pytest.raises(ConfigError, match=r"did you mean local-lr\?.*fedrec config"):
        RunConfig.from_mapping({"locl-lr": 0.1})
    with pytest.raises(PolicyError, match=r"did you mean max-steps\?"):
        PrivacyPolicy.from_mapping({"max-step": 3}, source="policy.toml")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"zzzzzz": 1})
    assert "did you mean" not in str(err.value)  # nothing close: no guess


def test_fedrec_config_lists_every_key_with_default_and_rules_from_the_parser_definitions(capsys):
    code, out, _ = run_cli(capsys, "config", "--json")
    listed = json.loads(out)
    assert code == 0
    assert [row["key"] for row in listed["run_config"]] == list(RunConfig().to_mapping())
    assert [row["key"] for row in listed["policy"]] == list(PrivacyPolicy().to_mapping())
    defaults = RunConfig().to_mapping()
    by_key = {row["key"]: row for row in listed["run_config"]}
    # the values the dataclass starts from (dp/privacy are normalised after construction; compare the fields)
    assert all(by_key[k]["default"] == f.default for k, f in
               ((f.name.replace("_", "-"), f) for f in dataclasses.fields(RunConfig)))
    assert by_key["local-lr"]["allowed"] == "> 0.0" and by_key["privacy"]["allowed"].startswith("one of local")
    assert by_key["noise-multiplier"]["allowed"].endswith("or auto") and "rounds" in defaults
    code, out, _ = run_cli(capsys, "config", "local-lr", "max-steps")
    assert code == 0 and "local-lr = 0.5" in out and "max-steps = 8" in out and "rounds =" not in out
    code, _, err = run_cli(capsys, "config", "lcal-lr")
    assert code == 2 and "did you mean local-lr?" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 50)" in out and "(default: synthetic)" in out  # --rounds, --dataset: RunConfig's defaults
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    assert "(default: 0.001)" in capsys.readouterr().out  # a flag's own argparse default


# --- prepare: refuse or replace whole ------------------------------------------------------------------------------

def write_ratings(path, users: int, items: int = 6) -> None:
    rows = ["uid,sku,ts"] + [f"{u},{i},{1000 + 10 * i + u}" for u in range(users) for i in range(items)]
    path.write_text("\n".join(rows) + "\n")


def prepare_args(raw, out, *extra: str) -> list[str]:
    return ["prepare", "--dataset", "csv", "--data-path", str(raw), "--columns", "user=uid,item=sku,time=ts",
            "--out", str(out), *extra]


def test_prepare_refuses_a_non_empty_folder_and_replaces_an_earlier_preparation_whole(tmp_path, capsys):
    big, small, out = tmp_path / "big.csv", tmp_path / "small.csv", tmp_path / "prepared"
    write_ratings(big, users=9)
    write_ratings(small, users=4)
    assert run_cli(capsys, *prepare_args(big, out))[0] == 0
    assert len(list((out / "devices").iterdir())) == 9
    code, _, err = run_cli(capsys, *prepare_args(small, out))
    assert code == 2 and "earlier preparation" in err and "--replace" in err
    assert len(list((out / "devices").iterdir())) == 9  # untouched
    assert run_cli(capsys, *prepare_args(small, out, "--replace"))[0] == 0
    assert sorted(p.name for p in (out / "devices").iterdir()) == [f"{k}.csv" for k in range(4)]  # none of the old
    assert json.loads((out / "manifest.json").read_text())["num_devices"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_prepare_refuses_a_run_directory_and_other_files_even_with_replace(tmp_path, capsys):
    raw = tmp_path / "r.csv"
    write_ratings(raw, users=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, *prepare_args(raw, run, "--replace"))
    assert code == 2 and "run directory" in err and sorted(p.name for p in run.iterdir()) == ["config.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *prepare_args(raw, other, "--replace"))
    assert code == 2 and "not empty" in err and (other / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="not empty"):  # the library refuses too, not only the command
        prepare_log(load_csv(raw, LoadOptions(columns={"user": "uid", "item": "sku", "time": "ts"})), other,
                    dataset="csv")


# --- bad rows ----------------------------------------------------------------------------------------------------

def test_skip_bad_rows_also_skips_a_row_with_an_extra_field(tmp_path):
    path = tmp_path / "r.csv"
    write_ratings(path, users=3)
    lines = path.read_text().splitlines()
    lines.insert(3, "7,8,9,surplus")
    path.write_text("\n".join(lines) + "\n")
    options = LoadOptions(columns={"user": "uid", "item": "sku", "time": "ts"})
    with pytest.raises(DataError, match="malformed CSV"):
        load_csv(path, options)
    raw = load_csv(path, dataclasses.replace(options, skip_bad_rows=True))
    assert len(raw) == 18 and raw.stats["rows_bad"] == 1 and raw.stats["rows_read"] == 19
    assert "7" not in raw.user_ids


def test_parquet_errors_name_a_row_not_a_line(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"uid": ["1", "2", "3"], "sku": ["5", "6", "7"], "ts": ["1", "soon", "3"]}).to_parquet(path)
    options = LoadOptions(columns={"user": "uid", "item": "sku", "time": "ts"})
    with pytest.raises(DataError, match=r"r.parquet: row 2, column 'ts' \(time\): found 'soon'") as err:
        load_csv(path, options)
    assert "line" not in str(err.value)
    with pytest.raises(DataError, match=r"no column 'sku2' for item; its columns are \['uid', 'sku', 'ts'\]"):
        load_csv(path, LoadOptions(columns={"user": "uid", "item": "sku2"}))
    skipped = load_csv(path, dataclasses.replace(options, skip_bad_rows=True))
    assert skipped.stats["file_format"] == "parquet" and skipped.stats["rows_bad"] == 1


# --- simulate: errors before Ray, nothing left behind ---------------------------------------------------------------

def quick(tmp_path, **changes) -> RunConfig:
    return RunConfig(**{"devices": 8, "synthetic_items": 20, "synthetic_topics": 2, "synthetic_mean_events": 8,
                        "embedding_dim": 4, "rounds": 2, "devices_per_round": 4, "out_dir": str(tmp_path / "run"),
                        **changes})


def test_a_run_directory_that_holds_a_run_or_a_changed_resume_is_refused_before_ray(tmp_path):
    from fedrec.simulation.runner import simulate

    config = quick(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.replace(out_dir=str(run.resolve()),
                                                               state_dir=str(run.resolve() / "device-state"))
                                                .to_mapping()))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume"):
        simulate(config)
    with pytest.raises(ConfigError, match=r"cannot resume with different settings \(local-lr: 0.5 in the run, "
                                          r"0.3 now\)"):
        simulate(config.replace(resume=True, local_lr=0.3))
    assert time.monotonic() - started < 60  # a Ray start alone takes longer on a loaded machine; nothing waited
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    check_run_dir(run, config.replace(resume=True, rounds=5, out_dir=str(run.resolve()),
                                      state_dir=str(run.resolve() / "device-state")))  # rounds may change
    with pytest.raises(ConfigError, match="no run to resume"):
        check_run_dir(tmp_path / "empty", config.replace(resume=True))


def test_an_error_before_ray_leaves_no_run_directory(tmp_path):
    from fedrec.simulation.runner import simulate

    raw = tmp_path / "r.csv"
    write_ratings(raw, users=6)
    bad_separator = quick(tmp_path, dataset="csv", data_path=str(raw), columns="user=uid,item=sku,time=ts",
                          separator=";")
    with pytest.raises(DataError, match="separator"):
        simulate(bad_separator)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="cannot fit epsilon-budget|epsilon"):
        simulate(quick(tmp_path, epsilon_budget=1e-4, rounds=50))
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the user made is left in place, empty as it was
    with pytest.raises(ConfigError):
        simulate(quick(tmp_path, epsilon_budget=1e-4, rounds=50).replace(out_dir=str(kept)))
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_summary_source_names_the_raw_file_not_the_runs_prepared_folder(tmp_path):
    raw = tmp_path / "r.parquet"
    pd.DataFrame({"uid": [str(u) for u in range(5) for _ in range(6)],
                  "sku": [str(i) for _ in range(5) for i in range(6)],
                  "ts": [str(100 + k) for k in range(30)]}).to_parquet(raw)
    run = tmp_path / "run"
    prepare_log(load_csv(raw, LoadOptions(columns={"user": "uid", "item": "sku", "time": "ts"})), run / "prepared",
                dataset="csv")
    config = RunConfig(dataset="prepared", data_path=str(run / "prepared"))
    source = data_source(config, run)
    assert source == {"source": {"dataset": "csv", "path": str(raw), "format": "parquet"}, "dataset": "csv",
                      "data_path": str(raw), "prepared_path": str(run / "prepared")}
    elsewhere = data_source(config, tmp_path / "another-run")  # a folder of fedrec prepare: dataset stays prepared
    assert elsewhere == {"source": {"dataset": "csv", "path": str(raw), "format": "parquet"}}


def test_the_run_log_has_no_colour_codes():
    import logging

    record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "\x1b[91mERROR \x1b[0m: boom", None, None)
    assert PlainFormatter("%(message)s").format(record) == "ERROR : boom" and RUN_LOG == "fedrec.log"


def test_round_lines_give_epsilon_to_three_significant_digits():
    from fedrec.server.loop import _epsilon_text

    assert [_epsilon_text(v) for v in (4.359642968412254, 10.313, 0.012345, 1234.5, float("inf"))] == \
        ["4.36", "10.3", "0.0123", "1230", "unbounded"]
