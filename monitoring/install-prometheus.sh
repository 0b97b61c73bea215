#!/usr/bin/env bash
# Install Debian's prometheus packages (the binaries only: the packaged services are never
# started; tests run the binaries themselves with temporary configs and data dirs on 127.0.0.1).
#   install-prometheus.sh                           # prometheus + promtool
#   install-prometheus.sh prometheus-alertmanager   # prometheus-alertmanager + amtool
# Each package's main binary has the package's name, so an installed one is skipped.
set -euo pipefail
packages=("${@:-prometheus}")
missing=()
for package in "${packages[@]}"; do
    command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    # CI runners (GitHub's ubuntu images) are not root but have password-less sudo
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "${missing[*]} missing; install as root: apt-get install -y ${missing[*]}" >&2
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
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}
install || { $sudo apt-get update -q >/dev/null && install; }
for package in "${missing[@]}"; do
    "$package" --version 2>&1 | head -1
done
