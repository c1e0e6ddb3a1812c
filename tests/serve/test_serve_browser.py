"""End to end in headless Chromium: pick a reference, search, watch the reasoning and the results, steer.

Needs Debian's ``chromium`` and ``chromedriver`` (``scripts/test-setup.sh`` installs them); skipped with the
reason when they are missing (``CIRCOT_CHROMIUM`` / ``CIRCOT_CHROMEDRIVER`` point elsewhere). The server runs
in a thread on a free loopback port; the browser only talks to it. Screenshots are saved under
``test-artifacts/`` (``CIRCOT_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CIRCOT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CIRCOT_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(os.environ.get("CIRCOT_TEST_ARTIFACTS", "test-artifacts"))


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (install Debian's chromium and chromium-driver: scripts/test-setup.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'circot[dev]')"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture
def live_server(serve_live, tiny_model, gallery_index):
    from circot.serve import create_app

    return serve_live(create_app(gallery_index, tiny_model))


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1360,1240",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_search_shows_reasoning_and_results(live_server, browser, tiny_model, gallery_index, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from circot.prompts import parse_cot

    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    browser.get(live_server + "/")
    assert browser.title.startswith("circot")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".thumb img")) == 12)
    wait.until(lambda d: "12 gallery images" in d.find_element(By.ID, "service").text)

    # the page splits a half-written reasoning into its parts while it streams
    live = browser.execute_script(
        "return splitLive(arguments[0])", "<caption>a red circle</caption><reasoning>make it gr</reas"
    )
    assert live == {
        "caption": "a red circle",
        "reasoning": "make it gr",
        "conclusion": "",
        "active": "reasoning",
    }
    done = browser.execute_script(
        "return splitLive(arguments[0])",
        "<caption>a</caption><reasoning>b</reasoning><conclusion>c</conclusion><emb>",
    )
    assert done == {"caption": "a", "reasoning": "b", "conclusion": "c", "active": None}

    # pick the red circle from the gallery, type the modification, search
    browser.find_element(By.CSS_SELECTOR, '.thumb[data-id="red-circle.png"]').click()
    assert "red-circle.png" in browser.find_element(By.ID, "ref-label").text
    text = "make the circle green and move it to the right"
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("8")
    browser.find_element(By.ID, "search-btn").click()

    # the reasoning streams in, then the results appear
    wait.until(lambda d: d.find_element(By.ID, "cot-raw").text.strip() != "")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 8)
    image = Image.open(gallery_index.path_of("red-circle.png")).convert("RGB")
    streamed = "".join(tiny_model.stream_reasoning(image, text))
    raw = browser.execute_script("return document.getElementById('cot-raw').textContent")
    assert raw == streamed
    cot = parse_cot(streamed)
    status = browser.find_element(By.ID, "cot-status").text
    assert status == ("well-formed" if cot.well_formed else f"malformed: {', '.join(cot.problems)}")
    for part in ("caption", "reasoning", "conclusion"):
        shown = browser.execute_script(f"return document.getElementById('edit-{part}').value")
        assert shown == getattr(cot, part)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    ids = [c.get_attribute("data-id") for c in cards]
    assert set(ids) <= set(gallery_index.ids) and len(set(ids)) == 8
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score-value").text) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert all(
        browser.execute_script("return arguments[0].naturalWidth", c.find_element(By.TAG_NAME, "img")) > 0
        for c in cards
    ), "a result image did not load"
    assert not browser.find_element(By.ID, "error").is_displayed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "serve-browser-search.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # steer: write the conclusion and search again from it
    conclusion = browser.find_element(By.ID, "edit-conclusion")
    conclusion.clear()
    conclusion.send_keys("a big green circle on the right")
    steer = browser.find_element(By.ID, "steer-btn")
    wait.until(lambda d: steer.is_enabled())
    steer.click()
    wait.until(lambda d: "from your reasoning" in d.find_element(By.ID, "timings").text)
    assert browser.find_element(By.ID, "cot-status").text == "your reasoning"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .result")) == 8
    shot = ARTIFACTS / "serve-browser-steered.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # a bad upload is reported on the page, not as a broken page
    browser.find_element(By.ID, "tab-upload").click()
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not an image")
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    browser.find_element(By.ID, "search-btn").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "not an image" in browser.find_element(By.ID, "error").text


def test_a_service_with_an_api_key_asks_the_page_for_it(serve_live, tiny_model, gallery_index, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from circot.serve import create_app

    url = serve_live(create_app(gallery_index, tiny_model, api_key="page-key-1"))
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    browser.get(url + "/")
    form = browser.find_element(By.ID, "key-form")
    wait.until(lambda d: form.is_displayed())  # asked before the gallery is loaded
    assert browser.find_elements(By.CSS_SELECTOR, ".thumb") == []
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong-key")
    browser.find_element(By.ID, "key-btn").click()
    wait.until(lambda d: "refused" in d.find_element(By.ID, "key-label").text and form.is_displayed())
    assert "API key" in browser.find_element(By.ID, "error").text
    key.send_keys("page-key-1")
    browser.find_element(By.ID, "key-btn").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".thumb img")) == 12)
    assert not form.is_displayed()
    loaded = "return Array.from(document.querySelectorAll(arguments[0])).every(i => i.complete && i.naturalWidth > 0)"
    wait.until(lambda d: d.execute_script(loaded, ".thumb img"))  # images fetched with the key
    browser.find_element(By.CSS_SELECTOR, '.thumb[data-id="red-circle.png"]').click()
    browser.find_element(By.ID, "text").send_keys("make the circle green")
    browser.execute_script("arguments[0].click()", browser.find_element(By.CSS_SELECTOR, "input[value=fast]"))
    browser.find_element(By.ID, "search-btn").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) > 0)
    wait.until(lambda d: d.execute_script(loaded, "#results .result img, #ref-img"))
    assert not browser.find_element(By.ID, "error").is_displayed()
    # a reload in the same tab keeps the key; it is not asked again
    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".thumb img")) == 12)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
