"""The playground page at GET /, driven in headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import shutil

import pytest
from fake_engine import GREEDY_TEXT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_in_the_playground_streams_a_reply(serve, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, engine = serve(api_key="pk", served_model_names=("m1", "m2"))
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 20)
    browser.find_element(By.ID, "apikey").send_keys("pk")
    browser.execute_script("document.getElementById('apikey').dispatchEvent(new Event('change'))")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "input").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".msg.assistant"), GREEDY_TEXT))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
    prompt_ids, params = engine.requests[-1]
    assert "Hello there" in engine.tokenizer.decode(prompt_ids) and params.temperature == 0
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "tokens"))
