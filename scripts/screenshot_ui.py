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
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from loadtest.serverproc import ROOT, exit_on_sigterm, running_server

log = logging.getLogger("screenshot_ui")
PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs" / "originals"
# Debian's Chromium, headless, nothing from the network (tests/serve/test_ui.py uses these too)
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
    exit_on_sigterm()  # a SIGTERM stops the server below before this process ends
    with (
        tempfile.TemporaryDirectory(prefix="screenshot-ui-") as tmp,
        running_server(
            args.model.resolve(),
            Path(tmp) / "server.log",
            env={"PREDICTION_LOG_PATH": str(Path(tmp) / "predictions.db"), "LOG_LEVEL": "warning"},
            python=Path(sys.executable),
        ) as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True
        )
        try:
            take(browser, server.url, args.cat, args.dog, args.out, args.quality)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
