#!/bin/sh
# Entry point of the training image: choose the data source, then run the DVC pipeline.
#   DATA=/data (a mounted photo folder) or empty for the public download; extra args go to
#   `dvc repro` (e.g. `train` to stop after that stage, `--force`).
set -eu
cd /app
# A checkout mounted at /app brings its .git; the code baked into the image has none, and DVC
# then runs without an SCM (the model's git_commit comes from GIT_COMMIT, set at build time).
if ! git rev-parse --git-dir >/dev/null 2>&1; then
    dvc config --local core.no_scm true
fi
make --no-print-directory data-source DATA="${DATA:-}"
exec dvc repro "$@"
