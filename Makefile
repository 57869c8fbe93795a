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
	@# mimalloc, which the tokenizer's encode process runs on for inputs >= 2 MB (README, "Tokenizing
	@# large datasets"): installed with apt as root or with passwordless sudo, else a hint. Optional.
	@/sbin/ldconfig -p 2>/dev/null | grep -q "libmimalloc.so.2 " || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo="sudo -n"; fi; \
	  if command -v apt-get >/dev/null 2>&1 && { [ -z "$$sudo" ] || $$sudo true 2>/dev/null; }; then \
	    echo "installing libmimalloc2.0 (apt) for faster tokenization"; \
	    { $$sudo apt-get install -y -qq libmimalloc2.0 || { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq libmimalloc2.0; }; } \
	      >/dev/null 2>&1 || echo "  not installed: tokenization encodes in process (same result, slower)"; \
	  else echo "hint: apt-get install libmimalloc2.0 makes large tokenizations faster (README)"; fi; }
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

# The service stack on 127.0.0.1 (Prefect server + UI :4200, MLflow server + UI :5000, a worker on
# the process pool `ftflow`); state and logs under .ftflow/stack/. See README "Running as a service".
.PHONY: up down
up: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 $(PY) -m infra.stack up

down: $(STAMP)
	$(PY) -m infra.stack down
