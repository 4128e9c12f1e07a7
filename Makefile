# twinseg: `make run` runs the smoke study, `make test` runs the tests.
# Both set up .venv idempotently from requirements.lock on a machine with only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv lock bench report clean-results

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip uv==0.13.9
	@# --compile-bytecode: ~25 s once; every later Python process (each grid trial, each test subprocess) then
	@# imports torch + lightning + timm in ~7 s instead of ~15 s where PYTHONDONTWRITEBYTECODE is set
	@$(VENV)/bin/uv pip sync --python $(PY) --compile-bytecode requirements.lock
	@$(VENV)/bin/uv pip install --python $(PY) --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) experiments/grid.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) experiments/bench.py $(ARGS)

lock:
	uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
