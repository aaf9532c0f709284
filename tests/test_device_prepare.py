"""A device prepares its own raw log (`fedrec device prepare`) against a catalogue built from public item metadata
(`fedrec catalogue`); the example device policy (docs/examples/policy.toml) parses and lists every key."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.prepare import read_device_file
from fedrec.shared.policy import PrivacyPolicy, read_policy_file
from fedrec.simulation.cli import main

ROOT = Path(__file__).resolve().parents[1]
USERS = range(1, 9)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def log_rows() -> list[str]:
    """Taobao-shaped rows (user, item, category, behaviour, time) of 8 users over 20 items, a repeat included."""
    rows = [f"{u},{100 + i},{i % 4},{'pv' if (u + i) % 3 else 'buy'},{1511000000 + 60 * i + u}"
            for u in USERS for i in range(1, 21) if (u * 7 + i) % 3 == 0 or i <= 3]
    return rows + ["2,101,1,buy,1511009999"]  # user 2 buys item 101 later: merged, the strongest weight kept


@pytest.fixture
def world(tmp_path, capsys):
    """Everyone's log prepared centrally (the reference), and the public catalogue built from metadata alone."""
    (tmp_path / "all.csv").write_text("\n".join(log_rows()) + "\n")
    assert run(capsys, "prepare", "--dataset", "taobao", "--data-path", str(tmp_path / "all.csv"),
               "--out", str(tmp_path / "central"))[0] == 0
    # public metadata: every item of the catalogue (ids and categories), in another order, none of anyone's events
    central = Catalogue.read_csv(tmp_path / "central" / "catalogue.csv")
    with open(tmp_path / "items.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sku", "name", "cat"])
        for i in reversed(range(central.num_items)):
            writer.writerow([central.item_ids[i], f"Item {central.item_ids[i]}", central.categories[i]])
    code, out, _ = run(capsys, "catalogue", "--items", str(tmp_path / "items.csv"), "--columns",
                       "item=sku,title=name,category=cat", "--out", str(tmp_path / "server"))
    assert code == 0 and "from public metadata only" in out
    return tmp_path


def own_log(folder: Path, user: int, extra: list[str] = ()) -> Path:
    """Device `user`'s own raw log: its rows of the log, nothing of anyone else's."""
    path = folder / f"raw-{user}.csv"
    path.write_text("\n".join([r for r in log_rows() if r.split(",")[0] == str(user)] + list(extra)) + "\n")
    return path


def test_a_device_prepares_its_own_log_into_the_file_prepare_would_give_it(world, capsys):
    central = Catalogue.read_csv(world / "central" / "catalogue.csv")
    public = Catalogue.read_csv(world / "server" / "catalogue.csv")
    assert public.item_ids == central.item_ids and public.categories == central.categories
    assert (world / "server" / "manifest.json").exists() and sorted(p.name for p in (world / "server").iterdir()) \
        == ["catalogue.csv", "manifest.json"]
    for index, user in enumerate(USERS):  # every user keeps 5 items: device k is user k + 1
        out = world / f"device-{user}" / "events.csv"
        code, printed, _ = run(capsys, "device", "prepare", "--dataset", "taobao", "--log",
                               str(own_log(world, user)), "--catalogue", str(world / "server" / "catalogue.csv"),
                               "--out", str(out))
        assert code == 0 and f'data-path="{out.resolve()}"' in printed
        assert out.read_text() == (world / "central" / "devices" / f"{index}.csv").read_text()
        assert len(read_device_file(out, num_items=public.num_items)) >= 5
    assert "merged 1 repeats" in run(capsys, "device", "prepare", "--dataset", "taobao", "--log",
                                     str(own_log(world, 2)), "--catalogue", str(world / "server" / "catalogue.csv"),
                                     "--out", str(world / "again.csv"))[1]


def test_items_outside_the_catalogue_are_dropped_and_counted_and_min_user_items_still_holds(world, capsys):
    catalogue = str(world / "server" / "catalogue.csv")
    log = own_log(world, 3, ["3,999,1,pv,1511100000", "3,998,1,buy,1511100001"])
    code, printed, _ = run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(log), "--catalogue",
                           catalogue, "--out", str(world / "d3.csv"))
    assert code == 0 and "dropped 2 events of 2 items outside the catalogue" in printed
    assert (world / "d3.csv").read_text() == (world / "central" / "devices" / "2.csv").read_text()
    short = world / "short.csv"
    short.write_text("\n".join(log_rows()[:3]) + "\n")  # user 1's first three items only
    code, _, err = run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(short), "--catalogue",
                       catalogue, "--out", str(world / "short-events.csv"))
    assert code == 2 and "3 distinct catalogue items, fewer than min-user-items (5)" in err
    assert not (world / "short-events.csv").exists()
    assert run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(short), "--catalogue", catalogue,
               "--out", str(world / "short-events.csv"), "--min-user-items", "3")[0] == 0


def test_device_prepare_says_what_is_wrong_and_writes_nothing(world, capsys):
    catalogue = str(world / "server" / "catalogue.csv")

    def prepare(log: Path, *more: str) -> str:
        code, _, err = run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(log), "--catalogue",
                           catalogue, "--out", str(world / "x" / "events.csv"), *more)
        assert code == 2 and not (world / "x" / "events.csv").exists()
        return err

    assert "holds the events of 8 users ('1', '2', '3', '4', '5', ...)" in prepare(world / "all.csv")
    assert "pass --user ID" in prepare(world / "all.csv")
    assert "no event of user '42'" in prepare(world / "all.csv", "--user", "42")
    assert "--min-item-users counts devices per item" in prepare(own_log(world, 1), "--min-item-users", "2")
    strangers = world / "strangers.csv"
    strangers.write_text("1,5000,1,pv,1511000000\n1,5001,1,pv,1511000001\n")
    assert "none of its 2 items is in the catalogue" in prepare(strangers)
    # the same readers as fedrec prepare: the same error, word for word (file, line, column, found, expected)
    bad = own_log(world, 1, ["1,10x,1,pv,1511000000"])
    device_error = prepare(bad).split("ERROR fedrec: ")[1]
    code, _, err = run(capsys, "prepare", "--dataset", "taobao", "--data-path", str(bad), "--out",
                       str(world / "central-bad"))
    assert code == 2 and err.split("ERROR fedrec: ")[1] == device_error and "column 2 (item): found '10x'" in device_error
    # a user's own log among others' (a shared export) is taken with --user, the others left out and counted
    code, printed, _ = run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(world / "all.csv"),
                           "--catalogue", catalogue, "--out", str(world / "u4.csv"), "--user", "4")
    assert code == 0 and (world / "u4.csv").read_text() == (world / "central" / "devices" / "3.csv").read_text()
    assert "left out" in printed
    err = run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(world / "all.csv"), "--catalogue",
              catalogue, "--out", str(world / "u4.csv"), "--user", "4")[2]
    assert "already exists; pass --replace" in err
    assert run(capsys, "device", "prepare", "--dataset", "taobao", "--log", str(world / "all.csv"), "--catalogue",
               catalogue, "--out", str(world / "u4.csv"), "--user", "4", "--replace")[0] == 0


def test_the_catalogue_command_names_the_line_and_column_of_a_problem(tmp_path, capsys):
    items = tmp_path / "movies.csv"
    items.write_text("movieId,title,genres\n1,Toy Story,Animation\n2,Jumanji,Adventure\n1,Again,Drama\n")

    def catalogue(*more: str) -> str:
        code, _, err = run(capsys, "catalogue", "--items", str(items), "--out", str(tmp_path / "srv"), *more)
        assert code == 2
        return err

    assert "line 4, column 'movieId' (item): item id '1' repeats line 2" in catalogue(
        "--columns", "item=movieId,title=title")
    assert "line 1: no column 'sku' for item; the header has ['movieId', 'title', 'genres']" in catalogue(
        "--columns", "item=sku")
    assert "name the item id column" in catalogue("--columns", "title=title")
    items.write_text("movieId,title,genres\n10,Heat,Action\n2,Jumanji,Adventure\n")
    assert run(capsys, "catalogue", "--items", str(items), "--columns", "item=movieId,title=title,category=genres",
               "--out", str(tmp_path / "srv"))[0] == 0
    built = Catalogue.read_csv(tmp_path / "srv" / "catalogue.csv")
    assert built.item_ids == ("2", "10") and built.label(1) == "Heat" and built.categories == ("Adventure", "Action")
    assert "not an empty folder" in catalogue("--columns", "item=movieId")  # never mixed with an earlier one


def test_the_example_device_policy_parses_and_lists_every_key_at_its_default():
    path = ROOT / "docs" / "examples" / "policy.toml"
    settings = read_policy_file(path)
    assert list(settings) == PrivacyPolicy.keys()  # every key, in the parser's order
    assert PrivacyPolicy.from_mapping(settings, source=str(path)) == PrivacyPolicy()
    lines = path.read_text().splitlines()
    for key in settings:  # each with a comment just above it
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert lines[at - 1].startswith("# "), key


def test_a_deployments_closing_lines_show_no_central_table_and_say_how_to_get_federated_metrics():
    from fedrec.simulation.deploy import format_deployment

    privacy = {"mode": "local", "record_level": {"epsilon_max": 1.5, "epsilon_median": 1.2, "budget": 8.0,
                                                 "noise_multiplier": 1.1, "delta": 1e-5, "devices_declined": 0}}
    summary = {"devices": 3, "items": 60, "rounds": 2, "dp": True, "privacy": privacy, "metrics": {"hr@10": None},
               "baselines": {}, "federated_eval": {}, "run_dir": "/tmp/run", "seconds": {"total": 41.0}}
    text = format_deployment(summary)
    assert text.splitlines()[0] == "deployment: 3 devices said hello, 60 items, 2 rounds"
    assert "no central quality metrics" in text and "--run-config federated-eval=true" in text
    assert "epsilon max 1.500" in text and "---" not in text and "hr@10" not in text
    asked = format_deployment({**summary, "federated_eval": {"devices": 3, "hr@10": 0.25, "ndcg@10": 0.125,
                                                             "recall@20": 0.5}})
    assert "federated evaluation on 3 devices" in asked and "hr@10 0.2500, ndcg@10 0.1250, recall@20 0.5000" in asked
    assert "federated-eval=true" not in asked
