"""What a deployed device pays per message: a fresh process that loads the ClientApp and answers once.

Flower 1.42 starts a new ClientApp process for every message in deployment (both isolation
modes), so the imports a handler needs are paid on every message. This times, in fresh
interpreters (the median of --repeats runs, kinds interleaved), a do-nothing Flower ClientApp
answering a hello, and fedrec's ClientApp (fedrec.client.app:app, as Flower loads it) answering a
hello (`query`), a popularity report (`train.popularity`), an evaluation release (`evaluate`) and
a DP train message, for one deployed device prepared in a temporary folder (a fresh state folder
per process, so no run is declined for budget). It prints, with each one's difference to the
do-nothing app: the wall time from process start to exit; the time until the reply is ready
(the interpreter's teardown at exit comes after the reply has been handed to Flower; a deployed
handler freezes the heap for it, client/app.py, which took it from ~1 s to ~0.15 s once torch is
loaded); and the heavy modules each process loaded.

    python -m fedrec.simulation.import_bench [--repeats 5] [--json FILE]

Targets (issue 12): a message that does not train within 0.5 s of the do-nothing app, a DP
train message within 2.5 s. The timed processes import only Flower, numpy and the app: the
messages are built from a spec this process writes (it may import anything; it is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KINDS = ("noop", "hello", "popularity", "evaluate", "train")
HEAVY = ("torch", "opacus", "scipy", "pandas")
DEVICE = "0"
NODE_ID = 7

# Run in a fresh interpreter: argv = [spec.json, state folder, kind, kind, ...]. It imports Flower, builds each
# message from the spec (numpy and Flower only), loads the app by its component path as Flower does, answers, and
# prints one JSON line per message: the reply's record names and which heavy modules are loaded by then.
CHILD = r'''
import importlib, json, sys, time
start = time.perf_counter()
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
K = spec["keys"]
node_config = dict(spec["node_config"], **{"state-path": sys.argv[2]})
context = Context(run_id=1, node_id=spec["node_id"], node_config=node_config, state=RecordDict(),
                  run_config=spec["run_config"])
flower_loaded = time.perf_counter()


def message(kind, n):
    cohort = ConfigRecord({K["DEVICE_IDS"]: [spec["device"]], K["DELTA_CLIP"]: 0.0, K["NONCE"]: 0})

    def table_record():
        with np.load(spec["tables"]) as tables:
            return ArrayRecord({k: Array(np.ascontiguousarray(tables[k])) for k in tables.files})

    plan = lambda name: ConfigRecord(spec["plans"][name])
    content = {"noop": lambda: {}, "hello": lambda: {},
               "popularity": lambda: {K["PRIOR"]: plan("popularity"), K["COHORT"]: cohort},
               "evaluate": lambda: {K["TABLES"]: table_record(), K["EVAL"]: plan("evaluate"), K["COHORT"]: cohort},
               "train": lambda: {K["TABLES"]: table_record(), K["PLAN"]: plan("train"), K["COHORT"]: cohort}}[kind]()
    message_type = {"noop": "query", "hello": "query", "popularity": "train.popularity", "evaluate": "evaluate",
                    "train": "train"}[kind]
    metadata = Metadata(run_id=1, message_id=f"m{n}", src_node_id=1, dst_node_id=spec["node_id"],
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    return Message(content=RecordDict(content), metadata=metadata)


def noop_app():
    app = ClientApp()
    answer = lambda msg, ctx: Message(RecordDict(), reply_to=msg)
    for register in (app.query(), app.train(), app.train("popularity"), app.evaluate()):
        register(answer)
    return app


for n, kind in enumerate(sys.argv[3:]):
    request = message(kind, n)
    before = time.perf_counter()
    if kind == "noop":
        app = noop_app()
    else:
        module, _, attribute = spec["component"].partition(":")
        app = getattr(importlib.import_module(module), attribute)
    reply = app(request, context)
    done, replied_at = time.perf_counter(), time.time()
    error = reply.error.reason if reply.has_error() else ""
    print(json.dumps({"kind": kind, "error": error, "records": sorted(reply.content.keys()) if not error else [],
                      "flower_s": flower_loaded - start, "load_and_handle_s": done - before, "replied_at": replied_at,
                      "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(spec["heavy"]))}), flush=True)
'''


def prepare(folder: Path, *, users: int = 30, items: int = 200) -> Path:
    """A prepared data set (catalogue + one events file per device) and the messages' spec; returns the spec path.

    The plans are the server's own (server.core.round_plan, popularity_plan; server.loop.evaluation_plan) under
    the default run config, with DP on; the item tables are the server's initial tables.
    """
    from fedrec.server.core import popularity_plan, round_plan
    from fedrec.server.loop import evaluation_plan
    from fedrec.shared import protocol as P
    from fedrec.shared.config import RunConfig
    from fedrec.shared.data.catalogue import Catalogue
    from fedrec.shared.data.loaders import load_taobao
    from fedrec.shared.data.prepare import prepare_log
    from fedrec.shared.model import initial_item_tables

    folder = Path(folder)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = [f"{u},{1000 + i},{i % 7},{'buy' if (u + i) % 5 == 0 else 'pv'},{1511000000 + 60 * i + u}"
            for u in range(1, users + 1) for i in range(items) if (u * 13 + i * 7) % 9 == 0 or i < 5]
    (raw / "UserBehavior.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    prepared = folder / "prepared"
    prepare_log(load_taobao(raw), prepared, dataset="taobao")
    catalogue = Catalogue.read_csv(prepared / "catalogue.csv")
    config = RunConfig()
    tables = initial_item_tables(catalogue.num_items, config.embedding_dim, scale=config.init_scale, seed=config.seed)
    import numpy as np

    np.savez(folder / "tables.npz", **P.tables_to_arrays(tables))
    prior = popularity_plan(config)
    assert prior is not None and config.dp
    spec = {
        "component": "fedrec.client.app:app", "heavy": list(HEAVY), "node_id": NODE_ID, "device": DEVICE,
        "run_config": {}, "tables": str(folder / "tables.npz"),
        "node_config": {"data-path": str(prepared / "devices" / f"{DEVICE}.csv"),
                        "catalogue-path": str(prepared / "catalogue.csv"), "device-id": str(DEVICE)},
        "keys": {name: getattr(P, name) for name in ("DEVICE_IDS", "DELTA_CLIP", "NONCE", "PRIOR", "TABLES", "EVAL",
                                                      "PLAN", "COHORT")},
        "plans": {"train": round_plan(config, 1, noise_multiplier=1.0).to_config(),
                  "popularity": prior.to_config(),
                  "evaluate": evaluation_plan(config, 1).to_config()},
    }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def run_child(spec: Path, kinds: list[str], state: Path, *, timeout: float = 300) -> tuple[float, list[dict]]:
    """Wall time of one fresh interpreter answering `kinds` in turn, and what it reported per message
    (with `reply_s`: from starting the process to the reply being ready, before the interpreter's exit)."""
    state.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(state), *kinds], capture_output=True,
                          text=True, timeout=timeout, cwd=state, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"the ClientApp process for {kinds} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for report in reports:
        report["reply_s"] = report.pop("replied_at") - started_at
    failed = [r for r in reports if r["error"]]
    if failed or len(reports) != len(kinds):
        raise RuntimeError(f"the ClientApp did not answer {kinds} cleanly: {reports}\n{done.stderr[-3000:]}")
    return wall, reports


EXPECTED = {"noop": set(), "hello": {"device"}, "popularity": {"counts", "device", "report"},
            "evaluate": {"device", "metrics", "report"}, "train": {"delta", "device", "report"}}


def bench(repeats: int = 5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedrec-import-bench-") as tmp:
        root = Path(tmp)
        spec = prepare(root)
        walls: dict[str, list[float]] = {k: [] for k in KINDS}
        inner: dict[str, list[float]] = {k: [] for k in KINDS}
        replied: dict[str, list[float]] = {k: [] for k in KINDS}
        heavy: dict[str, list[str]] = {}
        run_child(spec, ["noop"], root / "state-warmup")  # page cache and .pyc files, not measured
        for n in range(repeats):
            for kind in KINDS:  # interleaved, so a slow spell on a shared machine hits every kind alike
                wall, (report,) = run_child(spec, [kind], root / f"state-{kind}-{n}")  # a fresh device each time
                if set(report["records"]) != EXPECTED[kind]:
                    raise RuntimeError(f"{kind}: reply records {report['records']}, expected {sorted(EXPECTED[kind])}")
                walls[kind].append(wall)
                inner[kind].append(report["load_and_handle_s"])
                replied[kind].append(report["reply_s"])
                heavy[kind] = report["heavy"]
    base, base_reply = statistics.median(walls["noop"]), statistics.median(replied["noop"])
    return {"repeats": repeats, "cpus": os.cpu_count(), "load": os.getloadavg(),
            "kinds": {k: {"median_s": statistics.median(walls[k]), "minus_noop_s": statistics.median(walls[k]) - base,
                          "all_s": walls[k], "reply_median_s": statistics.median(replied[k]),
                          "reply_minus_noop_s": statistics.median(replied[k]) - base_reply,
                          "load_and_handle_median_s": statistics.median(inner[k]),
                          "heavy_modules": heavy[k]} for k in KINDS}}


TARGETS = {"hello": 0.5, "popularity": 0.5, "evaluate": 0.5, "train": 2.5}
LABELS = {"noop": "do-nothing ClientApp (query)", "hello": "fedrec hello (query)",
          "popularity": "fedrec popularity (train.popularity, DP)", "evaluate": "fedrec evaluate (DP release)",
          "train": "fedrec train (DP-SGD)"}


def render(result: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in result["load"])
    legend = ("wall: process start to exit; reply: start to the reply being ready (before the interpreter's "
              "teardown); app: loading the app and handling the message")
    header = (f"{'message':42} {'wall s':>6} {'- noop':>6} {'reply s':>7} {'- noop':>6} {'target':>6} {'app s':>6}  "
              "heavy modules loaded")
    lines = [f"fresh-process ClientApp cost, median of {result['repeats']} (cpus {result['cpus']}, load average {load})",
             legend, header]
    for kind, row in result["kinds"].items():
        target = f"{TARGETS[kind]:.1f}" if kind in TARGETS else ""
        diff = "" if kind == "noop" else f"{row['minus_noop_s']:+.2f}"
        reply_diff = "" if kind == "noop" else f"{row['reply_minus_noop_s']:+.2f}"
        lines.append(f"{LABELS[kind]:42} {row['median_s']:6.2f} {diff:>6} {row['reply_median_s']:7.2f} "
                     f"{reply_diff:>6} {target:>6} {row['load_and_handle_median_s']:6.2f}  "
                     f"{','.join(row['heavy_modules']) or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrec.simulation.import_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per message kind (median)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = bench(max(1, args.repeats))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
