"""Regenerate the screenshots of the MLflow UI in README.md and docs/: docs/ui_runs.png, ui_parent.png, ui_charts.png,
ui_table.png, ui_dashboard.png (`amrepro run`; README), docs/ui_sweep_*.png (`--command sweep`; docs/sweeps.md) and docs/ui_compare_*.png
(`--command compare`; docs/methods.md).

It runs `amrepro run` (or `sweep`, `compare`) into a fresh temporary MLflow store, serves that store with
`mlflow server` on 127.0.0.1 (a free port), and photographs these views with headless Chromium driven by selenium:

  ui_runs.png    the experiment's runs table in the model-training view, the parent run expanded to its
                 seed runs, with the tokens tag, seed and the activation/loss metrics as columns;
  ui_parent.png  the parent run's page: description, parameters, metrics, tags;
  ui_charts.png  the chart view: loss/total and act/target per epoch, one line per seed;
  ui_table.png   only if the parent logged a table with mlflow.log_table: that table on its Artifacts tab;
  ui_dashboard.png  the parent's dashboard.html on its Artifacts tab, as MLflow shows it (a sandboxed iframe);

with --command sweep (4 targets x 3 seeds on the tiny model):

  ui_sweep_runs.png   the runs table, all three levels: the sweep run expanded to its target parents, the
                      first target parent expanded to its seed runs;
  ui_sweep_table.png  sweep_table.json (log_table) as a table on the sweep run's Artifacts tab;
  ui_sweep_map.png    sweep_map.png on the same tab;

with --command compare (adam, pez, gcg x 3 seeds on the tiny model):

  ui_compare_runs.png   the runs table, the top run expanded to its method runs, side by side;
  ui_compare_table.png  compare_table.json (log_table) as a table on the top run's Artifacts tab.

Then it stops the server and deletes the temporary folder; nothing else is written.

Needs, once (Debian/Ubuntu; the Chromium the script drives and its matching driver):

    sudo apt-get update && sudo apt-get install -y chromium chromium-driver
    pip install selenium          # or: pip install -e '.[docs]'

Examples:

    python docs/screenshots.py                                 # tiny random GPT-2 of tests/tiny.py, ~1 minute
    python docs/screenshots.py --model sentence-transformers/all-MiniLM-L6-v2 -- --layer 4 --dim 100
    python docs/screenshots.py --command sweep                 # ~1 minute each
    python docs/screenshots.py --command compare -- --methods adam,gcg --runs 5

Options after `--` go to `amrepro run|sweep|compare` unchanged (on the tiny model they replace the defaults
of TINY_DEFAULTS option by option).

The views are chosen the way a user would reach them: URL routes of MLflow 3's UI
(#/experiments/<id>/runs?compareRunsMode=TABLE|CHART, #/experiments/<id>/runs/<run id>, workflowType=
machine_learning for the model-training side bar) plus the UI's own saved state in the browser's
localStorage (columns, expanded parent, which charts), written before the page loads. That state is
not in the URL, which is why a plain `chromium --headless --screenshot URL` is not enough (it also
photographs the page before the runs have loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APT_LINE = "sudo apt-get update && sudo apt-get install -y chromium chromium-driver"

# Columns of the runs table, in MLflow's "<kind>.`<key>`" notation; a key no run has shows as an empty column.
COLUMNS = ["tags.`tokens`", "params.`seed`", "metrics.`act/final`", "metrics.`act/decoded`", "metrics.`loss/final`"]
# Column order and widths (pixels) the table starts with: run name, seed and tokens first; tokens need room.
WIDTHS = {"attributes.`Run Name`": 260, "params.`seed`": 70, "tags.`tokens`": 420}
# `sweep` and `compare`: the middle level (target parents, method runs) and their seed runs in one table.
TREE_COLUMNS = {
    "sweep": ["tags.`amrepro.target`", "metrics.`stats/n_unique_tokens`", "metrics.`pvalue/unique_decoded_starts`",
              "metrics.`pvalue/cross_run_repeats_decoded_starts`", "metrics.`act/final`"],
    "compare": ["params.`method`", "metrics.`stats/n_unique_tokens`", "metrics.`pvalue/unique_decoded_starts`",
                "metrics.`pvalue/cross_run_repeats_decoded_starts`", "metrics.`stats/decoded_activation_max`"],
}
TREE_WIDTHS = {command: {"attributes.`Run Name`": 400 if command == "compare" else 330,
                         columns[0]: 90 if command == "compare" else 190, **{c: 185 for c in columns[1:]}}
               for command, columns in TREE_COLUMNS.items()}
# What each command runs on the tiny model unless the same option comes after `--`: small and quick (< 1 minute).
TINY_DEFAULTS = {
    "run": {"--layer": "4", "--dim": "3"},
    "sweep": {"--targets": "blocks.4.hook_resid_pre[0:4]", "--runs": "3", "--epochs": "30"},
    "compare": {"--layer": "4", "--dim": "3", "--methods": "adam,pez,gcg", "--runs": "3", "--epochs": "30",
                "--steps": "10"},
}
# The chart view: one section of line charts (per-epoch histories), one line per run, side by side.
CURVES = ["loss/total", "act/target"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python docs/screenshots.py",
        description="Run `amrepro run` (or sweep, compare) into a temporary MLflow store, serve it with "
                    "`mlflow server`, and save screenshots of the runs table, the parent run's page, the 10-seed "
                    "chart view and the parent's logged table (sweep/compare: the nested runs table, the top "
                    "run's table and map) (headless Chromium + selenium); then stop the server and delete the "
                    f"store. Needs: {APT_LINE}; pip install selenium (or pip install -e '.[docs]').",
        epilog="Anything after `--` is passed to `amrepro run` (or sweep, compare), e.g. -- --layer 4 --dim 100 "
               "--epochs 300.")
    parser.add_argument("--command", choices=list(TINY_DEFAULTS), default="run",
                        help="What to photograph: `amrepro run` (default: ui_runs, ui_parent, ui_charts, ui_table), "
                             "`amrepro sweep` (ui_sweep_runs, ui_sweep_table, ui_sweep_map) or `amrepro compare` "
                             "(ui_compare_runs, ui_compare_table).")
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (default: the tiny random GPT-2 of tests/tiny.py, written to the temporary "
                             "folder; small, quick defaults per command (TINY_DEFAULTS) unless given after --), or a Hugging Face id "
                             "or local folder as for `amrepro run --model`.")
    parser.add_argument("--out", type=Path, default=HERE, help="Folder for the PNGs, overwritten (default: docs/).")
    parser.add_argument("--width", type=int, default=0,
                        help="Browser window width in pixels (default: 1600 for run, 1800 for sweep and compare, "
                             "whose tables have more columns).")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the temporary store and leave the server running, printing its URL, to look "
                             "around by hand (stop it with Ctrl-C).")
    parser.add_argument("amrepro_args", nargs="*", metavar="-- AMREPRO_RUN_OPTIONS",
                        help="Options for `amrepro run|sweep|compare` (after --).")
    return parser.parse_args(argv)


# --- the store ----------------------------------------------------------------------------------------------
def run_amrepro(folder: Path, command_name: str, model: str, extra: list[str], env: dict[str, str]) -> None:
    """One `amrepro run|sweep|compare` into the store; the artifacts land in folder/mlruns (the working directory)."""
    if model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import write_tiny_gpt2
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in this script's output
        model = str(write_tiny_gpt2(folder / "tiny-gpt2"))
        defaults = TINY_DEFAULTS[command_name]  # the tiny model has 10 layers of width 32
        extra = [x for k, v in defaults.items() if k not in extra for x in (k, v)] + extra
    command = [sys.executable, "-m", "amrepro", command_name, "--model", model, *extra]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"amrepro {command_name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    print(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, uri: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "server.log", "w")
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: starts faster, less memory
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a busy 2-core machine needs ~30 s
    while time.time() < deadline:
        if server.poll() is not None:
            log_text = (folder / "server.log").read_text()[-3000:]
            sys.exit(f"mlflow server exited ({server.returncode}); its log:\n{log_text}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return server, base
        except OSError:
            time.sleep(1)
    stop_server(server)
    sys.exit("mlflow server did not answer within 180 s.")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its uvicorn workers), SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def api(base: str, path: str, body: dict) -> dict:
    """One POST to MLflow's REST API (no mlflow import here: only amrepro/tracking.py talks MLflow's Python)."""
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def find_tree(base: str) -> tuple[str, str, list[str], dict[str, list[str]], dict[str, str], list[str]]:
    """The one run tree in the fresh store: (experiment id, top run id (a run with children and no parent: the
    `run` parent, the sweep run or the compare top run), its child run ids (seed runs, target parents or method
    runs, by run_index or start time), their own child run ids (sweep and compare: seed runs) by parent, run names
    by id, the top run's tables logged with mlflow.log_table)."""
    experiments = [e["experiment_id"] for e in api(base, "experiments/search", {"max_results": 1000})["experiments"]]
    runs = api(base, "runs/search", {"experiment_ids": experiments, "max_results": 1000}).get("runs", [])
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    params = {r["info"]["run_id"]: {p["key"]: p["value"] for p in r["data"].get("params", [])} for r in runs}
    start = {r["info"]["run_id"]: int(r["info"]["start_time"]) for r in runs}
    parent_of = {run: t["mlflow.parentRunId"] for run, t in tags.items() if "mlflow.parentRunId" in t}
    tops = {p for p in parent_of.values() if p not in parent_of}
    if len(tops) != 1:
        sys.exit(f"expected one top run with child runs in the fresh store, found {len(tops)}.")
    top = tops.pop()

    def children(run: str) -> list[str]:
        return sorted((c for c, p in parent_of.items() if p == run),
                      key=lambda c: (int(params[c].get("run_index", -1)), start[c]))

    names = {run: t.get("mlflow.runName", run) for run, t in tags.items()}
    info = next(r["info"] for r in runs if r["info"]["run_id"] == top)
    logged = json.loads(tags[top].get("mlflow.loggedArtifacts", "[]"))  # where log_table records its tables
    tables = [a["path"] for a in logged if a.get("type") == "table"]
    return info["experiment_id"], top, children(top), {c: children(c) for c in children(top)}, names, tables


# --- the browser --------------------------------------------------------------------------------------------
def browser(width: int):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        sys.exit("selenium is not installed: pip install selenium (or pip install -e '.[docs]').")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            sys.exit(f"{path} not found; install Chromium and its driver: {APT_LINE}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--window-size={width},1000", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # explicit paths: no driver download


def ui_state(experiment: str, expanded: list[str], columns: list[str] = COLUMNS,
             widths: dict[str, int] = WIDTHS) -> dict[str, str]:
    """localStorage the MLflow UI (3.x) reads when the experiment page mounts: the assistant panel closed, the
    given parent runs expanded, our columns, every run visible in charts, and the chart search box."""
    page_state = {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": True,  # parent, seed-0, seed-1, ...
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": list(widths), "columnWidths": widths,
        "runsExpanded": {run: True for run in expanded}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "SHOW_ALL",  # the default (FIRST_10_RUNS) would drop a seed from the charts
        "viewMaximized": False, "runListHidden": False,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
        "autoRefreshEnabled": False, **charts(CURVES),
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    return {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState': json.dumps(page_state),
    }


def charts(metrics: list[str]) -> dict:
    """Chart-view state: our line charts in one section; isAccordionReordered keeps the UI from regrouping
    them, and runsCountToCompare lifts the default limit of 10 lines per chart (a parent and 10 seeds are 11)."""
    section = "amrepro-curves"
    cards = [{"uuid": f"amrepro-{key}", "type": "LINE", "metricKey": key, "displayName": key, "isGenerated": False,
              "deleted": False, "metricSectionId": section, "runsCountToCompare": 100, "selectedMetricKeys": [key],
              "lineSmoothness": 0, "xAxisKey": "step", "xAxisScaleType": "linear", "scaleType": "linear",
              "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
              "range": {}, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False} for key in metrics]
    sections = [{"uuid": section, "name": "per-epoch curves (one line per seed)", "display": True,
                 "isReordered": True, "deleted": False, "isGenerated": False, "columns": len(metrics),
                 "cardHeight": 560}]
    return {"compareRunCharts": cards, "compareRunSections": sections, "isAccordionReordered": True,
            "chartsSearchFilter": ""}


def shoot(driver, base: str, route: str, state: dict[str, str], wait_for: list[str], out: Path, height: int,
          settle: float = 3.0, click: str | None = None) -> None:
    """Load the UI at route with the given localStorage, wait until every text in wait_for is on the page,
    click the first button or link reading `click` if there is one, let charts finish drawing, save a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(driver.get_window_size()["width"], height)
    driver.get(base + "/health")  # same origin, no app running: the state is in place before the UI reads it
    driver.execute_script("localStorage.clear(); for (const [k, v] of Object.entries(arguments[0])) "
                          "localStorage.setItem(k, v);", state)
    driver.get(base + route)
    WebDriverWait(driver, 120).until(lambda d: all(text in d.find_element(By.TAG_NAME, "body").text
                                                   for text in wait_for))
    if click:
        time.sleep(1)
        clickable = "//*[self::button or self::a or @role='button']"
        found = driver.find_elements(By.XPATH, f"{clickable}[normalize-space()='{click}']")
        if found:
            found[0].click()
    time.sleep(settle)
    driver.save_screenshot(str(out))
    shrink(out)
    print(f"wrote {out}")


def shrink(png: Path) -> None:
    """A UI screenshot has few colours: a 256-colour palette keeps it sharp at under half the bytes."""
    from PIL import Image  # comes with matplotlib

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(png, optimize=True)


MODE = "workflowType=machine_learning"  # the model-training side bar of MLflow 3's UI


def shoot_run(driver, base: str, experiment: str, parent: str, children: list[str], tables: list[str],
              out: Path) -> None:
    """`amrepro run`: ui_runs.png, ui_parent.png, ui_charts.png, ui_dashboard.png and (if the parent logged a
    table) ui_table.png."""
    state = ui_state(experiment, [parent])
    shoot(driver, base, f"/#/experiments/{experiment}/runs?{MODE}&compareRunsMode=TABLE", state,
          children[:1], out / "ui_runs.png", height=800)
    shoot(driver, base, f"/#/experiments/{experiment}/runs/{parent}?{MODE}", state,
          ["Parameters", "Metrics"], out / "ui_parent.png", height=1400, click="Show more")
    shoot(driver, base, f"/#/experiments/{experiment}/runs?{MODE}&compareRunsMode=CHART", state,
          children[:1] + CURVES, out / "ui_charts.png", height=1100, settle=5.0)
    # the file name heads the artifact view once it is selected; the page itself is in an iframe (settle: drawn)
    shoot(driver, base, f"/#/experiments/{experiment}/runs/{parent}/artifacts/dashboard.html?{MODE}", state,
          ["dashboard.html", "KB"], out / "ui_dashboard.png", height=1250)
    if tables:  # the parent's Artifacts tab shows a log_table table as a table ("View as table")
        shoot(driver, base, f"/#/experiments/{experiment}/runs/{parent}/artifacts/{tables[0]}?{MODE}",
              state, [Path(tables[0]).name, "View as table"], out / "ui_table.png", height=800)


def shoot_tree(driver, base: str, command: str, experiment: str, top: str, children: list[str],
               grandchildren: dict[str, list[str]], names: dict[str, str], tables: list[str], out: Path) -> None:
    """`amrepro sweep` / `compare`: ui_<command>_runs.png (the top run expanded; for a sweep also its first target
    parent, so all three levels show), ui_<command>_table.png (the top run's log_table table on its Artifacts
    tab) and, for a sweep, ui_sweep_map.png (sweep_map.png on the same tab)."""
    first = children[0]
    expanded = [top, first] if command == "sweep" else [top]
    state = ui_state(experiment, expanded, TREE_COLUMNS[command], TREE_WIDTHS[command])
    wait = [names[first]] + [names[c] for c in grandchildren[first][:1]] * (command == "sweep")
    shoot(driver, base, f"/#/experiments/{experiment}/runs?{MODE}&compareRunsMode=TABLE", state,
          wait, out / f"ui_{command}_runs.png", height=800)
    table = f"{command}_table.json"
    if table not in tables:
        sys.exit(f"the top run logged no {table} with log_table (its tables: {tables}).")
    shoot(driver, base, f"/#/experiments/{experiment}/runs/{top}/artifacts/{table}?{MODE}", state,
          [table, "View as table"], out / f"ui_{command}_table.png", height=800)
    if command == "sweep":
        shoot(driver, base, f"/#/experiments/{experiment}/runs/{top}/artifacts/sweep_map.png?{MODE}", state,
              ["sweep_map.png"], out / "ui_sweep_map.png", height=1000, settle=4.0)


def main(argv=None) -> None:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="amrepro-screenshots-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # this checkout's amrepro
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    server = None
    try:
        run_amrepro(folder, args.command, args.model, args.amrepro_args, env)
        server, base = start_server(folder, uri, env)
        experiment, top, children, grandchildren, names, tables = find_tree(base)
        args.out.mkdir(parents=True, exist_ok=True)
        driver = browser(args.width or (1600 if args.command == "run" else 1800))
        try:
            if args.command == "run":
                shoot_run(driver, base, experiment, top, [names[c] for c in children], tables, args.out)
            else:
                shoot_tree(driver, base, args.command, experiment, top, children, grandchildren, names, tables,
                           args.out)
        finally:
            driver.quit()
        if args.keep:
            print(f"store {folder}, UI at {base}/#/experiments/{experiment}/runs?{MODE} (Ctrl-C to stop)")
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop_server(server)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
