# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/nersemble-pipeline
STAMP := $(VENV)/.installed
MODEL := models/u2netp.onnx
POOL ?= cpu
DEMO_OUT ?= demo-output

export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The embedded API server migrates its database on first start: slow on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export U2NET_HOME := $(CURDIR)/models

.PHONY: install demo test bench ui worker clean

install: $(STAMP) $(MODEL)

# torch first: the CPU build on disk; letting pip resolve plain torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(MODEL): | $(STAMP)
	$(PY) -m pipeline.models

demo: install
	$(CLI) demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

bench: install
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

ui: install
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

worker: install
	$(VENV)/bin/prefect worker start --pool $(POOL)

clean:
	rm -rf $(VENV) models $(DEMO_OUT) .pytest_cache build *.egg-info
