#!/usr/bin/env bash
# Deploy the serving image and the registry's champion model with compose, prove them, roll back.
#
#   scripts/deploy.sh deploy ghcr.io/owner/catsdogs-serve:SHA   # code change: a new image
#   scripts/deploy.sh reload            # model change: same image, re-read catsdogs@champion
#   scripts/deploy.sh rollback          # back to the image and model that passed before these
#   scripts/deploy.sh status
#
# The image carries no model: the serve service loads one from the MLflow registry. `deploy` and
# `reload` resolve $MODEL_NAME@$MODEL_ALIAS (set by the gated `make promote`) to a version number
# and start serve pinned to it (MODEL_URI=models:/catsdogs/N), so a container restart never
# changes the model behind the evaluation's back. Then: readiness, smoke test over HTTP (labels of
# known photos, 4xx on bad input, the feedback route), the post-deployment evaluation (make
# evaluate-deployment: a labelled folder, accuracy gate; FEEDBACK=0, since the same photos' labels
# posted on every deployment would pile up in production's live accuracy and hide real feedback). Any failure (or a SIGTERM/SIGINT midway: a cancelled job)
# restarts the image and model version that ran before, re-checks their health, and the script
# exits non-zero either way. One run at a time (a lock in the state folder).
# State lives in $DEPLOY_STATE_DIR, on the host: `deployments` (every image, pinned to its
# registry digest, and model version that passed, in order: what rollback walks back through), `current`/`model` and
# `previous`/`model_previous` (the last two pairs) and `history` (every attempt).
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

# One deploy, reload or rollback at a time on this host (a rollback by hand during a CD run
# would otherwise start its own image under the run's checks and mix up the state).
lock() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w "${LOCK_WAIT_S:-900}" 9 || { log "another deployment holds $STATE_DIR/lock"; exit 1; }
}

# "IMAGE MODEL_URI" of the serve container running now, or nothing: what to restart when a
# deploy fails on a host with no recorded state (serve started by hand or the state folder lost).
running_pair() {
    local id image uri
    id=$(compose ps -q serve 2>/dev/null | head -n 1) || true
    [[ -n $id ]] || return 0
    image=$(docker inspect --format '{{.Config.Image}}' "$id" 2>/dev/null) || return 0
    uri=$(docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$id" 2>/dev/null \
        | sed -n 's/^MODEL_URI=//p' | head -n 1) || true
    [[ -n $image && -n $uri ]] && echo "$image $uri"
    return 0
}

# A model as the serve service takes it: a version number of $MODEL_NAME, or a whole URI.
model_uri() { if [[ $1 =~ ^[0-9]+$ ]]; then echo "models:/$MODEL_NAME/$1"; else echo "$1"; fi; }

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
    local image=$1 uri
    uri=$(model_uri "$2")
    log "starting $image with $uri"
    SERVE_IMAGE=$image MODEL_URI=$uri \
        compose up -d --no-build --no-deps serve \
        && python3 scripts/smoke_test.py --url "$URL" --ready-only --wait "$WAIT_S"
}

check() {
    python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S" \
        && make --no-print-directory evaluate-deployment URL="$URL" DATA="$EVAL_DATA" \
            LIMIT="$EVAL_LIMIT" MIN_ACCURACY="$MIN_ACCURACY" FEEDBACK=0
}

# The pairs that passed, oldest first, and the current and previous pair derived from them.
pairs() { cat "$STATE_DIR/deployments" 2>/dev/null || true; }
set_pairs() {
    local current previous
    current=$(pairs | tail -n 1)
    previous=$(pairs | tail -n 2 | head -n -1)
    echo "${current% *}" >"$STATE_DIR/current"
    echo "${current#* }" >"$STATE_DIR/model"
    echo "${previous% *}" >"$STATE_DIR/previous"
    echo "${previous#* }" >"$STATE_DIR/model_previous"
}

# Record a deployment that passed: its image and model go on top of `deployments`.
record() {
    local image=$1 version=$2 what=$3
    if [[ ! -s $STATE_DIR/deployments && -n $(state current) ]]; then
        # state from before `deployments` existed: its last pair starts the list
        echo "$(state current) $(state model)" >"$STATE_DIR/deployments"
    fi
    [[ $(pairs | tail -n 1) == "$image $version" ]] || echo "$image $version" >>"$STATE_DIR/deployments"
    set_pairs
    printf '%s %s model %s %s ok\n' "$(date -u +%FT%TZ)" "$image" "$version" "$what" >>"$STATE_DIR/history"
    log "$what: $image serving $(model_uri "$version")"
}

# After a failed (or cancelled) deploy or reload: what ran before, started again and
# smoke-tested. $4: the pair that was running when the attempt began, for a host whose state
# records nothing (serve started by hand): it is restarted rather than serve stopped.
restore() {
    local image=$1 version=$2 what=$3 running=${4:-}
    printf '%s %s model %s %s failed\n' "$(date -u +%FT%TZ)" "$image" "$version" "$what" \
        >>"$STATE_DIR/history"
    compose logs --tail 100 serve >&2 || true
    local old_image old_model
    old_image=$(state current)
    old_model=$(state model)
    if [[ -z $old_image || -z $old_model ]] && [[ -n $running ]]; then
        old_image=${running% *}
        old_model=${running#* }
        log "no deployment recorded; restarting what ran before: $old_image with $old_model"
    fi
    if [[ -z $old_image || -z $old_model ]]; then
        log "nothing ran before; stopping the failed one"
        compose stop serve || true
        return 1
    fi
    log "rolling back to $old_image with $(model_uri "$old_model")"
    if ! { up "$old_image" "$old_model" \
        && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S"; }; then
        log "rollback to $old_image, model $old_model failed too"
        return 2
    fi
    log "rolled back; $image with model $version was not deployed"
    return 1
}

# Deploy or reload: start IMAGE on model VERSION, check, record; else restore what ran. A
# SIGTERM or SIGINT while it runs (the CD job cancelled or timed out) restores too: the image
# under test must not stay in service unchecked.
attempt() {
    local image=$1 version=$2 what=$3 running
    running=$(running_pair)
    # shellcheck disable=SC2016  # expanded when the trap runs, inside this function
    local undo='trap - TERM INT; log "$what interrupted"; restore "$image" "$version" "$what (interrupted)" "$running" || true'
    # shellcheck disable=SC2064  # $undo now; the names in it at the signal
    trap "$undo; exit 143" TERM
    # shellcheck disable=SC2064
    trap "$undo; exit 130" INT
    if up "$image" "$version" && check; then
        trap - TERM INT
        record "$image" "$version" "$what"
        return 0
    fi
    trap - TERM INT
    restore "$image" "$version" "$what" "$running"
}

# IMAGE pinned to the digest the registry gave it (name:tag@sha256:...; docker resolves it by
# the digest alone): what passed the checks is what runs, and what a rollback restarts, even if
# the tag is pushed again later. An image with no registry digest (built here) stays a tag.
pinned() {
    local image=$1 name line
    if [[ $image == *@sha256:* ]]; then echo "$image"; return 0; fi
    name=$image
    [[ ${name##*/} == *:* ]] && name=${name%:*}  # the tag off, not a registry's port
    while IFS= read -r line; do
        if [[ $line == "$name@sha256:"* ]]; then echo "$image@${line#*@}"; return 0; fi
    done < <(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" \
        2>/dev/null || true)
    echo "$image"
}

cmd_deploy() {
    local image=${1:?usage: deploy IMAGE}
    lock
    local version
    version=$(champion_version)
    log "deploying $image with $MODEL_NAME@$MODEL_ALIAS = version $version" \
        "(running now: $(state current) model $(state model))"
    docker image inspect "$image" >/dev/null 2>&1 || docker pull "$image"
    image=$(pinned "$image")
    attempt "$image" "$version" deploy
}

cmd_reload() {
    lock
    local image version
    image=$(state current)
    [[ -n $image ]] || { log "no image deployed yet: run 'deploy IMAGE' first"; return 1; }
    version=$(champion_version)
    if [[ $version == "$(state model)" ]]; then
        log "$MODEL_NAME@$MODEL_ALIAS is version $version, already served: nothing to do"
        return 0
    fi
    log "reloading $image: model $(state model) -> $version ($MODEL_NAME@$MODEL_ALIAS)"
    attempt "$image" "$version" reload
}

# Back one step in `deployments`: the image AND model that passed together before the current
# pair, through the same checks. Done, the current pair leaves the list (a second rollback goes
# one step further back, never forth again); failed, the current pair is started again.
cmd_rollback() {
    lock
    local current target
    if [[ ! -s $STATE_DIR/deployments && -n $(state previous) ]]; then  # state from before
        printf '%s %s\n%s %s\n' "$(state previous)" "$(state model_previous)" \
            "$(state current)" "$(state model)" >"$STATE_DIR/deployments"
    fi
    current=$(pairs | tail -n 1)
    target=$(pairs | tail -n 2 | head -n -1)
    [[ -n $target && -n ${target#* } ]] || { log "no earlier deployment recorded"; return 1; }
    log "rolling back from $current to $target"
    if up "${target% *}" "${target#* }" && check; then
        head -n -1 "$STATE_DIR/deployments" >"$STATE_DIR/deployments.new"
        mv "$STATE_DIR/deployments.new" "$STATE_DIR/deployments"
        set_pairs
        printf '%s %s model %s rollback ok\n' "$(date -u +%FT%TZ)" "${target% *}" \
            "${target#* }" >>"$STATE_DIR/history"
        log "rolled back to ${target% *} with $(model_uri "${target#* }")"
        return 0
    fi
    printf '%s %s model %s rollback failed\n' "$(date -u +%FT%TZ)" "${target% *}" \
        "${target#* }" >>"$STATE_DIR/history"
    log "rollback to $target failed; starting $current again"
    if ! { up "${current% *}" "${current#* }" \
        && python3 scripts/smoke_test.py --url "$URL" --data "$EVAL_DATA" --wait "$WAIT_S"; }; then
        log "$current failed to start again too"
        return 2
    fi
    return 1
}

cmd_status() {
    echo "image: $(state current) (previous: $(state previous))"
    echo "model: $(model_uri "$(state model)") (previous: $(state model_previous))"
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
