"""The clinician page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium; no
browser is downloaded): load the model card, upload a scan, see the answer and its heatmap, give feedback."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.endpoint import Endpoint, start_endpoint, stop

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Endpoint:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them when it can)")
    served = start_endpoint(tmp_path_factory.mktemp("web-endpoint"))
    yield served
    stop(served.process)


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_a_clinician_uploads_a_scan_sees_the_heatmap_and_gives_feedback(endpoint: Endpoint, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    browser.get(endpoint.url + "/")
    wait_for(browser, lambda d: d.find_element(By.ID, "model").get_attribute("data-version") == "7")
    assert "test model: synthetic data only" in browser.find_element(By.ID, "card").text
    assert "validation sensitivity / specificity there 0.970 / 0.900" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "api-key").send_keys(endpoint.keys["full"])
    scan = next(endpoint.cohort.glob("tumor/*.png"))
    browser.find_element(By.ID, "file").send_keys(str(scan))
    browser.find_element(By.ID, "analyse").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "result-label").text in ("tumor", "notumor"))
    overlay = browser.find_element(By.ID, "overlay")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0)
    table = browser.find_element(By.ID, "result-table").text
    assert "P(tumour) / threshold" in table and "prediction ID" in table
    prediction_id = table.split("prediction ID")[-1].strip().split()[0]

    browser.find_element(By.CSS_SELECTOR, "#feedback-buttons button[data-label='tumor']").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "feedback-status").text.startswith("Recorded: tumor"))
    with sqlite3.connect(endpoint.log) as db:
        assert db.execute("SELECT feedback_label FROM predictions WHERE prediction_id = ?", (prediction_id,)).fetchone() == ("tumor",)


def test_the_page_shows_the_servers_refusals(endpoint: Endpoint, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    browser.get(endpoint.url + "/")
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.7 not a scan")
    browser.find_element(By.ID, "file").send_keys(str(report))
    browser.find_element(By.ID, "analyse").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").text.startswith("401"))
    browser.find_element(By.ID, "api-key").send_keys(endpoint.keys["full"])
    browser.find_element(By.ID, "analyse").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").text.startswith("415"))
    assert "unsupported file type" in browser.find_element(By.ID, "error").text
