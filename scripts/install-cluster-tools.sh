#!/usr/bin/env bash
# Install Debian's PostgreSQL and/or HAProxy (the binaries only: the packaged services are never
# started; tests run initdb/pg_ctl and haproxy themselves, on temp folders and 127.0.0.1).
#   install-cluster-tools.sh postgresql           # the store suite's throwaway PostgreSQL
#   install-cluster-tools.sh postgresql haproxy   # + the load balancer of `make cluster-test`
# An installed package is skipped, so a second run costs nothing.
set -euo pipefail
missing=()
for package in "${@:-postgresql}"; do
    case $package in
        postgresql) compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql) ;;
        haproxy) command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy) ;;
        *) echo "unknown package: $package (postgresql or haproxy)" >&2; exit 2 ;;
    esac
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
    case $package in
        postgresql) "$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -1)" --version ;;
        haproxy) haproxy -v | head -1 ;;
    esac
done
