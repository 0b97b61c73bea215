# One entry point for people and CI. `make run` and `make test` are the quick start.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
DATA ?=
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= models/model.onnx
URL ?= http://$(HOST):$(PORT)

# third-party usage telemetry off (catsdogs/telemetry.py says why); the packages set it too
export DVC_NO_ANALYTICS := 1
export ORT_DISABLE_TELEMETRY ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

TRAIN_VENV := .venv-train
SERVE_VENV := .venv-serve
SERVE_TOOLS := .venv-serve-tools
LOAD_VENV := .venv-load
TRAIN_PY := $(TRAIN_VENV)/bin/python
SERVE_PY := $(SERVE_VENV)/bin/python
LOAD_PY := $(LOAD_VENV)/bin/python
SERVE_TOOLS_SITE := $(CURDIR)/$(SERVE_TOOLS)/lib/python3.11/site-packages

.PHONY: help run test pipeline data-source serve venvs venv-train venv-serve venv-serve-tools \
        venv-load lint test-serve test-train test-load mlflow-ui clean load bench

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 24

# ---------------------------------------------------------------- environments
# Each venv is rebuilt only when its lock file changes (a stamp file records the install). The
# requirements-*.txt files are lock files (`make lock`, README "Dependencies"): every package with
# the hashes of its files, and pip installs nothing else (--require-hashes).
PIP_INSTALL = -m pip install -q --require-hashes
# linters, pip-compile and cyclonedx-py (requirements-tools.txt)
TOOLS_VENV := .venv-tools

venv-train: $(TRAIN_VENV)/.installed ## training env: torch, dvc, mlflow, onnx
$(TRAIN_VENV)/.installed: requirements-train.txt requirements-dev.txt
	test -x $(TRAIN_PY) || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_PY) $(PIP_INSTALL) -r requirements-train.txt -r requirements-dev.txt
	touch $@

venv-serve: $(SERVE_VENV)/.installed ## serving env: onnxruntime + starlette, no torch
$(SERVE_VENV)/.installed: requirements-serve.txt
	test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) $(PIP_INSTALL) -r requirements-serve.txt
	touch $@

# Test-only tools for the serving suite live beside .venv-serve, not in it, so the runtime env
# stays exactly requirements-serve.txt; the suite runs on .venv-serve's interpreter with these on
# PYTHONPATH (the .pth makes pip see the runtime packages instead of installing them twice: the
# serve-test lock is resolved against the serving lock, so a shared package is already there).
venv-serve-tools: $(SERVE_TOOLS)/.installed ## serving-test tools (schemathesis, ...) beside .venv-serve
$(SERVE_TOOLS)/.installed: requirements-serve-test.txt $(SERVE_VENV)/.installed
	test -x $(SERVE_TOOLS)/bin/python || $(PYTHON) -m venv $(SERVE_TOOLS)
	echo "$(CURDIR)/$(SERVE_VENV)/lib/python3.11/site-packages" > $(SERVE_TOOLS_SITE)/_serve_runtime.pth
	$(SERVE_TOOLS)/bin/python $(PIP_INSTALL) -r requirements-serve-test.txt
	touch $@

venv-load: $(LOAD_VENV)/.installed ## load-test env: locust (kept out of serving)
$(LOAD_VENV)/.installed: requirements-load.txt
	test -x $(LOAD_PY) || $(PYTHON) -m venv $(LOAD_VENV)
	$(LOAD_PY) $(PIP_INSTALL) -r requirements-load.txt
	touch $@

venvs: venv-train venv-serve venv-serve-tools venv-load ## every environment above

# ---------------------------------------------------------------- dependencies
# requirements/<env>.in name each environment's packages, requirements/pins.in holds every
# version (one place); `make lock` resolves them with pip-compile into the hashed lock files
# requirements-<env>.txt. The serve-test and dev locks are resolved against the serve and train
# locks (their .in files say so), hence the order. pip-compile keeps the versions a lock already
# has unless asked: LOCK_ARGS=-U (everything to the newest the pins allow) or -P NAME (one package).
# It needs the package indexes (PyPI and this machine's local ones, through pip's configuration).
.PHONY: lock sbom
LOCK_ARGS ?=
PIP_COMPILE = $(TOOLS_VENV)/bin/pip-compile --quiet --allow-unsafe --generate-hashes --strip-extras \
	--no-emit-index-url --no-emit-find-links $(LOCK_ARGS)
LOCKED_ENVS := serve serve-test train dev load tools

lock: venv-tools ## resolve requirements/*.in into the hashed lock files requirements-*.txt
	for env in $(LOCKED_ENVS); do \
		echo "pip-compile requirements/$$env.in -> requirements-$$env.txt"; \
		$(PIP_COMPILE) --output-file=requirements-$$env.txt requirements/$$env.in; \
	done

# The serving image's Python environment as a CycloneDX SBOM: a venv made exactly as
# Dockerfile.serve makes /opt/venv (the serve lock, then pip and setuptools removed), described by
# cyclonedx-py (the root component, catsdogs, from pyproject.toml, which lists no dependencies:
# hence the silenced warning about its empty dependency graph). `make image-smoke` checks that the
# image holds exactly these packages.
SBOM_FILE := reports/sbom/serve.cdx.json
SBOM_VENV := .tmp/sbom-serve-venv
sbom: $(SBOM_FILE) ## CycloneDX SBOM of the serving image's Python packages -> reports/sbom/
$(SBOM_FILE): requirements-serve.txt pyproject.toml $(TOOLS_VENV)/.installed
	rm -rf $(SBOM_VENV)
	$(PYTHON) -m venv $(SBOM_VENV)
	$(SBOM_VENV)/bin/python $(PIP_INSTALL) -r requirements-serve.txt
	$(SBOM_VENV)/bin/python -m pip uninstall -q -y pip setuptools
	mkdir -p $(@D)
	PYTHONWARNINGS=ignore::UserWarning:cyclonedx.model.bom $(TOOLS_VENV)/bin/cyclonedx-py \
		environment --pyproject pyproject.toml --output-reproducible --of JSON -o $@ $(SBOM_VENV)
	rm -rf $(SBOM_VENV)

# ---------------------------------------------------------------- pipeline
# DATA=/path/to/folder picks a local photo folder; empty means "download the public set".
# The choice is written to data/source.yaml only when it changes: `source` (a DVC param) and
# `source_dir`, the folder dvc.yaml's fetch stage depends on (DATA itself, or the download stage's
# output folder, params.yaml's fetch.download_dir), so DVC reruns fetch exactly when a photo is
# added, removed or changed or DATA points elsewhere. dvc.yaml loads the file (vars), so plain
# `dvc` commands need it: run this target (or `make pipeline`) once after a clone.
# A relative DATA stays relative to the repo root, so dvc.lock reads the same in every clone.
# params.yaml's fetch.download_dir (the one place it is set; training/fetch.py checks they agree)
DOWNLOAD_DIR := $(shell sed -n 's/^  download_dir: *\([^ #]*\).*/\1/p' params.yaml | tr -d "\"'")
data-source: ## write data/source.yaml: DATA=<photo folder>, or the public download
	mkdir -p data
	printf 'source: "%s"\nsource_dir: "%s"\n' "$(if $(DATA),$(DATA),download)" \
		"$(if $(DATA),$(DATA),$(DOWNLOAD_DIR))" > data/source.yaml.new
	cmp -s data/source.yaml.new data/source.yaml && rm data/source.yaml.new || mv data/source.yaml.new data/source.yaml

# Remote storage: .dvc/config's default remote is a folder in ~/.cache (outside every clone, no
# setup); README "Remote storage" switches it to S3 or MinIO. The pipeline pulls first what the
# remote holds for this dvc.lock, so a clone of a pushed run restores it and `dvc repro` trains
# nothing; a remote without it (empty, or a new dvc.lock) is a warning and the pipeline builds it.
# A finished run is pushed; a failed push only warns, as the outputs here are complete (`make push`
# fails instead). The download folder is never pushed (it may hold the 787 MB zip).
.PHONY: pull push
DVC = PATH="$(abspath $(TRAIN_VENV))/bin:$$PATH" dvc

pipeline: venv-train data-source ## run the DVC pipeline (download, fetch, prepare, train, export, evaluate)
	$(DVC) pull --allow-missing || echo "WARNING: dvc pull failed: dvc repro builds what is missing" >&2
	$(DVC) repro
	$(DVC) push || echo "WARNING: dvc push failed: the outputs are here; retry: make push" >&2

# pull and push use data/source.yaml as it is (one is written for DATA when there is none)
data/source.yaml:
	$(MAKE) --no-print-directory data-source

pull: venv-train data/source.yaml ## restore the outputs dvc.lock names from the DVC remote
	$(DVC) pull

push: venv-train data/source.yaml ## send the pipeline's outputs to the DVC remote
	$(DVC) push

# Model quality (docs/model-quality.md): k-fold cross-validation of every configuration in
# params.yaml's cv.configs over all photos (reports/cv/: accuracy with a 95% interval, mistakes,
# contact sheets; one MLflow run each in the experiment catsdogs-cv), then each one's served
# cost (reports/cost/: ONNX size, onnxruntime latency, the table). cv/dvc.yaml holds both stages,
# so the default pipeline never runs them; frozen features are cached in data/cv-cache/.
.PHONY: cv
cv: venv-train data-source ## cross-validate params.yaml's cv.configs -> reports/cv, reports/cost
	$(DVC) repro cv/dvc.yaml

.PHONY: check-cuda
# `make check-cuda` on a machine with an NVIDIA GPU: every training path trained there, exported and
# evaluated, its checkpoint checked on the CPU (README "Training on a GPU"); DEVICE=cpu checks it here
check-cuda: venv-train ## check the training paths on a CUDA GPU -> reports/cuda/cuda-check.json
	$(TRAIN_PY) scripts/check_cuda.py --images $(EVAL_DATA) --out reports/cuda --device $(or $(DEVICE),cuda)

run: pipeline venv-serve ## the whole job: pipeline, then the server on http://HOST:PORT
	$(SERVE_PY) -m server --model $(MODEL) --host $(HOST) --port $(PORT)

serve: venv-serve ## serve an existing model (MODEL, or the registry's MODEL_URI when that is set)
	$(SERVE_PY) -m server $(if $(MODEL_URI),,--model $(MODEL)) --host $(HOST) --port $(PORT)

MLFLOW_PORT ?= 5000
mlflow-ui: venv-train ## MLflow UI on http://127.0.0.1:MLFLOW_PORT (5000) over the local store
	$(TRAIN_VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $(MLFLOW_PORT)

# Model registry: each export registers a version of `catsdogs`; promote points `champion` at one,
# gated: a server on models:/catsdogs/$(VERSION) (free 127.0.0.1 port, stopped afterwards) must pass
# the post-deployment evaluation (DATA=, LIMIT=, MIN_ACCURACY= as for evaluate-deployment) first;
# else it exits 1 and champion stays. Results: tags on the version and reports/promotion/v$(VERSION).
# Its photos: the test split of data/prepared/manifest.csv when there is one (photos the version
# never trained on; refused if the version was trained on other data), else the shared folder.
# Servers, compose and Kubernetes serve MODEL_URI=models:/catsdogs@champion (an MLflow server).
.PHONY: promote registry-list
VERSION ?=
promote: venv-train venv-serve ## evaluate version VERSION on a live server, then move champion to it
	test -n "$(VERSION)" || { echo "usage: make promote VERSION=<registered version>"; exit 2; }
	$(TRAIN_PY) -m export.registry promote --version $(VERSION) --serve-python $(SERVE_PY) \
		--data $(PROMOTE_DATA) --min-accuracy $(MIN_ACCURACY) $(if $(LIMIT),--limit $(LIMIT)) \
		--out reports/promotion/v$(VERSION)

registry-list: venv-train ## list registered model versions and their aliases
	$(TRAIN_PY) -m export.registry list

# ---------------------------------------------------------------- checks
lint: venv-train ## ruff
	$(TRAIN_VENV)/bin/ruff check .
	$(TRAIN_VENV)/bin/ruff format --check .

# the drift report's tests run the report in .venv-load (matplotlib), as `make monitoring-report` does
test-serve: venv-serve-tools venv-load ## serving suite, on .venv-serve (import torch fails there)
	PYTHONPATH=$(SERVE_TOOLS_SITE) $(SERVE_PY) -m pytest tests/serve -q

# The fuzz tests run in `make test` with a few examples each; this runs them long.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 2000
fuzz: venv-serve-tools ## long fuzz: image decoding, V2 parser, schemathesis (FUZZ_EXAMPLES=2000)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PYTHONPATH=$(SERVE_TOOLS_SITE) $(SERVE_PY) -m pytest -q \
		tests/serve/test_decode_fuzz.py tests/serve/test_v2_fuzz.py tests/serve/test_schemathesis.py

test-train: venv-train venv-serve ## training, export and pipeline suite
	$(TRAIN_PY) -m pytest tests/train -q

test-load: venv-load ## load tooling suite
	$(LOAD_PY) -m pytest tests/load -q

# Kubernetes manifests (deploy/k8s), offline: each kustomization rendered with kubectl kustomize,
# validated against Kubernetes 1.32's schemas and the vendored CRD schemas, checked against the
# code (settings, flags, ports, probe paths); promtool checks the PrometheusRule's alerts.
# tests/deploy/test_supply_chain.py checks the locks, pins, workflows, Dockerfiles and the SBOM.
.PHONY: test-deploy
test-deploy: venv-serve-tools prometheus sbom ## Kubernetes manifests, supply chain: render, validate, agree
	PYTHONPATH=$(SERVE_TOOLS_SITE) $(SERVE_PY) -m pytest tests/deploy -q

test: lint test-serve test-train test-load test-deploy ## the whole suite (CI runs this)

# ---------------------------------------------------------------- load tests and benchmarks
# `make load` starts a server on $(MODEL) on a free port (stopped by PID afterwards, even on
# failure); `make load URL=http://host:port` tests a running one instead. Reports: reports/load/.
LOAD_USERS ?= 20
LOAD_SPAWN_RATE ?= 5
LOAD_TIME ?= 60s
BENCH_ARGS ?=
LOAD_TARGET = $(if $(filter command line environment,$(origin URL)),--url $(URL),--model $(MODEL))

load: venv-load venv-serve ## locust headless with pass/fail thresholds (URL= for a running server)
	PYTHONPATH=$(CURDIR) $(LOAD_PY) -m loadtest.run_load $(LOAD_TARGET) --users $(LOAD_USERS) \
		--spawn-rate $(LOAD_SPAWN_RATE) --run-time $(LOAD_TIME) --out reports/load

bench: venv-load venv-serve ## latency per image, HTTP vs in-process -> reports/bench/latency.md
	PYTHONPATH=$(CURDIR) $(LOAD_PY) -m loadtest.bench --model $(MODEL) --out reports/bench $(BENCH_ARGS)

# `clean` keeps what a rerun cannot rebuild cheaply or at all: the downloaded archive
# (data/download), the data source (data/source.yaml), the fetch stage's hash cache and the local
# MLflow store (every run and the model registry); `clean-all` removes those too
clean: ## remove pipeline outputs (not the venvs, the download, the data source or MLflow's runs)
	rm -rf data/raw data/prepared models reports .dvc/tmp

clean-all: clean ## also the downloaded data, the data source and the local MLflow store
	rm -rf data mlruns mlflow.db

# ---------------------------------------------------------------- monitoring
# `make evaluate-deployment URL=http://host:port DATA=folder-with-cat-and-dog` judges a running
# server (CD uses it, with FEEDBACK=0: no labels posted to production); `make monitoring-report`
# turns the prediction log into reports/monitoring/.
EVAL_DATA = $(or $(DATA),../shared/data/catsdogs/images)
PROMOTE_DATA = $(or $(DATA),$(if $(wildcard data/prepared/manifest.csv),data/prepared/manifest.csv,../shared/data/catsdogs/images))
EVAL_OUT ?= reports/deployment
MIN_ACCURACY ?= 0.95
LIMIT ?=
DB ?= var/predictions.db
OUT ?= reports/monitoring

.PHONY: evaluate-deployment monitoring-report prometheus alertmanager dashboard

evaluate-deployment: venv-serve ## send a labelled photo folder to URL, post feedback, gate on accuracy
	$(SERVE_PY) -m monitoring.evaluate_deployment --url $(URL) --data $(EVAL_DATA) \
		--out $(EVAL_OUT) --min-accuracy $(MIN_ACCURACY) $(if $(LIMIT),--limit $(LIMIT)) \
		$(if $(filter 0,$(FEEDBACK)),--no-feedback)

monitoring-report: venv-load ## drift and performance report from the prediction log (DB=, OUT=)
	$(LOAD_PY) -m monitoring.drift_report --db $(DB) --out $(OUT) --model $(MODEL)

prometheus: ## Debian's prometheus + promtool, for the scrape and alert tests (service never started)
	bash scripts/apt-install.sh prometheus

alertmanager: ## Debian's prometheus-alertmanager + amtool, for the alert delivery test
	bash scripts/apt-install.sh prometheus-alertmanager

dashboard: ## regenerate the Grafana dashboard JSON from monitoring/grafana/build_dashboard.py
	$(SERVE_PY) -m monitoring.grafana.build_dashboard

# the README's settings table is generated from server/settings.py (a serving test checks it)
.PHONY: docs-settings
docs-settings: venv-serve ## rewrite the README's settings table from server/settings.py
	$(SERVE_PY) -m server.settings_docs --write README.md

# the serving suite includes a real Prometheus scraping a real server, promtool's alert unit
# tests and an alert delivered through a real Alertmanager (tests/serve/test_alerts.py)
test-serve: prometheus alertmanager

# ---------------------------------------------------------------- web page
# GET / is a page for people (server/static): the serving suite drives it, and Swagger UI, in
# Debian's headless Chromium through Playwright (tests/serve/test_ui.py); `make screenshots`
# renders reports/ui/ with the real model ($(MODEL)) and real photos (not committed).
.PHONY: chromium screenshots

chromium: ## Debian's chromium for the browser tests of the page (tests/serve/test_ui.py)
	bash scripts/apt-install.sh chromium

screenshots: venv-serve-tools chromium ## screenshots of the page -> reports/ui/
	PYTHONPATH=$(SERVE_TOOLS_SITE):$(CURDIR) $(SERVE_PY) scripts/screenshot_ui.py --model $(MODEL) --out reports/ui

test-serve: chromium

# ---------------------------------------------------------------- containers
# Dockerfile.serve / Dockerfile.train, built with docker where a daemon answers, else podman over
# a locally made debian:bookworm-slim (scripts/containers.sh says how). IMAGE_SERVE/IMAGE_TRAIN
# name the tags; MODEL is the model file baked into the serving image.
IMAGE_SERVE ?= catsdogs-serve:local
IMAGE_TRAIN ?= catsdogs-train:local
CONTAINERS := IMAGE_SERVE=$(IMAGE_SERVE) IMAGE_TRAIN=$(IMAGE_TRAIN) MODEL=$(MODEL) bash scripts/containers.sh

.PHONY: images image-serve image-train image-smoke image-load lint-docker venv-tools

venv-tools: $(TOOLS_VENV)/.installed ## linters for Dockerfiles, workflows and scripts; SBOM tools
$(TOOLS_VENV)/.installed: requirements-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python $(PIP_INSTALL) -r requirements-tools.txt
	touch $@

images: image-serve image-train ## both container images

image-serve: ## serving image from Dockerfile.serve with $(MODEL) inside (MODEL= : none, for MODEL_URI)
	$(CONTAINERS) build-serve

image-train: ## training image from Dockerfile.train (torch CUDA build, DVC pipeline)
	$(CONTAINERS) build-train

image-smoke: image-serve sbom ## run the serving image, check it (no torch, not root, labels, SBOM, 4xx), stop it
	$(CONTAINERS) smoke

image-load: ## locust with thresholds (make load) against the serving image, then stop it
	$(CONTAINERS) load

lint-docker: venv-tools ## hadolint, actionlint, shellcheck, compose file validation
	$(TOOLS_VENV)/bin/hadolint Dockerfile.serve Dockerfile.train
	PATH="$(CURDIR)/$(TOOLS_VENV)/bin:$$PATH" actionlint
	$(TOOLS_VENV)/bin/shellcheck scripts/*.sh
	bash scripts/containers.sh compose-check

# ---------------------------------------------------------------- scale-out
# PREDICTION_LOG_URL=postgresql://... makes replicas stateless (one shared prediction store).
# The serving suite runs the store suite on SQLite and on a throwaway PostgreSQL (Debian's
# package, started by the tests as a non-root user); `make cluster-test` runs three replicas on
# PostgreSQL behind HAProxy (deploy/haproxy/haproxy.cfg) under load through a rolling restart,
# a kill -9 and a PostgreSQL restart, and writes its figures to reports/cluster/summary.json.
.PHONY: postgresql haproxy cluster-test

postgresql: ## Debian's postgresql, for the store suite on PostgreSQL (service never started)
	bash scripts/apt-install.sh postgresql

haproxy: ## Debian's haproxy, for make cluster-test (service never started)
	bash scripts/apt-install.sh haproxy

cluster-test: venv-serve-tools postgresql haproxy ## 3 replicas + PostgreSQL + HAProxy under load -> reports/cluster/
	PYTHONPATH=$(SERVE_TOOLS_SITE) $(SERVE_PY) -m pytest tests/cluster -q -s -p no:cacheprovider

test-serve: postgresql
