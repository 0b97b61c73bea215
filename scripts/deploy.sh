#!/usr/bin/env bash
# Deploy the serving image and the registry's champion model with compose, prove them, roll back.
#
#   scripts/deploy.sh deploy ghcr.io/owner/catsdogs-serve:SHA   # code change: a new image
#   scripts/deploy.sh reload            # model change: same image, re-read catsdogs@champion
#   scripts/deploy.sh rollback          # back to the image deployed before the current one
#   scripts/deploy.sh status
#
# The image carries no model: the serve service loads one from the MLflow registry. `deploy` and
# `reload` resolve $MODEL_NAME@$MODEL_ALIAS (set by the gated `make promote`) to a version number
# and start serve pinned to it (MODEL_URI=models:/catsdogs/N), so a container restart never
# changes the model behind the evaluation's back. Then: readiness, smoke test over HTTP (labels of
# known photos, 4xx on bad input), the post-deployment evaluation (make evaluate-deployment: a
# labelled folder, accuracy gate). Any failure restarts the image and model version that ran
# before, re-checks their health, and the script exits non-zero either way.
# State (image and model version, current and previous) lives in $DEPLOY_STATE_DIR, on the host.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-catsdogs}
STATE_DIR=${DEPLOY_STATE_DIR:-$HOME/.local/state/catsdogs-deploy}
SERVE_PORT=${SERVE_PORT:-8000}
URL=${DEPLOY_URL:-http://127.0.0.1:$SERVE_PORT}
# the tracking server as this host reaches it (compose publishes the mlflow service here)
MLFLOW_URL=${MLFLOW_URL:-http://127.0.0.1:${MLFLOW_PORT:-5000}}
MODEL_NAME=${MODEL_NAME:-catsdogs}
MODEL_ALIAS=${MODEL_ALIAS:-champion}
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

state() { cat "$STATE_DIR/$1" 2>/dev/null || true; }

# The version $MODEL_NAME@$MODEL_ALIAS names now, from MLflow's REST API (standard library only);
# retried while the tracking server starts, not when it answers that the alias is unknown.
champion_version() {
    python3 - "$MLFLOW_URL" "$MODEL_NAME" "$MODEL_ALIAS" "$WAIT_S" <<'PY'
import json, sys, time, urllib.error, urllib.parse, urllib.request

url, name, alias, wait_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
query = urllib.parse.urlencode({"name": name, "alias": alias})
deadline = time.monotonic() + wait_s
while True:
    try:
        api = f"{url}/api/2.0/mlflow/registered-models/alias?{query}"
        with urllib.request.urlopen(api, timeout=5) as resp:
            version = str(json.load(resp)["model_version"]["version"])
        break
    except urllib.error.HTTPError as exc:
        sys.exit(f"{name}@{alias}: MLflow at {url} answered {exc.code} (promote a version first)")
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"MLflow at {url} unreachable: {exc}")
        time.sleep(2)
if not version.isdigit():
    sys.exit(f"{name}@{alias}: not a version number: {version[:40]!r}")
print(version)
PY
}

# Start serve with this image and model version (models:/NAME/N) and wait for /health/ready.
# --no-deps: the mlflow service is left as it runs; Compose v1 has no --wait.
up() {
    local image=$1 version=$2
    log "starting $image with models:/$MODEL_NAME/$version"
    SERVE_IMAGE=$image MODEL_URI="models:/$MODEL_NAME/$version" \
        compose up -d --no-build --no-deps serve \
        && python3 scripts/smoke_test.py --url "$URL" --ready-only --wait "$WAIT_S"
}

check() {
    python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S" \
        && make --no-print-directory evaluate-deployment URL="$URL" DATA="$EVAL_DATA" \
            LIMIT="$EVAL_LIMIT" MIN_ACCURACY="$MIN_ACCURACY"
}

# Record a deployment that passed: the image and model that ran before become "previous".
record() {
    local image=$1 version=$2 what=$3
    local image_before model_before
    image_before=$(state current)
    model_before=$(state model)
    [[ -n $image_before && $image_before != "$image" ]] && echo "$image_before" >"$STATE_DIR/previous"
    [[ -n $model_before && $model_before != "$version" ]] && echo "$model_before" >"$STATE_DIR/model_previous"
    echo "$image" >"$STATE_DIR/current"
    echo "$version" >"$STATE_DIR/model"
    printf '%s %s model %s %s ok\n' "$(date -u +%FT%TZ)" "$image" "$version" "$what" >>"$STATE_DIR/history"
    log "$what: $image serving models:/$MODEL_NAME/$version"
}

# After a failed deploy or reload: what ran before, started again and smoke-tested.
restore() {
    local image=$1 version=$2 what=$3
    printf '%s %s model %s %s failed\n' "$(date -u +%FT%TZ)" "$image" "$version" "$what" \
        >>"$STATE_DIR/history"
    compose logs --tail 100 serve >&2 || true
    local old_image old_model
    old_image=$(state current)
    old_model=$(state model)
    if [[ -z $old_image || -z $old_model ]]; then
        log "nothing deployed before; stopping the failed one"
        compose stop serve || true
        return 1
    fi
    log "rolling back to $old_image with models:/$MODEL_NAME/$old_model"
    if ! { up "$old_image" "$old_model" \
        && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S"; }; then
        log "rollback to $old_image, model $old_model failed too"
        return 2
    fi
    log "rolled back; $image with model $version was not deployed"
    return 1
}

cmd_deploy() {
    local image=${1:?usage: deploy IMAGE}
    mkdir -p "$STATE_DIR"
    local version
    version=$(champion_version)
    log "deploying $image with $MODEL_NAME@$MODEL_ALIAS = version $version" \
        "(running now: $(state current) model $(state model))"
    docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"
    if up "$image" "$version" && check; then
        record "$image" "$version" deploy
        return 0
    fi
    restore "$image" "$version" deploy
}

cmd_reload() {
    mkdir -p "$STATE_DIR"
    local image version
    image=$(state current)
    [[ -n $image ]] || { log "no image deployed yet: run 'deploy IMAGE' first"; return 1; }
    version=$(champion_version)
    if [[ $version == "$(state model)" ]]; then
        log "$MODEL_NAME@$MODEL_ALIAS is version $version, already served: nothing to do"
        return 0
    fi
    log "reloading $image: model $(state model) -> $version ($MODEL_NAME@$MODEL_ALIAS)"
    if up "$image" "$version" && check; then
        record "$image" "$version" reload
        return 0
    fi
    restore "$image" "$version" reload
}

cmd_rollback() {
    local previous version
    previous=$(state previous)
    version=$(state model)
    [[ -n $previous && -n $version ]] || { log "no previous image recorded"; return 1; }
    if ! { up "$previous" "$version" \
        && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S"; }; then
        log "rollback to $previous failed"
        return 1
    fi
    [[ -s $STATE_DIR/current ]] && mv "$STATE_DIR/current" "$STATE_DIR/previous"
    echo "$previous" >"$STATE_DIR/current"
    printf '%s %s model %s rollback\n' "$(date -u +%FT%TZ)" "$previous" "$version" \
        >>"$STATE_DIR/history"
    log "rolled back to $previous"
}

cmd_status() {
    echo "image: $(state current) (previous: $(state previous))"
    echo "model: models:/$MODEL_NAME/$(state model) (previous: $(state model_previous))"
    echo "$MODEL_NAME@$MODEL_ALIAS now: $(WAIT_S=5 champion_version 2>/dev/null || echo unknown)"
    tail -n 5 "$STATE_DIR/history" 2>/dev/null || true
}

case ${1:-} in
    deploy) cmd_deploy "${2:-}" ;;
    reload) cmd_reload ;;
    rollback) cmd_rollback ;;
    status) cmd_status ;;
    *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
