#!/usr/bin/env bash
# Deploy one exact serving image with compose, prove it, and roll back when it fails.
#
#   scripts/deploy.sh deploy ghcr.io/owner/catsdogs-serve:SHA
#   scripts/deploy.sh rollback          # back to the image deployed before the current one
#   scripts/deploy.sh status
#
# A deploy: pull the image, `compose up --wait` the serve service with it, smoke-test it over HTTP
# (labels of known photos, 4xx on bad input), then the post-deployment evaluation (make
# evaluate-deployment: a labelled folder, accuracy gate). Any failure redeploys the image that
# ran before and re-checks its health; the script then exits non-zero either way.
# State (current and previous image) lives in $DEPLOY_STATE_DIR, on the deployment host.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-catsdogs}
STATE_DIR=${DEPLOY_STATE_DIR:-$HOME/.local/state/catsdogs-deploy}
SERVE_PORT=${SERVE_PORT:-8000}
URL=${DEPLOY_URL:-http://127.0.0.1:$SERVE_PORT}
EVAL_DATA=${EVAL_DATA:-../shared/data/catsdogs/images}
EVAL_LIMIT=${EVAL_LIMIT:-200}
MIN_ACCURACY=${MIN_ACCURACY:-0.95}
WAIT_S=${WAIT_S:-180}
export SERVE_PORT

log() { printf '[deploy] %s\n' "$*" >&2; }

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    else
        docker-compose "$@"
    fi
}

# Start serve with this image and wait until /health/ready answers 200 (Compose v1 has no --wait).
up() {
    local image=$1
    log "starting $image"
    SERVE_IMAGE=$image compose up -d --no-build serve \
        && python3 scripts/smoke_test.py --url "$URL" --ready-only --wait "$WAIT_S"
}

check() {
    python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S" \
        && make --no-print-directory evaluate-deployment URL="$URL" DATA="$EVAL_DATA" \
            LIMIT="$EVAL_LIMIT" MIN_ACCURACY="$MIN_ACCURACY"
}

cmd_deploy() {
    local image=${1:?usage: deploy IMAGE}
    mkdir -p "$STATE_DIR"
    local previous=""
    [[ -s $STATE_DIR/current ]] && previous=$(<"$STATE_DIR/current")
    log "deploying $image (running now: ${previous:-nothing})"
    docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"
    if up "$image" && check; then
        [[ -n $previous && $previous != "$image" ]] && echo "$previous" >"$STATE_DIR/previous"
        echo "$image" >"$STATE_DIR/current"
        printf '%s %s ok\n' "$(date -u +%FT%TZ)" "$image" >>"$STATE_DIR/history"
        log "deployed $image"
        return 0
    fi
    printf '%s %s failed\n' "$(date -u +%FT%TZ)" "$image" >>"$STATE_DIR/history"
    compose logs --tail 100 serve >&2 || true
    if [[ -z $previous ]]; then
        log "no previous image to roll back to; stopping the failed one"
        compose stop serve || true
        return 1
    fi
    log "rolling back to $previous"
    if ! { up "$previous" && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" \
        --wait "$WAIT_S"; }; then
        log "rollback to $previous failed too"
        return 2
    fi
    log "rolled back to $previous; $image was not deployed"
    return 1
}

cmd_rollback() {
    [[ -s $STATE_DIR/previous ]] || { log "no previous image recorded"; return 1; }
    local previous
    previous=$(<"$STATE_DIR/previous")
    up "$previous" && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S"
    [[ -s $STATE_DIR/current ]] && mv "$STATE_DIR/current" "$STATE_DIR/previous"
    echo "$previous" >"$STATE_DIR/current"
    printf '%s %s rollback\n' "$(date -u +%FT%TZ)" "$previous" >>"$STATE_DIR/history"
    log "rolled back to $previous"
}

cmd_status() {
    echo "current:  $(cat "$STATE_DIR/current" 2>/dev/null || echo none)"
    echo "previous: $(cat "$STATE_DIR/previous" 2>/dev/null || echo none)"
    tail -n 5 "$STATE_DIR/history" 2>/dev/null || true
}

case ${1:-} in
    deploy) cmd_deploy "${2:-}" ;;
    rollback) cmd_rollback ;;
    status) cmd_status ;;
    *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
