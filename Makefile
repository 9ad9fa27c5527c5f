# One entry point. Every target sets itself up on a fresh machine: the venv, the
# pinned dependencies and the generated gRPC stubs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
GEN    := proto/gen/inference/grpc_predict_v2_pb2.py
PROTOS := $(wildcard proto/inference/*.proto proto/jobs/*.proto)

.PHONY: setup proto promtool test faults lint run bench rehearse models clean

setup: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Stubs are generated under proto/gen/ (importable as proto.gen.*), apart from
# hand-written code, never edited and never committed.
proto: $(GEN)

$(GEN): $(STAMP) $(PROTOS)
	rm -rf proto/gen && mkdir -p proto/gen/inference proto/gen/jobs
	$(BIN)/python -m grpc_tools.protoc -Iproto/gen=proto \
		--python_out=. --pyi_out=. --grpc_python_out=. \
		$(patsubst proto/%,proto/gen/%,$(PROTOS))
	touch proto/gen/__init__.py proto/gen/inference/__init__.py proto/gen/jobs/__init__.py

# promtool from Debian's prometheus package, unpacked into the venv (nothing installed system-wide,
# no daemon started): the tests check the alerting rules and every node's exposition with it.
PROMTOOL := $(BIN)/promtool

promtool: $(PROMTOOL)

$(PROMTOOL): | $(STAMP)
	@tmp=$$(mktemp -d) && ( cd $$tmp \
		&& { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
		&& dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$@ ) \
		|| echo "promtool unavailable (apt-get download prometheus failed): its checks are skipped"; \
		rm -rf $$tmp

test: setup promtool
	$(BIN)/python -m pytest

# The fault suite alone (`make test` runs it too): replicas killed, drained and frozen under
# load, hung branches, overload, restarts, a soak, the bad-input matrix, fuzzing.
faults: setup
	$(BIN)/python -m pytest tests/faults -s

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

run: setup
	$(BIN)/python -m meshctl.launcher $(ARGS)

bench: setup
	$(BIN)/python -m bench $(ARGS)

# A rolling update of model_a with traffic flowing, on local processes.
rehearse: setup
	$(BIN)/python -m meshctl.rehearsal $(ARGS)

models: setup
	$(BIN)/python scripts/train_digits.py

clean:
	rm -rf $(VENV) proto/gen .mypy_cache .ruff_cache .pytest_cache
