"""The collector's web UI, looked at in a real headless Chromium (selenium and the Debian
chromium-driver), against a collector fed by real training runs: the pages load without
console errors, the heat map shows the missing variables' rows in the missing colour and a
NaN in the non-finite colour, the causes are shown, user input never executes, and the
JSON API says the same. Screenshots are saved under ``build/test-artifacts/``."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from gradwatch.collector import heatmap
from tests.support.models import ModelWithUnusedLayer
from tests.support.services import require_binary

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def base_url(collector) -> str:
    return collector.metrics_url.removesuffix("/metrics")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def browser():
    require_binary("chromium")
    require_binary("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1800", "--disable-gpu"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] in ("SEVERE", "ERROR")]


@pytest.fixture(scope="module")
def trained_job(collector):
    """A TensorFlow job with a missing gradient and one NaN step, still running."""
    job = "web-job-tf"
    keras.utils.set_random_seed(0)
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    monitor = GradientMonitor(collector=collector.grpc_target, training_job=job,
                              flush_interval_s=0.05)
    optimizer = monitor.wrap(keras.optimizers.SGD(1e-3, name="sgd"))
    for step in range(12):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(X) - Y))
            if step == 6:
                loss = loss * float("nan")
        grads = tape.gradient(loss, model.trainable_variables)
        if step == 6:  # keep the weights finite: only this step's gradients are NaN
            monitor.observe(grads, model.trainable_variables, step=step, name="probe")
        else:
            optimizer.apply(grads, model.trainable_variables)
    yield job
    monitor.close()


def wait_for_steps(collector, job: str, optimizer: str, steps: int) -> dict:
    import time

    deadline = time.monotonic() + 15
    while True:
        found = get_json(f"{base_url(collector)}/api/v1/jobs/{quote(job, safe='')}")
        group = next((g for g in found["groups"] if g["optimizer"] == optimizer), None)
        if group and len(group["steps"]) >= steps and group["causes"]:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not there yet: {found}")
        time.sleep(0.1)


def test_the_api_says_which_variables_miss_gradients_and_why(collector, trained_job):
    found = wait_for_steps(collector, trained_job, "sgd", 11)
    listed = get_json(f"{base_url(collector)}/api/v1/jobs")["jobs"]
    assert listed[0]["training_job"] == trained_job, "a broken job comes first"
    assert found["variables_without_gradient"] == 2 and found["tasks"] == 1
    (group,) = [g for g in found["groups"] if g["optimizer"] == "sgd"]
    missing = {v["name"] for v in group["variables"] if v["present"] is False}
    assert missing == {"partly_unused/unused/kernel", "partly_unused/unused/bias"}
    (cause,) = group["causes"]
    assert cause["cause"] == "unused" and set(cause["variables"]) == missing
    heat = get_json(f"{base_url(collector)}/api/v1/jobs/{trained_job}/heatmap?optimizer=sgd")
    row = heat["variables"].index("partly_unused/unused/kernel")
    assert set(heat["log10_norm"][row]) == {"missing"}  # a row per variable, a column per step
    for query, code, said in [("", 400, "name an optimizer: optimizer= one of probe, sgd"),
                              ("?optimizer=adam", 400, "unknown optimizer 'adam'"),
                              ("x?optimizer=sgd", 404, "unknown training job")]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                f"{base_url(collector)}/api/v1/jobs/{trained_job}{query.partition('?')[0]}"
                f"/heatmap?{query.partition('?')[2]}", timeout=10)
        assert (refused.value.code, refused.value.read().decode().strip()[:len(said)]) == (
            code, said)
    # The probe is a group of its own, sent in its own session: the 11 steps of "sgd"
    # can be in before its one step is.
    found = wait_for_steps(collector, trained_job, "probe", 1)
    (probe,) = [g for g in found["groups"] if g["optimizer"] == "probe"]
    assert probe["variables"][0]["norm"] == "NaN"  # JSON has no NaN: said in words
    assert firing_names(found) == {"GradientMissing", "GradientNonFinite"}
    # The default runbook_url is a path in gradwatch's repository: named, not a dead link.
    with urllib.request.urlopen(f"{base_url(collector)}/jobs/{trained_job}") as response:
        page = response.read().decode()
    assert "runbook: docs/runbook.md#gradientmissing" in page
    assert "href='docs/runbook.md" not in page


def firing_names(found: dict) -> set[str]:
    return {a["alertname"] for a in found["alerts"]["firing"]}


def test_job_page_in_a_browser(collector, trained_job, browser):
    wait_for_steps(collector, trained_job, "sgd", 11)
    wait_for_steps(collector, trained_job, "probe", 1)
    browser.get(base_url(collector) + "/")
    assert trained_job in browser.find_element("css selector", "table.jobs").text
    browser.get(f"{base_url(collector)}/jobs/{trained_job}")
    page = browser.find_element("tag name", "main").text
    assert "It is never read by the computation of the loss" in page
    assert "GradientMissing" in page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-job.png"))
    # Colours of the heat map as the browser decoded it, row by row.
    colours = browser.execute_script("""
        const result = [];
        for (const box of document.querySelectorAll('.heatmap')) {
          const img = box.querySelector('img');
          const data = JSON.parse(box.querySelector('script').textContent);
          const canvas = document.createElement('canvas');
          canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
          const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);
          const rows = {};
          data.names.forEach((name, row) => {
            const y = row * data.cellHeight + Math.floor(data.cellHeight / 2);
            const seen = new Set();
            for (let col = 0; col < data.steps.length; col++) {
              const p = ctx.getImageData(col * data.cellWidth + 1, y, 1, 1).data;
              const hex = [p[0], p[1], p[2]].map(v => v.toString(16).padStart(2, '0'));
              seen.add('#' + hex.join(''));
            }
            rows[name] = Array.from(seen);
          });
          result.push({loaded: img.complete && img.naturalWidth > 0, rows: rows});
        }
        return result;""")
    assert all(c["loaded"] for c in colours)
    # Hovering a cell names the variable, the step and the value.
    from selenium.webdriver.common.action_chains import ActionChains

    image = browser.find_elements("css selector", ".heatmap img")[1]  # the sgd section
    data = json.loads(browser.find_elements("css selector", ".heatmap script")[1]
                      .get_attribute("textContent"))
    row = data["names"].index("partly_unused/unused/kernel")
    x = 3 * data["cellWidth"] + data["cellWidth"] // 2 - image.size["width"] // 2
    y = row * data["cellHeight"] + data["cellHeight"] // 2 - image.size["height"] // 2
    ActionChains(browser).move_to_element_with_offset(image, x, y).perform()
    tip = browser.find_elements("css selector", ".heatmap .tip")[1]
    expected = f"partly_unused/unused/kernel · step {data['steps'][3]} · no gradient"
    assert tip.text == expected, tip.text
    probe, sgd = colours  # sections in optimizer order
    assert sgd["rows"]["partly_unused/unused/kernel"] == [heatmap.MISSING_COLOUR]
    assert heatmap.MISSING_COLOUR not in sgd["rows"]["partly_unused/hidden/kernel"]
    assert probe["rows"]["partly_unused/hidden/kernel"] == [heatmap.NONFINITE_COLOUR]
    assert console_errors(browser) == []


def test_user_input_never_executes(collector, browser):
    """A job and parameters named with markup and quotes: shown as text, never run."""
    import torch

    from gradwatch.agent.torch import GradientMonitor as TorchMonitor

    job = "x<script>window.__pwned=1</script>\"'"
    model = torch.nn.Module()
    model.add_module("<img src=x onerror=\"__pwned=2\"/>", torch.nn.Linear(4, 1))
    model.add_module("'quoted\"", torch.nn.Linear(4, 1))
    layers = list(model.children())
    with TorchMonitor(collector=collector.grpc_target, training_job=job,
                      flush_interval_s=0.05) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.1), model)
        for _ in range(3):
            optimizer.zero_grad()
            layers[0](torch.ones(2, 4)).sum().backward()  # the second layer stays unused
            optimizer.step()
    found = get_json(f"{base_url(collector)}/api/v1/jobs/{quote(job, safe='')}")
    assert found["training_job"] == job
    for url in (base_url(collector) + "/", f"{base_url(collector)}/jobs/{quote(job, safe='')}"):
        browser.get(url)
        assert browser.execute_script("return typeof __pwned === 'undefined'")
        assert job in browser.find_element("tag name", "main").text
    text = browser.find_element("tag name", "main").text
    assert "<img src=x onerror=\"__pwned=2\"/>.weight" in text
    assert "'quoted\".weight" in text
    browser.save_screenshot(str(ARTIFACTS / "web-escaping.png"))
    assert console_errors(browser) == []


def test_pages_are_behind_the_web_config(tmp_path):
    """Basic auth protects the UI and its API like /metrics."""
    import base64
    import urllib.error

    import bcrypt

    from tests.support.services import CollectorProcess

    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    with CollectorProcess("--web-config-file", str(config)) as collector:
        base = base_url(collector)
        for path in ("/", "/api/v1/jobs", "/jobs/x"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=5)
            assert refused.value.code == 401, path
        request = urllib.request.Request(base + "/api/v1/jobs")
        token = base64.b64encode(b"prometheus:secret").decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response) == {"jobs": []}


@pytest.mark.skipif(not os.environ.get("GRADWATCH_SCREENSHOT"), reason="docs screenshot")
def test_docs_screenshot(collector, trained_job, browser):
    """GRADWATCH_SCREENSHOT=docs/web-ui.png makes the README's screenshot."""
    wait_for_steps(collector, trained_job, "sgd", 11)
    browser.get(f"{base_url(collector)}/jobs/{trained_job}")
    browser.save_screenshot(os.environ["GRADWATCH_SCREENSHOT"])


def test_an_infinite_norm_is_valid_json_and_a_bad_offset_a_400(collector):
    """A gradient with an Inf element makes the global norm infinite: the API says "Inf"
    (strict JSON), the job page draws a gap. A page offset that is not a number is the
    client's mistake (400), not the server's (500)."""
    import urllib.error

    job = "web-job-inf"
    variable = tf.Variable([1.0, 2.0])
    with GradientMonitor(collector=collector.grpc_target, training_job=job,
                         flush_interval_s=0.05) as monitor:
        for step in range(3):
            grad = tf.constant([np.inf, 1.0]) if step == 1 else tf.constant([3.0, 4.0])
            monitor.observe([grad], [variable], step=step)
    url = f"{base_url(collector)}/api/v1/jobs/{job}"

    def strict(constant: str):
        raise AssertionError(f"not JSON: {constant}")

    with urllib.request.urlopen(url, timeout=10) as response:
        found = json.loads(response.read(), parse_constant=strict)
    (series,) = found["groups"][0]["global_norm"]
    assert [p[1] for p in series["points"]] == [5.0, "Inf", 5.0]
    with urllib.request.urlopen(f"{base_url(collector)}/jobs/{job}", timeout=10) as response:
        assert "<polyline" in response.read().decode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base_url(collector)}/jobs/{job}?offset=abc", timeout=10)
    assert refused.value.code == 400
    # A job's only optimizer need not be named for its heat map.
    heat = get_json(f"{base_url(collector)}/api/v1/jobs/{job}/heatmap")
    assert heat["total_variables"] == 1 and len(heat["steps"]) == 3


def test_a_nan_norm_and_an_undiagnosed_missing_gradient_are_shown(collector):
    """A NaN global norm was taken for "no report": left out of the API and the chart,
    whose axis stopped before it. It reads "NaN" and is marked on the chart. A variable
    without gradient and without diagnosis (diagnosis off) was hidden behind "every
    variable gets a gradient" while GradientMissing fired."""
    import urllib.request

    job = "web-job-nan"
    kept, dropped = tf.Variable([1.0, 2.0]), tf.Variable([3.0])
    with GradientMonitor(collector=collector.grpc_target, training_job=job,
                         flush_interval_s=0.05, diagnose=False) as monitor:
        for step in range(4):
            grad = tf.constant([np.nan, 1.0]) if step >= 2 else tf.constant([3.0, 4.0])
            monitor.observe([grad, None], [kept, dropped], step=step)
    found = get_json(f"{base_url(collector)}/api/v1/jobs/{job}")
    (series,) = found["groups"][0]["global_norm"]
    assert [p[1] for p in series["points"]] == [5.0, 5.0, "NaN", "NaN"]
    with urllib.request.urlopen(f"{base_url(collector)}/jobs/{job}", timeout=10) as response:
        page = response.read().decode()
    assert page.count("<line class=nonfinite") == 2 and "<span>3</span>" in page
    assert "every variable gets a gradient" not in page
    assert "not diagnosed" in page.split("Why gradients are missing")[1].split("</ul>")[0]


def test_a_name_as_long_as_allowed_keeps_the_tables_on_screen(collector, browser):
    """A 256-character job name (the limit) and variable name pushed every job's status
    columns off a 1,400-pixel screen; long names wrap now."""
    job, variable = "j" * 256, tf.Variable([1.0], name="v" * 200)
    with GradientMonitor(collector=collector.grpc_target, training_job=job,
                         flush_interval_s=0.05) as monitor:
        monitor.observe([tf.constant([1.0])], [variable], step=0)
    for url in (base_url(collector) + "/", f"{base_url(collector)}/jobs/{job}"):
        browser.get(url)
        widest = browser.execute_script(
            "return Math.max(...[...document.querySelectorAll('table')].map("
            "t => t.getBoundingClientRect().right))")
        assert widest <= browser.execute_script("return window.innerWidth"), url
