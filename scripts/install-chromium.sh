#!/usr/bin/env bash
# Install Debian's chromium for the browser tests of the web page (tests/serve/test_ui.py).
# Playwright drives this system browser (executable_path=/usr/bin/chromium): its own browser
# download is never used, so nothing is fetched at test time. An installed chromium is kept: on
# GitHub's ubuntu runners /usr/bin/chromium is already there (a Chromium build the image ships),
# and Ubuntu's own apt package would only install a snap.
set -euo pipefail
browser=/usr/bin/chromium
if [ -x "$browser" ]; then
    "$browser" --version 2>/dev/null | head -1
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    # CI runners (GitHub's ubuntu images) are not root but have password-less sudo
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "chromium missing; install as root: apt-get install -y chromium" >&2
        exit 1
    fi
fi
install() {
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium >/dev/null
}
install || { $sudo apt-get update -q >/dev/null && install; }
"$browser" --version 2>/dev/null | head -1
