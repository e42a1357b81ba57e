"""The playground page, driven in a real headless browser (Debian's chromium through Selenium):
the streamed text equals sample.py's for the same settings, every token span carries the API's
log-probability, a character split over byte tokens shows whole, Stop ends a long generation and
frees its slot, and the server's errors show in the page."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from helpers import call_main, script, write_run
from starlette.testclient import TestClient

from gptjax import config
from gptjax.serve import app as serve_app
from gptjax.serve import models
from gptjax.serve.engine import Engine
from gptjax.tokenizer import ByteTokenizer

KEY = "playground-key"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ("the playground tests need Debian's chromium and chromium-driver: "
           "apt-get install chromium chromium-driver (.ci/run and `make test` do, as root)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config.config_from_dict({
        "model": {"vocab_size": 257, "context_length": 512, "n_layer": 2, "d_model": 32,
                  "n_head": 4, "d_ff": 64, "local_window": 16, "vocab_multiple": 128},
        "data": {"tokenizer": "byte"}})
    return write_run(tmp_path_factory.mktemp("playground") / "tinyrun", cfg, step=7)


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[tuple[str, Engine]]:
    """The server, as `python -m gptjax.serve --checkpoint RUN --api-key KEY` builds it, on
    127.0.0.1 in a thread of this process."""
    served = models.load(str(run_dir), None, None, [])
    engine = Engine(served.base, served.cfg.model, max_batch=4, eos_id=256, steps_per_call=1)
    engine.start()
    app = serve_app.make_app(engine, ByteTokenizer(), served.default, KEY, served.names,
                             served.root, step=served.step)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield url, engine
    srv.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail(INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _page(browser: object, url: str) -> None:
    """The page loaded, the API key typed (kept in the tab's session), the run's info shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url + "/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY, Keys.TAB)  # "change": the page reloads /info with the key
    _wait(lambda: "step 7" in browser.find_element(By.ID, "info").text)


def _wait(cond: object, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _set(browser: object, **fields: object) -> None:
    from selenium.webdriver.common.by import By

    for name, value in fields.items():
        el = browser.find_element(By.ID, name)
        if el.get_attribute("type") == "checkbox":
            if el.is_selected() != bool(value):
                el.click()
            continue
        el.clear()
        el.send_keys(str(value))


def _generate(browser: object) -> str:
    from selenium.webdriver.common.by import By

    browser.execute_script("document.body.dataset.finish = ''")
    browser.find_element(By.ID, "generate").click()
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-finish"))
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-finish")


def test_page_text_and_probabilities_equal_sample_and_api(
        server: tuple[str, Engine], browser: object, run_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    prompt = "def café(x):\n    "  # é is two byte tokens: the page must show it whole
    _page(browser, url)
    _set(browser, prompt=prompt, max_tokens=40, temperature=0.9, top_k=20, top_p=1, seed=3,
         score_prompt=True)
    assert _generate(browser) in ("length", "stop")
    out = browser.find_element(By.ID, "output")
    shown = browser.execute_script("return arguments[0].textContent", out)

    code, stdout, err = call_main(script("sample").main, [
        "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "40",
        "--temperature", "0.9", "--top-k", "20", "--top-p", "1", "--seed", "3", "--json"],
        capsys)
    assert code == 0, err
    assert shown == prompt + json.loads(stdout)["samples"][0]["text"]

    api = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"prompt": prompt, "max_tokens": 40, "temperature": 0.9, "top_k": 20,
                           "seed": 3, "echo": True, "logprobs": 5}, timeout=60).json()
    want = api["choices"][0]["logprobs"]["token_logprobs"]
    spans = out.find_elements(By.CSS_SELECTOR, "span.tok")
    got = [s.get_attribute("data-logprob") for s in spans]
    assert len(got) == len(want) == len(prompt.encode()) + json.loads(stdout)["samples"][0][
        "tokens"]
    assert got[0] is None and want[0] is None  # the first token has no context
    assert [float(g) for g in got[1:]] == want[1:]
    # The é: its first byte's span is empty (marked partial), the second shows the character.
    partial = out.find_elements(By.CSS_SELECTOR, "span.partial")
    assert partial and partial[0].get_attribute("data-bytes") == "\\xc3"
    # Hover: the probability and the five alternatives.
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(spans[6]).perform()
    tip = browser.find_element(By.ID, "tip")
    _wait(lambda: tip.is_displayed())
    assert "p = " in tip.text and len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5
    info = browser.find_element(By.ID, "info").text
    assert "tokenizer byte" in info and "context 512" in info and "tinyrun" in info
    assert "tokens/s" in browser.find_element(By.ID, "status").text


def test_stop_ends_a_long_generation(server: tuple[str, Engine], browser: object) -> None:
    from selenium.webdriver.common.by import By

    url, engine = server
    _page(browser, url)
    _set(browser, prompt="x", max_tokens=500, temperature=1.0, top_k=0, seed=1,
         score_prompt=False)
    browser.execute_script("document.body.dataset.finish = ''")
    browser.find_element(By.ID, "generate").click()
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#output span.tok")) >= 3)
    browser.find_element(By.ID, "stop_button").click()
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-finish"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-finish") == "stopped"
    assert int(browser.find_element(By.ID, "status").get_attribute("data-tokens")) < 500
    _wait(lambda: engine.busy() == (0, 0), timeout=10)  # the slot is freed


def test_errors_show_in_the_page(server: tuple[str, Engine], browser: object) -> None:
    from selenium.webdriver.common.by import By

    url, _ = server
    _page(browser, url)
    _set(browser, prompt="x", max_tokens=4, temperature=-1)
    assert _generate(browser) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "400" in error.text and "temperature" in error.text
    _set(browser, key="wrong", temperature=0.5)
    assert _generate(browser) == "error"
    assert "401" in browser.find_element(By.ID, "error").text


def test_no_ui_serves_the_api_only(run_dir: Path) -> None:
    served = models.load(str(run_dir), None, None, [])
    engine = Engine(served.base, served.cfg.model, max_batch=1, eos_id=256)
    for ui, status in ((True, 200), (False, 404)):
        app = serve_app.make_app(engine, ByteTokenizer(), served.default, ui=ui)
        with TestClient(app) as client:
            assert client.get("/").status_code == status
            assert client.get("/ui/playground.js").status_code == status
            assert client.get("/ui/../app.py").status_code == 404
            assert client.get("/health").status_code == 200
    assert serve_app.parse_args(["--checkpoint", str(run_dir), "--no-ui"]).no_ui
