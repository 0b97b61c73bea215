"""The page for people (``GET /``) and Swagger UI (``/docs``), driven in a real browser.

Debian's Chromium (``make chromium``), headless, driven by Playwright against a real ``python -m
server`` on 127.0.0.1 with the tiny colour model: real cat and dog photos are uploaded through the
page and its answer must be exactly the API's for the same file; feedback sent with the page's
buttons must be counted by the server; Swagger UI must render and its "Try it out" must predict.
Console errors (a CSP violation included) fail the test. Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import BLUE, RED, TINY_VERSION, image_bytes, photos, run, serve, start_server
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from scripts import screenshot_ui
from server.app import create_app
from server.ui import CONTENT_SECURITY_POLICY, STATIC_DIR

pytestmark = [pytest.mark.serve]

# Playwright's own browser download cannot work here (and must not): it drives the system one,
# with the flags `make screenshots` uses (headless, nothing from the network; --no-sandbox is
# needed as root, as in CI: the page is our own, served on 127.0.0.1).
CHROMIUM_ARGS = screenshot_ui.CHROMIUM_ARGS
# Bounded waits. Page-side conditions are always functions: Playwright evaluates a bare expression
# string with eval() in the page when it polls, which the page's CSP (rightly) refuses.
WAIT_MS = 15_000
TOKEN = "page-test-token-for-tests"
SMALL_LIMIT = 64 * 1024  # MAX_UPLOAD_BYTES of the restricted server


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
    if not found:
        pytest.fail("chromium is missing: run `make chromium` (Debian's package)")
    return found


def percent(p: float) -> str:
    """The page's rendering of a probability (JS: (p * 100).toFixed(1) + "%")."""
    return f"{p * 100:.1f}%"


# ---------------------------------------------------------------------- the page, no browser
def test_page_and_files_are_served_with_security_headers(settings):
    async def scenario() -> dict[str, httpx.Response]:
        async with serve(create_app(settings)) as client:
            paths = ["/", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg", "/ui/nothing.js"]
            answers = {path: await client.get(path) for path in paths}
            answers["traversal"] = await client.get("/ui/..%2fui.py")
            answers["spec"] = await client.get("/openapi.json")
            return answers

    answers = run(scenario())
    page = answers["/"]
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for path in ("/", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg"):
        headers = answers[path].headers
        assert answers[path].status_code == 200, path
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert answers["/ui/app.js"].headers["content-type"].startswith("text/javascript")
    assert answers["/ui/style.css"].headers["content-type"].startswith("text/css")
    assert answers["/ui/nothing.js"].status_code == 404
    assert answers["/ui/nothing.js"].json()["error"]["code"] == "not_found"
    assert answers["traversal"].status_code == 404
    # the page is documented as HTML, so API fuzzers do not expect JSON from it
    spec = answers["spec"].json()
    assert "text/html" in spec["paths"]["/"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("path", ["/ui", "/docs/static", "/v2/"])
def test_redirects_never_name_the_clients_host(settings, path):
    """Starlette's slash redirects built an absolute Location from the Host header: any client
    (or whoever reaches a cache in front of the server) could have them point elsewhere."""

    async def scenario() -> httpx.Response:
        async with serve(create_app(settings)) as client:
            return await client.get(path, headers={"host": "evil.example"})

    answer = run(scenario())
    assert 300 <= answer.status_code < 400, answer.status_code
    location = answer.headers["location"]
    assert location.startswith("/"), location
    assert "evil" not in location


def test_ui_and_its_folder_lead_to_the_page(settings):
    """/ui redirected to /ui/, which answered 404: both now end on the page."""

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with serve(create_app(settings)) as client:
            folder = await client.get("/ui/")
            followed = await client.get("/ui", follow_redirects=True)
            return folder, followed

    for answer in run(scenario()):
        assert answer.status_code == 200, answer.status_code
        assert answer.headers["content-type"].startswith("text/html")
        assert "Cat or dog?" in answer.text


@pytest.mark.parametrize("path", ["/", "/ui/app.js", "/docs/static/swagger-ui.css"])
@pytest.mark.parametrize("asked", ["bytes=5-1", "pages=1-2", "bytes=99999999-"])
def test_a_range_is_ignored_and_the_file_sent_whole(settings, path, asked):
    """Starlette answered a Range it could not serve (reversed, another unit, past the end)
    with a plain-text 400 or 416 of its own, without the page's security headers; RFC 9110
    lets a server ignore Range, and these files are small: 200, the whole file."""

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with serve(create_app(settings)) as client:
            return await client.get(path, headers={"range": asked}), await client.get(path)

    ranged, plain = run(scenario())
    assert ranged.status_code == 200, ranged.text[:200]
    assert ranged.content == plain.content
    # and it does not invite ranges it will not honour (Starlette's FileResponse said "bytes")
    assert ranged.headers["accept-ranges"] == plain.headers["accept-ranges"] == "none"
    if not path.startswith("/docs"):
        assert ranged.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_page_loads_nothing_from_elsewhere():
    for path in STATIC_DIR.iterdir():
        # an SVG names its XML namespace by URL; that is a name, not a download
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        for needle in ("http://", "https://", "//cdn", "@import"):
            assert needle not in text, (path, needle)
    html = (STATIC_DIR / "index.html").read_text()
    # the CSP would block inline code anyway; the page must not need any
    for needle in ("<script>", "<style", "style="):
        assert needle not in html, needle
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


# ---------------------------------------------------------------------- browser and servers
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        # launch() gives each browser a fresh temporary profile (user data dir), removed on close
        chromium = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _server(tiny_model: Path, folder: Path, **env: str):
    server = start_server(
        {
            "MODEL_PATH": str(tiny_model),
            "PREDICTION_LOG_PATH": str(folder / "predictions.db"),
            "INTRA_OP_THREADS": "1",
            "LOG_LEVEL": "warning",
            **env,
        },
        folder / "server.log",
    )
    try:
        server.wait_ready(60)
    except Exception:
        server.terminate()
        raise
    return server


@pytest.fixture(scope="module")
def open_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = _server(tiny_model, tmp_path_factory.mktemp("ui-open"))
    yield server
    assert server.terminate() == 0, server.output()


@pytest.fixture(scope="module")
def guarded_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """API_TOKEN set and a small upload limit."""
    folder = tmp_path_factory.mktemp("ui-guarded")
    server = _server(tiny_model, folder, API_TOKEN=TOKEN, MAX_UPLOAD_BYTES=str(SMALL_LIMIT))
    yield server
    assert server.terminate() == 0, server.output()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: UI_SCREENSHOTS_DIR (CI keeps them as artifacts) or a temp folder."""
    folder = os.environ.get("UI_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Tab:
    """One page in a fresh browser context, with its console errors and requests recorded."""

    def __init__(self, browser: Any, base_url: str, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(
            base_url=base_url, viewport={"width": width, "height": height}
        )
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))
        self.page.on("response", self._response)

    def _console(self, message: Any) -> None:
        # the browser also logs each refused request; those are judged in _response
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def _response(self, response: Any) -> None:
        # the page's own files must load; API refusals (fetch) are shown to the person on purpose
        if response.status >= 400 and response.request.resource_type != "fetch":
            self.errors.append(f"{response.status} {response.url}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, open_server: Any) -> Iterator[Tab]:
    t = Tab(browser, open_server.url)
    yield t
    t.close()
    assert not t.errors, t.errors  # a CSP violation or a script error fails the test


def summary(url: str) -> dict[str, Any]:
    body = httpx.get(f"{url}/monitoring/summary", timeout=10).json()
    return body["model_versions"].get(body["model_version"], {"feedback": 0, "correct": 0})


def predict_api(url: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        answer = httpx.post(f"{url}/predict", files={"file": (path.name, f)}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def upload(page: Any, path: Path) -> dict[str, Any]:
    """Choose ``path`` in the page's file input and wait for the answer; the page's view of it."""
    before = page.locator("#prediction-id").text_content()
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        """before => !document.getElementById('result').hidden
                     && document.getElementById('prediction-id').textContent !== before""",
        arg=before,
        timeout=WAIT_MS,
    )
    bars = page.locator("#bars li")
    return {
        "label": page.locator("#label").text_content(),
        "confidence_text": page.locator("#confidence").text_content(),
        "confidence": float(page.locator("#confidence").get_attribute("data-value")),
        "bars": {
            bar.get_attribute("data-class"): bar.locator(".bar-value").text_content()
            for bar in bars.all()
        },
        "model_version": page.locator("#model-version").text_content(),
        "latency": page.locator("#latency").text_content(),
        "prediction_id": page.locator("#prediction-id").text_content(),
        "preview_width": page.evaluate("document.getElementById('preview').naturalWidth"),
    }


# each bar's fill is as long as its probability (after the page's short animation)
BARS_DRAWN = """expected => [...document.querySelectorAll('#bars li')].every(li => {
    const track = li.querySelector('.bar-track').getBoundingClientRect().width;
    const fill = li.querySelector('.bar-fill').getBoundingClientRect().width;
    return track > 50 && Math.abs(fill / track - expected[li.dataset.class]) < 0.01;
})"""


def save(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def wait_feedback_done(page: Any) -> str:
    page.wait_for_selector("#feedback-status.done", timeout=WAIT_MS)
    return page.locator("#feedback-status").text_content()


# ---------------------------------------------------------------------- browser tests
@pytest.mark.slow
def test_page_shows_the_apis_answer_for_real_photos(tab: Tab, open_server: Any, tmp_path, shots):
    page = tab.page
    page.goto("/")
    assert page.title().startswith("Cat or dog")
    expect(page.locator("#feedback-count")).not_to_have_text("…", timeout=WAIT_MS)
    red = save(tmp_path / "red.png", image_bytes(RED, fmt="PNG"))
    blue = save(tmp_path / "blue.jpg", image_bytes(BLUE))
    cases = [(photos("cat", 1)[0], None), (photos("dog", 1)[0], None), (red, "cat"), (blue, "dog")]
    for path, known in cases:
        shown = upload(page, path)
        api = predict_api(open_server.url, path)
        assert shown["label"] == api["label"], path
        if known:
            assert shown["label"] == known, path
        assert shown["confidence"] == api["confidence"], path  # the same float, not a rounding
        assert shown["confidence_text"] == percent(api["confidence"])
        assert shown["bars"] == {c: percent(p) for c, p in api["probabilities"].items()}
        assert page.locator("#bars li.best").get_attribute("data-class") == api["label"]
        page.wait_for_function(BARS_DRAWN, arg=api["probabilities"], timeout=WAIT_MS)
        assert shown["model_version"] == TINY_VERSION == api["model_version"]
        assert shown["latency"].endswith(" ms")
        assert shown["prediction_id"] not in ("", api["prediction_id"])
        assert shown["preview_width"] > 0  # the preview decoded (blob: allowed by the CSP)
        if path.name.startswith("cat."):
            page.screenshot(path=str(shots / "page-cat.png"), full_page=True)
    alt = page.locator("#preview").get_attribute("alt")
    assert alt == "The photo you chose, classified as dog"
    assert (shots / "page-cat.png").stat().st_size > 10_000


def give_feedback(page: Any, url: str, photo: Path, truth: str) -> dict[str, Any]:
    """Classify ``photo`` on the page, press the button that says ``truth``, and check that the
    server counted exactly one more feedback (correct or not) and that the page shows the count."""
    before = summary(url)
    label = upload(page, photo)["label"]
    page.click("#right" if label == truth else "#wrong")  # two classes: "Wrong" = the other one
    verdict = "right" if label == truth else "wrong"
    assert f"recorded as {truth} (the model was {verdict})" in wait_feedback_done(page)
    after = summary(url)
    assert after["feedback"] == before["feedback"] + 1
    assert after["correct"] == before["correct"] + (label == truth)
    assert (
        after["confusion"][truth][label]
        == before.get("confusion", {}).get(truth, {}).get(label, 0) + 1
    )
    assert page.locator("#feedback-count").text_content() == str(after["feedback"])
    accuracy = after["correct"] / after["feedback"]
    assert page.locator("#accuracy").text_content().startswith(percent(accuracy))
    return after


@pytest.mark.slow
def test_feedback_buttons_are_counted(tab: Tab, open_server: Any, tmp_path, shots):
    page = tab.page
    page.goto("/")
    start = summary(open_server.url)
    expect(page.locator("#feedback-count")).to_have_text(str(start["feedback"]), timeout=WAIT_MS)

    # real photos: their true labels are known, whatever the tiny model says about them
    give_feedback(page, open_server.url, photos("cat", 1)[0], "cat")
    give_feedback(page, open_server.url, photos("dog", 1)[0], "dog")
    # and both buttons for sure: red is answered cat ("Right"), blue dog ("Wrong": it was a cat)
    red = save(tmp_path / "red.png", image_bytes(RED, fmt="PNG"))
    blue = save(tmp_path / "blue.png", image_bytes(BLUE, fmt="PNG"))
    give_feedback(page, open_server.url, red, "cat")
    page.screenshot(path=str(shots / "page-feedback.png"), full_page=True)
    assert upload(page, blue)["label"] == "dog"
    assert page.locator("#feedback-status").text_content() == "“Wrong” records the photo as cat."
    end = give_feedback(page, open_server.url, blue, "cat")
    assert end["feedback"] == start["feedback"] + 4


@pytest.mark.slow
def test_page_asks_for_a_token_and_shows_errors(browser: Any, guarded_server: Any, tmp_path):
    tab = Tab(browser, guarded_server.url)
    page = tab.page
    try:
        page.goto("/")
        expect(page.locator("#limit")).to_contain_text("MiB", timeout=WAIT_MS)
        # over the limit from /metadata: refused on the page, nothing sent
        noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        big = save(tmp_path / "noise.png", buffer.getvalue())
        assert big.stat().st_size > SMALL_LIMIT
        page.set_input_files("#file", str(big))
        page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "at most 0.06 MiB" in page.locator("#error").text_content()
        assert not [r for r in tab.requests if r.startswith("POST") and r.endswith("/predict")]

        # the server's refusal is shown as it is
        text_file = save(tmp_path / "notes.txt", b"this is not an image at all, just words")
        with text_file.open("rb") as f:
            refused = httpx.post(f"{guarded_server.url}/predict", files={"file": f}, timeout=10)
        error = refused.json()["error"]
        page.set_input_files("#file", str(text_file))
        expect(page.locator("#error")).to_contain_text(error["code"], timeout=WAIT_MS)
        shown = page.locator("#error").text_content()
        assert shown == f"{error['message']} (HTTP {refused.status_code}, {error['code']})"

        # feedback: 401 -> the page asks for a token; a wrong one -> 403, asked again; then stored
        before = summary(guarded_server.url)["feedback"]
        red = save(tmp_path / "red.png", image_bytes(RED, fmt="PNG"))
        assert upload(page, red)["label"] == "cat"
        page.click("#right")
        page.wait_for_selector("#token-form:not([hidden])", timeout=WAIT_MS)
        assert "HTTP 401, unauthorized" in page.locator("#token-why").text_content()
        assert page.evaluate("document.activeElement.id") == "token"
        page.fill("#token", "not-the-token")
        page.press("#token", "Enter")
        expect(page.locator("#token-why")).to_contain_text("HTTP 403", timeout=WAIT_MS)
        assert page.locator("#token-form").is_visible()
        assert summary(guarded_server.url)["feedback"] == before
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        assert "recorded as cat" in wait_feedback_done(page)
        assert summary(guarded_server.url)["feedback"] == before + 1
        assert page.evaluate("sessionStorage.getItem('catsdogs.apiToken')") == TOKEN

        # the kept token is sent without asking again
        blue = save(tmp_path / "blue.png", image_bytes(BLUE, fmt="PNG"))
        assert upload(page, blue)["label"] == "dog"
        page.click("#wrong")
        assert "recorded as cat" in wait_feedback_done(page)
        assert page.locator("#token-form").is_hidden()
        assert summary(guarded_server.url)["feedback"] == before + 2
    finally:
        tab.close()
    assert not tab.errors, tab.errors


@pytest.mark.slow
def test_page_works_at_360px_and_by_keyboard(browser: Any, open_server: Any, shots):
    tab = Tab(browser, open_server.url, width=360, height=740)
    page = tab.page
    try:
        page.goto("/")
        upload(page, photos("dog", 1)[0])
        # nothing wider than the screen: no sideways scrolling on a phone
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        page.screenshot(path=str(shots / "page-360px.png"), full_page=True)

        # keyboard: the skip link first, then the links, then the file picker, visibly focused
        page.focus("body")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        for _ in range(10):
            if page.evaluate("document.activeElement.id") == "file":
                break
            page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file"
        outline = page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle")
        assert outline == "solid"
        for _ in range(20):
            if page.evaluate("document.activeElement.id") == "right":
                break
            page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "right"
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
        # every image has alt text, every control a label
        assert page.evaluate("[...document.images].every(i => i.hasAttribute('alt'))")
        unlabeled = page.evaluate(
            """[...document.querySelectorAll('input, select')]
                 .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"""
        )
        assert unlabeled == []
    finally:
        tab.close()
    assert not tab.errors, tab.errors


@pytest.mark.slow
def test_swagger_ui_renders_and_try_it_out_predicts(tab: Tab, open_server: Any, shots):
    page = tab.page
    page.goto("/docs")
    page.wait_for_selector(".opblock", timeout=WAIT_MS)  # the operation list rendered
    assert page.locator(".opblock").count() >= 10
    operation = page.locator(".opblock.opblock-post").filter(
        has=page.locator('.opblock-summary-path[data-path="/predict"]')
    )
    assert operation.count() == 1
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    photo = photos("cat", 1)[0]
    operation.locator("input[type=file]").set_input_files(str(photo))
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status")
    status.first.wait_for(timeout=WAIT_MS)
    assert status.first.text_content().strip() == "200"
    body_text = operation.locator(".live-responses-table .response-col_description pre").first
    answer = json.loads(body_text.text_content())
    api = predict_api(open_server.url, photo)
    assert answer["label"] == api["label"]
    assert answer["probabilities"] == api["probabilities"]
    page.screenshot(path=str(shots / "docs-try-it-out.png"), full_page=False)


def test_screenshot_script_writes_both_pictures_and_stops_its_server(tiny_model: Path, tmp_path):
    """`make screenshots` (scripts/screenshot_ui.py): its own server and browser, two WebP files."""
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ui"
    env = dict(os.environ, CHROMIUM_BIN=chromium_path())
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "screenshot_ui.py"), "--model", str(tiny_model),
         "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers = re.findall(r"^(desktop|360 px): (\S+) -> (\S+)$", done.stderr, re.MULTILINE)
    assert [(where, photo) for where, photo, _ in answers] == [
        ("desktop", "cat.157.jpg"),
        ("360 px", "dog.112.jpg"),
    ]
    assert {label for _, _, label in answers} <= {"cat", "dog"}  # the page showed an answer
    for name, width in (("page-desktop.webp", 1200), ("page-360px.webp", 360)):
        with Image.open(out / name) as picture:
            assert picture.format == "WEBP"
            assert picture.width == width
            assert picture.height >= 600  # the full page, answer included
            # a real rendering, not a blank frame: the page has text and colours
            assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    started = re.search(
        r"^server pid (\d+) on http://127\.0\.0\.1:(\d+) ", done.stderr, re.MULTILINE
    )
    assert started, done.stderr[-3000:]
    pid, port = int(started.group(1)), int(started.group(2))
    assert not Path(f"/proc/{pid}").exists(), f"the script left its server (pid {pid}) running"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass
