#!/usr/bin/env bash
# Install Debian's prometheus package (the binary only: the packaged service is never started;
# tests run the binary themselves with a temporary config and data dir on 127.0.0.1).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "prometheus is missing; install it as root: apt-get install -y prometheus" >&2
    exit 1
fi
# policy-rc.d 101 = "do not start services" during the install (containers and CI runners)
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created=1
fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
prometheus --version 2>&1 | head -1
