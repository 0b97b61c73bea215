"""Screenshots of the web page (reports/ui/, not committed), taken in headless Chromium.

Starts ``python -m server`` on a free port of 127.0.0.1 with a real model and a fresh prediction
log, drops a real cat photo on the page at desktop width and presses "Right", then a dog photo at
360 px, and saves both as WebP. The server and the browser are stopped at the end, also on failure.

    make screenshots            # models/model.onnx, photos from ../shared/data/catsdogs/originals
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

log = logging.getLogger("screenshot_ui")
ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"
# the same flags as tests/serve/test_ui.py: Debian's Chromium, headless, nothing from the network
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_PATH": str(model),
        "PREDICTION_LOG_PATH": str(folder / "predictions.db"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "warning",
    }
    out = (folder / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {folder}/server.log")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop(proc)
    raise RuntimeError("the server was not ready within 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def save_webp(png: bytes, path: Path, quality: int) -> int:
    """Re-encode a screenshot as WebP; returns its size in bytes."""
    Image.open(io.BytesIO(png)).convert("RGB").save(path, format="WEBP", quality=quality, method=6)
    return path.stat().st_size


def classify(page: Any, photo: Path) -> str:
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#result:not([hidden])", timeout=WAIT_MS)
    page.wait_for_timeout(400)  # the probability bars animate for 0.3 s
    return page.locator("#label").text_content() or ""


def take(browser: Any, url: str, cat: Path, dog: Path, out: Path, quality: int) -> None:
    desktop = browser.new_context(base_url=url, viewport={"width": 1200, "height": 900})
    page = desktop.new_page()
    page.goto("/")
    log.info("desktop: %s -> %s", cat.name, classify(page, cat))
    page.click("#right")
    page.wait_for_selector("#feedback-status.done", timeout=WAIT_MS)
    page.mouse.move(0, 0)  # no hover colour on the button in the picture
    size = save_webp(page.screenshot(full_page=True), out / "page-desktop.webp", quality)
    log.info("wrote %s (%d bytes)", out / "page-desktop.webp", size)
    desktop.close()

    phone = browser.new_context(
        base_url=url, viewport={"width": 360, "height": 780}, device_scale_factor=1
    )
    page = phone.new_page()
    page.goto("/")
    log.info("360 px: %s -> %s", dog.name, classify(page, dog))
    page.locator("#answer-title").scroll_into_view_if_needed()
    size = save_webp(page.screenshot(full_page=True), out / "page-360px.webp", quality)
    log.info("wrote %s (%d bytes)", out / "page-360px.webp", size)
    phone.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "model.onnx")
    parser.add_argument("--cat", type=Path, default=PHOTOS / "cat" / "cat.157.jpg")
    parser.add_argument("--dog", type=Path, default=PHOTOS / "dog" / "dog.112.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ui")
    parser.add_argument("--quality", type=int, default=80, help="WebP quality")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the server below is stopped (raised in this thread)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="screenshot-ui-") as tmp:
        proc, url = start_server(args.model, Path(tmp))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True
                )
                try:
                    take(browser, url, args.cat, args.dog, args.out, args.quality)
                finally:
                    browser.close()
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
