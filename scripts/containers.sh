#!/usr/bin/env bash
# Build, run and smoke-test the project's images with whatever engine this host has.
#
#   scripts/containers.sh install       container tools from apt (podman, buildah, runc, debootstrap)
#   scripts/containers.sh base          the pinned base image, or a local stand-in when no registry answers
#   scripts/containers.sh build-serve   Dockerfile.serve -> $IMAGE_SERVE, $MODEL baked in (MODEL=: none)
#   scripts/containers.sh build-train   Dockerfile.train -> $IMAGE_TRAIN
#   scripts/containers.sh smoke         run $IMAGE_SERVE on a free 127.0.0.1 port and check it
#   scripts/containers.sh labels        check $IMAGE_SERVE's OCI labels and its packages against the SBOM
#   scripts/containers.sh load          make load (locust, thresholds) against $IMAGE_SERVE
#   scripts/containers.sh size          print the serve image's size
#   scripts/containers.sh compose-check validate compose.yaml with every profile
#
# Engine: $CONTAINER_ENGINE, else docker when a Docker daemon answers (GitHub Actions), else podman
# (installed on demand). With podman on a host without registry access (this project's dev and CI
# machines) the base image is made locally with debootstrap and stands in for the Dockerfiles'
# digest-pinned reference (--build-context), and the build sees the host's pip configuration, CA
# bundle and local package indexes through read-only build volumes: nothing of that lands in an
# image layer and the Dockerfiles stay the ones a normal Docker host builds.
# Both images get OCI labels: source (IMAGE_SOURCE, else the GitHub repository or git remote),
# revision (GIT_COMMIT, else git rev-parse HEAD) and version (IMAGE_VERSION, else pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_SERVE=${IMAGE_SERVE:-catsdogs-serve:local}
IMAGE_TRAIN=${IMAGE_TRAIN:-catsdogs-train:local}
# unset: the exported model; set but empty: an image without a model, which serves MODEL_URI
MODEL=${MODEL-models/model.onnx}
# The base image both Dockerfiles pin (FROM name:tag@sha256:digest), and the local image that
# stands in for it where no registry is reachable (never under the official name: it is not it).
BASE_REF=$(grep --max-count=1 -oE '^FROM [^ ]+@sha256:[0-9a-f]{64}' Dockerfile.serve | cut -d' ' -f2)
STANDIN_IMAGE=${STANDIN_IMAGE:-localhost/debian-standin:bookworm-slim}
SBOM=${SBOM:-reports/sbom/serve.cdx.json}
CACHE_DIR=${CONTAINERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/catsdogs-containers}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}
SMOKE_DATA=${SMOKE_DATA:-../shared/data/catsdogs/images}
APT_TOOLS=(podman buildah runc debootstrap uidmap fuse-overlayfs)

log() { printf '[containers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

engine() {
    if [[ -n ${CONTAINER_ENGINE:-} ]]; then
        echo "$CONTAINER_ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
    else
        echo podman
    fi
}

# ---------------------------------------------------------------- tools
cmd_install() {
    local missing=()
    for pkg in "${APT_TOOLS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "container tools already installed"
        return
    fi
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

need_engine() {
    local e
    e=$(engine)
    if [[ $e == podman ]] && ! command -v podman >/dev/null; then
        cmd_install
    fi
    command -v "$e" >/dev/null || die "container engine '$e' not found"
}

# podman's runtime flags for this kind of host: crun fails on its cgroups v1 hybrid setup and the
# default rlimits cannot be raised there, so runc with explicit limits (harmless elsewhere).
run_flags() {
    if [[ $(engine) == podman ]]; then
        echo "--runtime runc --ulimit nofile=16384:16384 --ulimit nproc=8192:8192"
    fi
}

# How compose.yaml runs the serving image, as deploy/k8s does: read-only root, no capabilities,
# no privilege escalation, and tmpfs mounts where the server writes: the prediction log's folder
# (from the image's PREDICTION_LOG_PATH; the default model cache is inside it) and /tmp for
# SQLite's temporary files. A tmpfs over a folder of the image keeps that folder's mode but is
# owned by root, so it is given to the image's user: podman's U option (podman 4.3 refuses
# uid=/gid= there), the kernel's uid/gid options with Docker. Podman's --read-only would add
# tmpfs mounts of its own on /run and /var/tmp; without them the container sees what Docker's
# and Kubernetes' read-only roots show.
serve_run_flags() {
    local e user log_path owner
    e=$(engine)
    user=$("$e" image inspect --format '{{.Config.User}}' "$IMAGE_SERVE")
    [[ -n $user ]] || die "$IMAGE_SERVE sets no USER"
    log_path=$("$e" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' \
        "$IMAGE_SERVE" | sed -n 's/^PREDICTION_LOG_PATH=//p')
    [[ $log_path == /* ]] || die "$IMAGE_SERVE sets no absolute PREDICTION_LOG_PATH"
    if [[ $e == podman ]]; then
        owner=U
        echo "--read-only-tmpfs=false"
    else
        owner="uid=${user%%:*},gid=${user##*:}"
    fi
    echo "--read-only --cap-drop ALL --security-opt no-new-privileges" \
        "--tmpfs ${log_path%/*}:size=1g,$owner --tmpfs /tmp:size=256m,mode=1777"
}

# ---------------------------------------------------------------- base image
# The first http(s) Debian mirror that apt on this host is configured with.
debian_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -E '^[[:space:]]*(deb|URIs:)[[:space:]]' \
        | grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' | awk 'NR == 1 { print $1 }' || true)
    echo "${DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

image_exists() {
    local e
    e=$(engine)
    if [[ $e == podman ]]; then podman image exists "$1"; else docker image inspect "$1" >/dev/null 2>&1; fi
}

# The pinned base image itself when a registry answers; else a faithful stand-in for
# debian:bookworm-slim: debootstrap minbase plus the slimming the official image applies (dpkg path
# excludes, apt's docker-* config, no apt lists), imported as $STANDIN_IMAGE. The build then maps
# the Dockerfiles' pinned reference to it (base_build_flags), so no Dockerfile changes.
cmd_base() {
    need_engine
    [[ -n $BASE_REF ]] || die "no digest-pinned FROM line in Dockerfile.serve"
    if image_exists "$BASE_REF"; then
        log "base image $BASE_REF present"
        return
    fi
    if docker_hub_reachable; then
        log "pulling $BASE_REF"
        "$(engine)" pull "$BASE_REF" && return
    fi
    if image_exists "$STANDIN_IMAGE"; then
        log "stand-in $STANDIN_IMAGE present (for $BASE_REF)"
        return
    fi
    local tarball=$CACHE_DIR/debian-bookworm-slim.tar
    if [[ ! -s $tarball ]]; then
        [[ $(id -u) == 0 ]] || die "debootstrap needs root"
        command -v debootstrap >/dev/null || cmd_install
        local rootfs
        rootfs=$(mktemp -d)
        local mirror
        mirror=$(debian_mirror)
        log "debootstrap bookworm from $mirror (about a minute)"
        debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
            || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed"; }
        slim_rootfs "$rootfs" "$mirror"
        mkdir -p "$CACHE_DIR"
        tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs" "$rootfs.log"
    fi
    log "importing $tarball as $STANDIN_IMAGE (stands in for $BASE_REF)"
    "$(engine)" import --change 'CMD ["bash"]' "$tarball" "$STANDIN_IMAGE" >/dev/null
}

# Nothing when the pinned base image is here; else the flag that builds FROM the stand-in.
base_build_flags() {
    if ! image_exists "$BASE_REF"; then
        log "building FROM $STANDIN_IMAGE in place of $BASE_REF (no registry)"
        echo "--build-context $BASE_REF=docker-image://$STANDIN_IMAGE"
    fi
}

docker_hub_reachable() {
    [[ ${OFFLINE_BASE:-0} != 1 ]] && timeout 5 bash -c '</dev/tcp/registry-1.docker.io/443' 2>/dev/null
}

slim_rootfs() {
    local root=$1 mirror=$2
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d" "$root/etc/apt/sources.list.d"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# This is the "slim" variant of the Debian base image.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'APT::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian*}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # What the dpkg excludes would have kept out had they been there from the start.
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$root"/usr/share/{man,info,groff,lintian,linda}/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/* "$root"/tmp/* "$root"/etc/machine-id "$root"/etc/hostname
    : >"$root/etc/machine-id"
}

# ---------------------------------------------------------------- builds
# Read-only build volumes that make pip inside a podman build behave as pip on this host: one
# pip.conf merged from the host's settings (files and PIP_* variables), the host's CA bundle
# beside it (at its own path: mounting it over the image's bundle breaks ca-certificates'
# postinst), and the local folders those settings name (file:// indexes, find-links, constraints).
pip_build_volumes() {
    local conf_dir=$1
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    {
        echo "[global]"
        python3 -m pip config list 2>/dev/null \
            | sed -nE "s/^(global|:env:)\.([a-z-]+)='(.*)'$/\2 = \3/p" \
            | grep -v '^cert ' | awk -F' = ' '!seen[$1]++' || true
        [[ -f $ca ]] && echo "cert = /run/host-pip/ca-certificates.crt"
    } >"$conf_dir/pip.conf"
    [[ -f $ca ]] && cp "$ca" "$conf_dir/ca-certificates.crt"
    local paths=() p
    for p in $(grep -oE "(file://)?/[^ ]+" "$conf_dir/pip.conf" || true); do
        p=${p#file://}
        [[ $p == /run/host-pip/* ]] && continue
        [[ -e $p ]] || continue
        [[ -f $p ]] && p=$(dirname "$p")
        [[ $p == */simple && -d ${p%/simple}/files ]] && p=${p%/simple}
        paths+=("$p")
    done
    printf -- '-v %s:/run/host-pip:ro -v %s:/etc/pip.conf:ro ' "$conf_dir" "$conf_dir/pip.conf"
    local seen=" "
    for p in "${paths[@]}"; do
        [[ $seen == *" $p "* ]] && continue
        seen+="$p "
        printf -- '-v %s:%s:ro ' "$p" "$p"
    done
}

build() {
    local dockerfile=$1 tag=$2
    shift 2
    need_engine
    local e
    e=$(engine)
    if [[ $e == podman ]]; then
        cmd_base
        local conf_dir volumes base_flags rc=0
        conf_dir=$(mktemp -d)
        volumes=$(pip_build_volumes "$conf_dir")
        base_flags=$(base_build_flags)
        # shellcheck disable=SC2046,SC2086  # word splitting of the flags is intended
        podman build --isolation chroot --pull=never --layers --format docker \
            $volumes $base_flags $(label_build_args) \
            -f "$dockerfile" -t "$tag" "$@" . || rc=$?
        rm -rf "$conf_dir"
        return $rc
    else
        # shellcheck disable=SC2046  # label_build_args prints several flags
        docker build $(label_build_args) -f "$dockerfile" -t "$tag" "$@" .
    fi
}

# ---------------------------------------------------------------- OCI labels
# What the labels say. Every value is one word (no spaces), so the flags split safely.
git_commit() {
    echo "${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
}

image_version() {
    echo "${IMAGE_VERSION:-$(sed -nE 's/^version = "([^"]+)"$/\1/p' pyproject.toml | head -n 1)}"
}

# IMAGE_SOURCE, else the repository GitHub Actions builds, else the git remote as an https URL.
image_source() {
    local url=${IMAGE_SOURCE:-}
    if [[ -z $url && -n ${GITHUB_SERVER_URL:-} && -n ${GITHUB_REPOSITORY:-} ]]; then
        url=$GITHUB_SERVER_URL/$GITHUB_REPOSITORY
    fi
    if [[ -z $url ]]; then
        url=$(git remote get-url origin 2>/dev/null || true)
        url=$(sed -E 's#^git@([^:]+):#https://\1/#; s#^ssh://git@#https://#; s#\.git$##' <<<"$url")
    fi
    echo "${url:-unknown}"
}

# The build args fill the Dockerfile's LABEL (a plain `docker build` gets them too); the --label
# flags set the same three again on the final image, because buildah's layer cache reuses a
# LABEL step whose ARG values changed (seen: a rebuild at a new commit kept the old revision).
label_build_args() {
    local source commit version
    source=$(image_source) commit=$(git_commit) version=$(image_version)
    echo "--build-arg IMAGE_SOURCE=$source --build-arg GIT_COMMIT=$commit" \
        "--build-arg IMAGE_VERSION=$version" \
        "--label org.opencontainers.image.source=$source" \
        "--label org.opencontainers.image.revision=$commit" \
        "--label org.opencontainers.image.version=$version"
}

cmd_build_serve() {
    if [[ -n $MODEL ]]; then
        [[ -f $MODEL ]] || die "$MODEL not found: run 'make pipeline' first, pass MODEL=path/to/model.onnx, or MODEL= for an image without a model"
    fi
    local start=$SECONDS
    build Dockerfile.serve "$IMAGE_SERVE" --build-arg "MODEL=$MODEL"
    log "built $IMAGE_SERVE (model: ${MODEL:-none, set MODEL_URI to serve}) in $((SECONDS - start)) s, $(cmd_size)"
}

cmd_build_train() {
    local start=$SECONDS
    build Dockerfile.train "$IMAGE_TRAIN"
    log "built $IMAGE_TRAIN in $((SECONDS - start)) s"
}

cmd_size() {
    local bytes
    bytes=$("$(engine)" image inspect --format '{{.Size}}' "$IMAGE_SERVE")
    echo "$IMAGE_SERVE: $((bytes / 1000000)) MB"
}

# ---------------------------------------------------------------- smoke test
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SMOKE_ENGINE=
SMOKE_NAME=
smoke_cleanup() {
    [[ -n $SMOKE_NAME ]] && "$SMOKE_ENGINE" rm -f "$SMOKE_NAME" >/dev/null 2>&1
    return 0
}

cmd_smoke() {
    need_engine
    local port
    SMOKE_ENGINE=$(engine)
    SMOKE_NAME=catsdogs-smoke-$$
    port=${SMOKE_PORT:-$(free_port)}
    local e=$SMOKE_ENGINE name=$SMOKE_NAME
    trap smoke_cleanup EXIT
    local t0
    t0=$(date +%s.%N)
    # Same limits and restrictions as compose.yaml's serve service; the server sizes its threads
    # from the quota.
    # shellcheck disable=SC2046
    "$e" run -d --name "$name" $(run_flags) $(serve_run_flags) --cpus "${SMOKE_CPUS:-2}" \
        --memory 1g -p "127.0.0.1:$port:8000" "$IMAGE_SERVE" >/dev/null
    python3 scripts/smoke_test.py --url "http://127.0.0.1:$port" --ready-only \
        --wait "$READY_TIMEOUT_S" || { "$e" logs --tail 50 "$name" >&2; die "never ready"; }
    local ready_s
    ready_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
    log "ready ${ready_s} s after '$e run' (container start included)"

    # Inside the running container: no torch, and the server process is not root.
    if "$e" exec "$name" python -c 'import torch' 2>/dev/null; then
        die "torch is importable in the serving image"
    fi
    local uid
    uid=$("$e" exec "$name" python -c 'import os; print(os.stat("/proc/1").st_uid)')
    [[ $uid != 0 ]] || die "the server (PID 1) runs as root"
    log "inside: 'import torch' fails, server uid $uid"
    check_healthcheck "$e" "$name"
    cmd_labels

    # shellcheck disable=SC2086  # SMOKE_ARGS holds several flags
    python3 scripts/smoke_test.py --url "http://127.0.0.1:$port" --data "$SMOKE_DATA" \
        ${SMOKE_ARGS:-} --wait 5 || { "$e" logs --tail 50 "$name" >&2; die "smoke test failed"; }
    check_read_only "$e" "$name"

    # Graceful stop: SIGTERM must end the server well before the engine's kill timeout.
    local t1=$SECONDS code
    "$e" stop -t 20 "$name" >/dev/null
    code=$("$e" inspect --format '{{.State.ExitCode}}' "$name")
    log "stopped by SIGTERM in $((SECONDS - t1)) s, exit code $code"
    [[ $code == 0 ]] || { "$e" logs --tail 30 "$name" >&2; die "server exited $code on SIGTERM"; }
    log "image: $(cmd_size); ready in ${ready_s} s"
}

# Locust with its pass/fail thresholds (make load) against the serving container.
cmd_load() {
    need_engine
    SMOKE_ENGINE=$(engine)
    SMOKE_NAME=catsdogs-load-$$
    local port
    port=${SMOKE_PORT:-$(free_port)}
    trap smoke_cleanup EXIT
    # shellcheck disable=SC2046
    "$SMOKE_ENGINE" run -d --name "$SMOKE_NAME" $(run_flags) $(serve_run_flags) \
        --cpus "${SMOKE_CPUS:-2}" --memory 1g -p "127.0.0.1:$port:8000" "$IMAGE_SERVE" >/dev/null
    python3 scripts/smoke_test.py --url "http://127.0.0.1:$port" --ready-only \
        --wait "$READY_TIMEOUT_S" || { "$SMOKE_ENGINE" logs --tail 50 "$SMOKE_NAME" >&2; die "never ready"; }
    # a throwaway container: production traffic, so the load exercises its prediction log
    LOAD_TRAFFIC_CLASS=production make --no-print-directory load URL="http://127.0.0.1:$port"
}

# The serving image's OCI labels name this checkout (revision, version, a source), and its Python
# packages are exactly the SBOM's components (make sbom), name and version.
cmd_labels() {
    need_engine
    local e labels packages
    e=$(engine)
    labels=$("$e" image inspect --format '{{json .Config.Labels}}' "$IMAGE_SERVE")
    [[ -f $SBOM ]] || die "$SBOM not found: run 'make sbom' first"
    # shellcheck disable=SC2046
    packages=$("$e" run --rm $(run_flags) --entrypoint python "$IMAGE_SERVE" -c \
        'import importlib.metadata as m; print("\n".join(d.name + "==" + d.version for d in m.distributions()))')
    python3 - "$labels" "$(git_commit)" "$(image_version)" "$SBOM" "$packages" <<'PY' || die "labels or SBOM check failed"
import json
import re
import sys

labels_json, revision, version, sbom_path, packages = sys.argv[1:]
labels = json.loads(labels_json) or {}
oci = "org.opencontainers.image."
want = {"revision": revision, "version": version, "title": "catsdogs-serve"}
bad = [f"{oci}{k}={labels.get(oci + k)!r}, expected {v!r}" for k, v in want.items()
       if labels.get(oci + k) != v]
if not labels.get(oci + "source"):
    bad.append(f"{oci}source is missing")


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


in_image = {norm(n): v for n, v in (line.split("==", 1) for line in packages.split())}
sbom = json.load(open(sbom_path))
in_sbom = {norm(c["name"]): c["version"] for c in sbom.get("components", [])}
if in_image != in_sbom:
    only_image = sorted(set(in_image.items()) - set(in_sbom.items()))
    only_sbom = sorted(set(in_sbom.items()) - set(in_image.items()))
    bad.append(f"image and SBOM differ: only in the image {only_image}, only in the SBOM {only_sbom}")
for line in bad:
    print(f"[containers] {line}", file=sys.stderr)
if bad:
    sys.exit(1)
print(f"[containers] OCI labels: revision {revision}, version {version}, source "
      f"{labels[oci + 'source']}; {len(in_image)} Python packages, as in {sbom_path}",
      file=sys.stderr)
PY
}

# Inside the running container: the root file system is mounted read-only, the server holds no
# capabilities and cannot gain any, and a prediction reaches the prediction log on its tmpfs. The
# smoke test's own predictions are evaluation traffic, which is not logged: this one is production
# traffic (a throwaway container), a small JPEG made with the image's Pillow; the log's writer is
# asynchronous, so it gets a few seconds.
check_read_only() {
    local e=$1 name=$2 out
    out=$("$e" exec -i "$name" python - <<'PY'
import io
import json
import os
import sqlite3
import sys
import time
import urllib.request

from PIL import Image

root = [line.split()[3] for line in open("/proc/mounts") if line.split()[1] == "/"][-1]
status = dict(line.split(":", 1) for line in open("/proc/1/status") if ":" in line)
problems = []
if "ro" not in root.split(","):
    problems.append(f"the root file system is mounted {root.split(',')[0]}")
if int(status["CapEff"], 16) or int(status["CapBnd"], 16):
    problems.append(f"capabilities: effective {status['CapEff'].strip()}, bounding "
                    f"{status['CapBnd'].strip()}")
if status["NoNewPrivs"].strip() != "1":
    problems.append("no_new_privs is not set")

photo = io.BytesIO()
Image.new("RGB", (64, 64), (120, 90, 60)).save(photo, "JPEG")
port = os.environ.get("PORT", "8000")
ask = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=photo.getvalue(),
                             headers={"Content-Type": "image/jpeg"})
with urllib.request.urlopen(ask, timeout=10) as reply:
    request_id = json.load(reply)["request_id"]
path = os.environ["PREDICTION_LOG_PATH"]
found, deadline = False, time.monotonic() + 10
while not found and time.monotonic() < deadline:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            found = conn.execute("SELECT 1 FROM predictions WHERE request_id = ?",
                                 (request_id,)).fetchone() is not None
    except sqlite3.Error:
        pass
    if not found:
        time.sleep(0.2)
if not found:
    problems.append(f"prediction {request_id} not in {path} after 10 s")
print("; ".join(problems) if problems else f"a production prediction logged in {path}")
sys.exit(1 if problems else 0)
PY
    ) || die "inside the container: $out"
    log "inside: root read-only, no capabilities, no_new_privs; $out"
}

# The image's own HEALTHCHECK command must pass once the server is ready.
check_healthcheck() {
    local e=$1 name=$2 status
    if [[ $e == podman ]]; then
        podman healthcheck run "$name" >/dev/null 2>&1 || die "HEALTHCHECK fails on a ready server"
    else
        for _ in $(seq 1 30); do
            status=$(docker inspect --format '{{.State.Health.Status}}' "$name")
            [[ $status == healthy ]] && break
            sleep 1
        done
        [[ $status == healthy ]] || die "container health is '$status', not healthy"
    fi
    log "HEALTHCHECK passes"
}

# compose.yaml (and the GPU overlay) must parse and validate with every profile on: Compose v2
# where installed, else Debian's docker-compose 1.29 (same schema checks, installed on demand).
cmd_compose_check() {
    local compose=()
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    else
        if ! command -v docker-compose >/dev/null; then
            local APT_TOOLS=(docker-compose)  # bash scoping: cmd_install sees this list
            cmd_install
        fi
        compose=(docker-compose)
    fi
    local profiles=(--profile train --profile monitoring --profile scale)
    COMPOSE_PROJECT_NAME=catsdogs "${compose[@]}" -f compose.yaml "${profiles[@]}" config -q
    COMPOSE_PROJECT_NAME=catsdogs "${compose[@]}" -f compose.yaml -f compose.gpu.yaml \
        "${profiles[@]}" config -q
    log "compose.yaml valid (${compose[*]})"
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        base) cmd_base ;;
        build-serve) cmd_build_serve "$@" ;;
        build-train) cmd_build_train "$@" ;;
        smoke) cmd_smoke ;;
        labels) cmd_labels ;;
        load) cmd_load ;;
        size) cmd_size ;;
        compose-check) cmd_compose_check ;;
        engine) engine ;;
        *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
}

main "$@"
