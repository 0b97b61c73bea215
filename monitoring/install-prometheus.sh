#!/usr/bin/env bash
# Install Debian's prometheus package (the binary only: the packaged service is never started;
# tests run the binary themselves with a temporary config and data dir on 127.0.0.1).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    # CI runners (GitHub's ubuntu images) are not root but have password-less sudo
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "prometheus is missing; install it as root: apt-get install -y prometheus" >&2
        exit 1
    fi
fi
# policy-rc.d 101 = "do not start services" during the install (containers and CI runners)
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created=1
fi
trap '[ "$created" = 1 ] && $sudo rm -f "$policy"' EXIT
install() {
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends prometheus >/dev/null
}
install || { $sudo apt-get update -q >/dev/null && install; }
prometheus --version 2>&1 | head -1
