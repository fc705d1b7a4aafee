"""dashboard.html as a user opens it: inside MLflow's own UI (a real `mlflow server`), on the parent run's Artifacts
tab, in headless Chromium. The page must render there (MLflow shows .html artifacts in a sandboxed iframe), with
no console errors, its headline verdict and the seeds' tokens visible; so must a compare's index page, its rows
linking to each method's page, and a sweep's, its rows linking to each target's page.

Skips with the reason where Debian's chromium + chromium-driver or selenium are missing. The screenshot goes to
the test's folder (the README's docs/ui_dashboard.png comes from docs/screenshots.py, on a real model)."""

import json
import os
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import all_runs, cli, free_port, logged_run, start_mlflow_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing: sudo apt-get update && sudo apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1300"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _frame_showing(driver, wait, element_id: str):
    """Switch into MLflow's artifact iframe once it holds element_id: after a route change the previous
    artifact's frame can linger a moment."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    def ready(d):
        d.switch_to.default_content()
        for frame in d.find_elements(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"):
            try:
                d.switch_to.frame(frame)
                if d.find_elements(By.ID, element_id):
                    return True
            except WebDriverException:  # a frame replaced while we looked
                pass
            d.switch_to.default_content()
        return False

    wait.until(ready)


def test_dashboard_and_compare_index_show_in_the_mlflow_ui(tiny_gpt2, store, tmp_path, monkeypatch):
    driver = _browser()  # skips before any run or server exists
    server = None
    try:
        parent, children = logged_run(store, tiny_gpt2, runs=3, epochs=8)
        # a compare in the same store, for its index page: the smallest that has two rows, without the method
        # runs' PNG figures (10 of them: most of its time; the pages under test draw their own SVG)
        from amrepro import figures

        monkeypatch.setattr(figures, "render", lambda makers: ({}, {}))
        result = cli("compare", "--model", tiny_gpt2, "--methods", "adam,pez", "--runs", "2", "--epochs", "4",
                     "--steps", "2", "--dim", "3", "--lr", "0.01")
        assert result.exit_code == 0, result.output
        (top,) = [r for r in all_runs(store) if "amrepro.compare" in r.data.tags]
        methods = {r.data.params["method"]: r for r in all_runs(store)
                   if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
        # and a sweep of two targets, for its index page (rows: targets, links: each target parent's dashboard)
        result = cli("sweep", "--model", tiny_gpt2, "--targets", "blocks.1.hook_resid_pre[0:2]", "--runs", "2",
                     "--epochs", "4", "--experiment", "browser-sweep")
        assert result.exit_code == 0, result.output
        swept = [r for r in all_runs(store) if "amrepro.target" in r.data.tags]
        (sweep,) = [r for r in all_runs(store) if r.info.run_id == swept[0].data.tags["amrepro.sweep"]]
        targets = {r.data.tags["amrepro.target"]: r for r in swept}
        client = MlflowClient(store)
        tokens = json.loads(Path(client.download_artifacts(children[0].info.run_id, "tokens.json")).read_text())
        port = free_port()
        server = start_mlflow_server(store, tmp_path, port)
        base = f"http://127.0.0.1:{port}"
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ready
        from selenium.webdriver.support.ui import WebDriverWait

        # the UI as a user keeps it (docs/screenshots.py): the assistant panel closed, the model-training side bar
        driver.get(base + "/health")  # same origin, before the UI reads its localStorage
        driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                              "localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');")
        # the route a user reaches by clicking the run, then Artifacts, then dashboard.html
        run = f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
        driver.get(f"{base}/{run}/artifacts/dashboard.html")
        wait = WebDriverWait(driver, 60)
        frame = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "iframe.mlflow-html-iframe")))
        driver.execute_script("arguments[0].scrollIntoView()", frame)
        driver.switch_to.frame(frame)
        headline = wait.until(ready.visibility_of_element_located((By.ID, "headline")))
        assert headline.text == parent.data.tags["amrepro.headline"]
        seed_row = driver.find_elements(By.CSS_SELECTOR, "#tokens tr")[1]
        shown = [chip.text.split("\n")[0] for chip in seed_row.find_elements(By.CSS_SELECTOR, ".chip")]
        assert shown == [repr(t) if t and "\ufffd" not in t else f"{t!r} (id {i})"
                         for t, i in zip(tokens["tokens"], tokens["ids"])]
        assert all(chip.is_displayed() for chip in seed_row.find_elements(By.CSS_SELECTOR, ".chip"))
        assert driver.find_elements(By.CSS_SELECTOR, "svg polyline")  # the curves are drawn
        driver.switch_to.default_content()
        # the compare's index: one visible row per method, its name a link to that method's dashboard in this UI
        driver.get(f"{base}/#/experiments/{top.info.experiment_id}/runs/{top.info.run_id}/artifacts/dashboard.html")
        _frame_showing(driver, wait, "index")
        links = driver.find_elements(By.CSS_SELECTOR, "#index a.run")
        assert [a.text for a in links] == ["adam", "pez"] and all(a.is_displayed() for a in links)
        for link, run in zip(links, (methods["adam"], methods["pez"])):
            route = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/dashboard.html"
            assert link.get_attribute("href") == f"{base}/{route}"
        rows = driver.find_elements(By.CSS_SELECTOR, "#index tr")[1:]
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == \
            [methods[m].data.tags["amrepro.headline"] for m in ("adam", "pez")]
        links[0].click()  # the sandboxed frame cannot open it: the page says so and shows the address to copy
        assert driver.find_element(By.ID, "address").is_displayed()
        assert driver.find_element(By.ID, "url").text == links[0].get_attribute("href")
        driver.switch_to.default_content()
        # the sweep's index: one visible row per target, linking to that target parent's dashboard
        driver.get(f"{base}/#/experiments/{sweep.info.experiment_id}/runs/{sweep.info.run_id}/artifacts/dashboard.html")
        _frame_showing(driver, wait, "index")
        links = driver.find_elements(By.CSS_SELECTOR, "#index a.run")
        assert sorted(a.text for a in links) == sorted(targets) and all(a.is_displayed() for a in links)
        for link in links:
            run = targets[link.text]
            route = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/dashboard.html"
            assert link.get_attribute("href") == f"{base}/{route}"
        driver.switch_to.default_content()
        # Two 404s that are not the page's: the UI probes an endpoint only a server with its auth app has
        # (users/current), and Chromium asks /health for a /favicon.ico. Every other error, and any from the
        # dashboard, fails the test.
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not (
            e["source"] == "network" and ("/ajax-api/2.0/mlflow/users/current" in e["message"]
                                          or e["message"].startswith(f"{base}/favicon.ico ")))]
        assert errors == [], errors
        driver.save_screenshot(str(tmp_path / "ui_dashboard.png"))
    finally:
        driver.quit()
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
