# ftflow: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv on first use from requirements.lock (exact versions). torch is installed first,
# pinned to 2.13.0: on a CPU machine with the local CPU wheel that is what pip takes; nothing else in
# the lock can then pull CUDA wheels.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ftflow-installed

.PHONY: demo test bench setup clean-state

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~40 s); do it once here.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftflow run configs/demo.yaml --summary-json .ftflow/demo-summary.json

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

clean-state:
	rm -rf .ftflow
