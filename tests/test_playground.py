"""The playground at `GET /`: served by the app itself, offline, and working in a real browser.

The browser tests drive Debian's headless Chromium through chromedriver (selenium) against the
app served by uvicorn on loopback. Without Chromium they are skipped, except under CI (the `CI`
environment variable), where a missing browser is a failure.
"""

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.main import create_app
from service.routes import playground
from service.settings import Settings
from tests.contract import CAUSAL, MULTI_HEAD, WINDOW

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
# Debian's packages; the variables point elsewhere.
CHROMIUM = os.environ.get("PLAYGROUND_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PLAYGROUND_CHROMEDRIVER", "/usr/bin/chromedriver")

BOOK_SENTENCE = "Your journey starts with one step"
BOOK_TOKENS = ["Your", " journey", " starts", " with", " one", " step"]
# What the heatmap shows for them: spaces made visible.
BOOK_LABELS = ["Your", "\u2423journey", "\u2423starts", "\u2423with", "\u2423one", "\u2423step"]

MEDIA_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
# An absolute or protocol-relative URL naming a host.
OFF_HOST = re.compile(r"(?:\b[a-z][a-z0-9+.-]*:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.IGNORECASE)


def playground_app() -> FastAPI:
    app = create_app(Settings())
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.include_router(playground.router)
    return app


# --- served by the app, without a browser ------------------------------------------------------


class Links(HTMLParser):
    """Every URL-valued attribute of a page: (tag, attribute, value)."""

    URL_ATTRIBUTES: ClassVar[set[str]] = {
        "href",
        "src",
        "action",
        "formaction",
        "srcset",
        "poster",
        "data",
    }

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in self.URL_ATTRIBUTES and value is not None:
                self.links.append((tag, name, value))


def page_links(page: str) -> list[tuple[str, str, str]]:
    parser = Links()
    parser.feed(page)
    return parser.links


@pytest.fixture(scope="module")
async def page_client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=playground_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_the_page_is_served_at_the_root(page_client):
    response = await page_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>Attention playground</title>" in response.text
    assert ("a", "href", "/docs") in page_links(response.text)
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


async def test_every_asset_the_page_uses_is_served_with_its_type(page_client):
    page = (await page_client.get("/")).text
    assets = [
        value
        for tag, _, value in page_links(page)
        if tag in ("script", "link", "img") and not value.startswith("data:")
    ]
    assert {Path(urlsplit(asset).path).suffix for asset in assets} >= {".css", ".js"}
    for asset in assets:
        response = await page_client.get(asset)
        assert response.status_code == 200, asset
        media_type = response.headers["content-type"].split(";")[0]
        assert media_type == MEDIA_TYPES[Path(urlsplit(asset).path).suffix], asset
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_no_url_points_off_host(page_client):
    page = (await page_client.get("/")).text
    for tag, attribute, value in page_links(page):
        parts = urlsplit(value)
        assert not parts.netloc, f"<{tag} {attribute}={value!r}> names a host"
        assert parts.scheme in ("", "data"), f"<{tag} {attribute}={value!r}> leaves the page"
    texts = {"/": page}
    for tag, _, value in page_links(page):
        if tag in ("script", "link") and not value.startswith("data:"):
            texts[value] = (await page_client.get(value)).text
    for url, text in texts.items():
        assert not OFF_HOST.findall(text), f"{url} names another host"
        for target in re.findall(r"url\(([^)]*)\)", text):
            assert not urlsplit(target.strip("'\" ")).netloc, f"{url}: url({target})"


async def test_an_unknown_asset_is_a_404(page_client):
    for path in ("/playground/missing.js", "/playground/..%2Fplayground.py", "/playground/"):
        assert (await page_client.get(path)).status_code == 404, path


async def test_the_page_is_left_out_of_the_openapi_document(page_client):
    paths = (await page_client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert not [path for path in paths if path.startswith("/playground")]


# --- in a real browser --------------------------------------------------------------------------


def need(ready: bool, reason: str) -> None:
    """Skip without the browser, except under CI, which must run these tests."""
    if not ready:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the browser tests", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, with its lifespan."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        playground_app(), log_config=None, access_log=False, ws="none", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    while httpx.get(f"{base}/readyz").status_code != 200:  # the port opens before the warm-up
        assert thread.is_alive() and time.monotonic() < deadline + 60, "never ready"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(15)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need(
        bool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
        f"no Chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}): "
        "apt-get install chromium chromium-driver",
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need(False, "selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="playground-chromium-") as profile:
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,1000",
            "--force-device-scale-factor=1",
            "--lang=en-US",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def page(browser, server):
    """The playground, loaded, after the example it runs on load."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.set_window_size(1280, 1000)
    browser.get(f"{server}/")
    wait(browser, lambda: state(browser)["runs"] >= 1)
    assert state(browser)["state"] == "done", error_texts(browser)
    browser.get_log("browser")  # start each test with an empty console
    return browser


def wait(driver, condition, timeout: float = 30) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda _: condition())


def state(driver) -> dict[str, Any]:
    return driver.execute_script(
        "return {state: document.body.dataset.state || '',"
        " runs: Number(document.body.dataset.runs || 0)}"
    )


def submit(driver) -> str:
    """Click the button and wait for the answer; the page's state: done or error."""
    from selenium.webdriver.common.by import By

    runs = state(driver)["runs"]
    driver.find_element(By.ID, "submit").click()
    wait(driver, lambda: state(driver)["runs"] > runs)
    return state(driver)["state"]


def fill(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    control = driver.find_element(By.ID, field)
    control.clear()
    if value:
        control.send_keys(value)


def choose(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, field)).select_by_value(value)


def use_input(driver, kind: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"input[name=input][value={kind}]").click()


def fill_folded(driver, field: str, value: str) -> None:
    """Open the disclosure a field sits in, then fill it."""
    driver.execute_script(
        "const d = document.getElementById(arguments[0]).closest('details');if (d) d.open = true;",
        field,
    )
    fill(driver, field, value)


def heatmaps(driver) -> list[dict[str, Any]]:
    return driver.execute_script(
        """
        const tokens = (cells) => [...cells].map((th) => th.dataset.token);
        return [...document.querySelectorAll("#heatmaps figure")].map((figure) => ({
          caption: figure.querySelector("figcaption").textContent,
          columns: tokens(figure.querySelectorAll("thead th[data-token]")),
          rows: tokens(figure.querySelectorAll("tbody th[data-token]")),
          shown: [...figure.querySelectorAll("thead th[data-token]")].map((th) => th.textContent),
          cells: [...figure.querySelectorAll("tbody tr")].map((tr) =>
            [...tr.querySelectorAll("td")].map((td) => ({
              value: Number(td.dataset.value),
              text: td.textContent,
              masked: td.classList.contains("masked"),
              fill: td.style.backgroundColor,
              label: td.getAttribute("aria-label") || "",
              title: td.title,
            }))),
        }));
        """
    )


def error_texts(driver) -> dict[str, str]:
    """The visible error messages, by the id of their box."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.error:not([hidden])')]"
        ".map((box) => [box.id, box.textContent]))"
    )


def console_errors(driver) -> list[str]:
    """Console errors, less the 4xx answers a test asked for (Chromium logs each)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not re.search(r"status of 4\d\d", entry["message"])
    ]


def full_page_screenshot(driver, path: Path, width: int) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height)
    driver.save_screenshot(str(path))


def test_the_book_sentence_in_every_variant(page, server):
    variants = httpx.get(f"{server}/attention").json()
    assert [
        option.get_attribute("value")
        for option in page.find_elements("css selector", "#variant option")
    ] == [variant["name"] for variant in variants]
    for variant in variants:
        name = variant["name"]
        choose(page, "variant", name)
        fill(page, "text", BOOK_SENTENCE)
        assert submit(page) == "done", error_texts(page)

        # The request, as the curl command shown: it is the one the page sent.
        curl = page.find_element("id", "curl")
        body = curl.get_attribute("data-body")
        assert curl.text == (
            f"curl -s {server}{variant['path']} -H 'Content-Type: application/json' -d '{body}'"
        )
        sent = json.loads(body)
        assert sent["text"] == BOOK_SENTENCE and sent["decimals"] == 4
        answer = httpx.post(
            f"{server}{variant['path']}",
            content=body,
            headers={"Content-Type": "application/json"},
        ).json()
        weights = answer["attention_weights"]
        heads = weights if name in MULTI_HEAD else [weights]
        assert [token["text"] for token in answer["tokens"]] == BOOK_TOKENS

        drawn = heatmaps(page)
        expected_heads = variant["parameters"].get("num_heads", {"default": 1})["default"]
        assert len(drawn) == len(heads) == expected_heads, name
        T = len(BOOK_TOKENS)
        for h, heatmap in enumerate(drawn):
            assert heatmap["columns"] == heatmap["rows"] == BOOK_TOKENS
            assert heatmap["shown"] == BOOK_LABELS
            assert [len(row) for row in heatmap["cells"]] == [T] * T
            for i, row in enumerate(heatmap["cells"]):
                for j, cell in enumerate(row):
                    assert cell["value"] == heads[h][i][j], (name, h, i, j)
                    assert str(cell["value"]) in cell["label"] and cell["title"] == cell["label"]
                    beyond_window = name == "sliding-window" and i - j >= WINDOW
                    hidden = name in CAUSAL and (j > i or beyond_window)
                    # The causal triangle (and what lies beyond a window) is blank: masked, no
                    # number, no colour.
                    assert cell["masked"] == hidden, (name, h, i, j)
                    if beyond_window:
                        assert "beyond the window" in cell["label"]
                    if hidden:
                        assert cell["value"] == 0 and cell["text"] == "" and cell["fill"] == ""
                    else:
                        assert cell["text"] == f"{cell['value']:.2f}" and cell["fill"]

        kv = answer.get("kv_cache")
        kv_text = page.find_element("id", "kv-cache").text
        assert page.find_element("id", "kv").is_displayed() == (kv is not None), name
        if kv is not None:
            assert kv_text.startswith(
                f"{kv['values_per_token']} values per token \u00d7 {kv['tokens']} tokens = "
                f"{kv['values']:,} values"
            ), (name, kv_text)

        tables = page.find_elements("css selector", "#context-tables tbody tr")
        assert len(tables) == T
        assert tables[1].find_element("css selector", "td").text == str(
            answer["context_vectors"][1][0]
        )
    assert console_errors(page) == []


def test_the_screenshots(page):
    ARTIFACTS.mkdir(exist_ok=True)
    choose(page, "variant", "multi-head")
    assert submit(page) == "done"
    page.execute_script("window.scrollTo(0, 0)")
    page.save_screenshot(str(ARTIFACTS / "playground.png"))
    full_page_screenshot(page, ARTIFACTS / "playground-full.png", 1280)
    # A phone: one column, nothing wider than the screen, the heatmap readable.
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    page.refresh()
    wait(page, lambda: state(page)["runs"] >= 1)
    assert page.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    ), "the page scrolls sideways on a phone"
    figure = page.execute_script(
        "const r = document.querySelector('#heatmaps figure').getBoundingClientRect();"
        "return [r.left, r.right, window.innerWidth]"
    )
    assert figure[0] >= 0 and figure[1] <= figure[2], figure
    page.execute_script("document.getElementById('weights').scrollIntoView()")
    page.save_screenshot(str(ARTIFACTS / "playground-phone.png"))


def test_a_bad_value_is_shown_next_to_its_field(page):
    choose(page, "variant", "multi-head")
    fill(page, "d_out", "3")  # the fused implementation splits d_out into 2 heads
    assert submit(page) == "error"
    errors = error_texts(page)
    assert "not divisible by num_heads=2" in errors["err-d_out"]
    assert set(errors) == {"err-d_out", "err-general"}
    assert "422" in errors["err-general"]
    assert page.find_element("id", "d_out").get_attribute("aria-invalid") == "true"
    assert page.find_element("css selector", "#err-general a").get_attribute("hash") == "#d_out"
    assert not page.find_element("id", "weights").is_displayed()

    fill(page, "d_out", "")
    fill(page, "seed", "abc")
    assert submit(page) == "error"
    assert error_texts(page)["err-seed"].endswith("Input should be a valid integer")
    assert page.find_element("id", "d_out").get_attribute("aria-invalid") is None

    fill(page, "seed", "")
    # A field folded away opens to show its error.
    fill_folded(page, "embedding_dim", "0")
    page.execute_script("document.getElementById('embedding_dim').closest('details').open = false")
    assert not page.find_element("id", "embedding_dim").is_displayed()
    assert submit(page) == "error"
    assert "greater than or equal to 1" in error_texts(page)["err-embedding_dim"]
    assert page.find_element("id", "embedding_dim").is_displayed()
    fill(page, "embedding_dim", "")

    use_input(page, "embeddings")
    fill(page, "embeddings", "[[1, 2], [3]]")
    assert submit(page) == "error"
    assert "rectangular" in error_texts(page)["err-embeddings"]
    fill(page, "embeddings", '[[1, 2], [3, "x"]]')
    assert submit(page) == "error"
    assert error_texts(page)["err-embeddings"].endswith("(at embeddings[1][1])")

    # Not JSON at all: said at once, nothing sent.
    runs = state(page)["runs"]
    fill(page, "embeddings", "[[1, 2],")
    page.find_element("id", "submit").click()
    wait(page, lambda: "err-embeddings" in error_texts(page))
    assert "not valid JSON" in error_texts(page)["err-embeddings"]
    assert state(page)["runs"] == runs

    fill(page, "embeddings", "[[0.43, 0.15, 0.89], [0.55, 0.87, 0.66]]")
    fill(page, "d_out", "2")  # d_in = 3 would not split into 2 heads
    assert submit(page) == "done", error_texts(page)
    assert error_texts(page) == {}
    drawn = heatmaps(page)
    assert [h["columns"] for h in drawn] == [["0", "1"]] * 2  # embeddings: rows 0..T-1
    assert console_errors(page) == []


def test_the_keyboard_alone_runs_the_page(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    # Tab through the page from the top: every control of the form, then the results.
    page.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    reached = []
    for _ in range(60):
        ActionChains(page).send_keys(Keys.TAB).perform()
        reached.append(
            page.execute_script(
                "const e = document.activeElement;"
                "return e.id || (e.dataset.row !== undefined ? 'cell' : e.tagName)"
            )
        )
        if reached[-1] == "cell":
            break
    for control in ("text", "variant", "implementation", "seed", "decimals", "submit", "copy"):
        assert control in reached, (control, reached)
    assert reached[-1] == "cell", reached
    assert reached.index("text") < reached.index("variant") < reached.index("submit")

    # Arrow keys move through the weights; the focused cell's value is read out.
    ActionChains(page).send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, Keys.ARROW_RIGHT).perform()
    focused = page.execute_script("return document.activeElement.dataset")
    assert (focused["row"], focused["col"]) == ("2", "1")
    assert focused["value"] in page.find_element("id", "readout").text

    # Enter on the button sends the request; Ctrl+Enter does from the text box.
    page.find_element("id", "seed").send_keys("789")
    runs = state(page)["runs"]
    page.execute_script("document.getElementById('submit').focus()")
    ActionChains(page).send_keys(Keys.ENTER).perform()
    wait(page, lambda: state(page)["runs"] == runs + 1)
    assert '"seed": 789' in page.find_element("id", "curl").text
    page.find_element("id", "text").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(page, lambda: state(page)["runs"] == runs + 2)
    assert state(page)["state"] == "done"

    # The copy button answers, whether or not headless Chromium grants the clipboard.
    page.execute_script("document.getElementById('copy').focus()")
    ActionChains(page).send_keys(Keys.ENTER).perform()
    wait(page, lambda: page.find_element("id", "copy-status").text != "")
    assert page.find_element("id", "copy-status").text in (
        "Copied.",
        "Selected: press Ctrl+C (⌘C) to copy.",
    )


def test_labels_and_contrast(page):
    choose(page, "variant", "causal")
    assert submit(page) == "done"
    unlabelled = page.execute_script(
        """
        return [...document.querySelectorAll("input, select, textarea, button")]
          .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label")
                         && !(c.tagName === "BUTTON" && c.textContent.trim()))
          .map((c) => c.outerHTML);
        """
    )
    assert unlabelled == []
    # WCAG contrast of every text against the background it is drawn on.
    low = page.execute_script(
        """
        const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
        const lum = ([r, g, b]) => [r, g, b].map((v) => {
          v /= 255; return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        }).reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
        const background = (e) => {
          for (; e; e = e.parentElement) {
            const c = rgb(getComputedStyle(e).backgroundColor);
            if (c.length === 3 || c[3] > 0) return c;
          }
          return [255, 255, 255];
        };
        const low = [];
        for (const e of document.querySelectorAll("body *")) {
          const text = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
          if (!text || !e.getClientRects().length || getComputedStyle(e).visibility !== "visible")
            continue;
          const [a, b] = [lum(rgb(getComputedStyle(e).color)), lum(background(e))];
          const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
          if (ratio < 4.5) low.push(`${e.tagName}#${e.id}.${e.className}: ${ratio.toFixed(2)}`);
        }
        return low;
        """
    )
    assert low == []
