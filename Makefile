# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo demo-full demo-seeds reproduce app lint clean

$(STAMP): requirements.txt requirements-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -r requirements.txt
	$(VENV)/bin/pip install -q --no-compile --no-deps --no-build-isolation -e .
	@# pip byte-compiles on one core (half of the install); compileall on every core. A file that does not compile
	@# (a package's template) costs only its import speed, as under pip, so failures are not errors.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)

# The fast tier: unit tests and one chained run. test-all adds the slow tier: kill-and-resume runs, several
# processes, the README's flows.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check dali tests benchmarks
	$(PY) -m ruff format --check dali tests benchmarks

demo: $(STAMP)
	$(PY) -m dali.cli demo $(ARGS)

demo-full: $(STAMP)
	$(PY) -m dali.cli demo --full $(ARGS)

demo-seeds: $(STAMP)
	$(PY) -m dali.cli demo --seeds 3 $(ARGS)

# The paper's evaluation on the demo's run (make demo first): every row over 3 seeds, the world's second test set
# playing Clotho; expe/demo/ot_att/reproduce/results.md. ARGS adds flags, e.g. ARGS="--seeds 5".
reproduce: $(STAMP)
	$(PY) -m dali.cli reproduce --config configs/synthetic/reproduce.yaml --run expe/demo/ot_att $(ARGS)

# The web page, serving the demo's model (make demo first); ARGS adds flags, e.g. ARGS="--port 8080".
app: $(STAMP)
	$(VENV)/bin/dali app --run expe/demo/ot_att $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
