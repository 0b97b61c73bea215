#!/usr/bin/env bash
# Install Debian packages the test suites run as plain binaries: the packaged services are never
# started; tests run the binaries themselves with temporary configs and data dirs on 127.0.0.1.
#   apt-install.sh prometheus                 # prometheus + promtool (scrape and alert tests)
#   apt-install.sh prometheus-alertmanager    # + amtool (alert delivery test)
#   apt-install.sh chromium                   # the browser tests of the web page (test_ui.py)
#   apt-install.sh postgresql haproxy         # the store suite's PostgreSQL, make cluster-test
# An installed package is skipped, so a second run costs nothing.
set -euo pipefail
if [ "$#" -eq 0 ]; then
    echo "usage: apt-install.sh PACKAGE..." >&2
    exit 2
fi

# Whether a package's binary is already here (not only as a Debian package: GitHub's ubuntu
# runners ship their own /usr/bin/chromium, and Ubuntu's apt chromium would only install a snap).
installed() {
    case $1 in
        postgresql) compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null ;;
        haproxy) command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] ;;
        chromium) [ -x /usr/bin/chromium ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;  # the main binary has the package's name
    esac
}

# sed reads the whole output: `head -1` would exit first and, under pipefail, the SIGPIPE of
# the version command (haproxy -v prints several lines) would fail the install (exit 141).
show_version() {
    case $1 in
        postgresql) "$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -1)" --version ;;
        haproxy) haproxy -v | sed -n 1p ;;
        chromium) /usr/bin/chromium --version 2>/dev/null | sed -n 1p ;;
        *) "$1" --version 2>&1 | sed -n 1p ;;
    esac
}

missing=()
for package in "$@"; do
    if installed "$package"; then
        [ "$package" = chromium ] && show_version chromium  # the browser tests name the build
    else
        missing+=("$package")
    fi
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
    show_version "$package"
done
