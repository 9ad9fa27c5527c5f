# One entry point. Every target sets itself up on a fresh machine: the venv, the locked
# dependencies and the generated gRPC stubs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
STAMP  := $(VENV)/.installed-stamp
# What `make run` needs (the mesh, the CLI, the jobs service; grpcio-tools for the stubs): the
# runtime dependencies and these extras, not the dev tools.
RUN_EXTRAS := proto jobs
RUN_STAMP  := $(VENV)/.runtime-stamp
GEN    := proto/gen/inference/grpc_predict_v2_pb2.py
PROTOS := $(wildcard proto/*/*.proto)
# The uv release that makes and installs uv.lock: the one the dev extra pins.
UV_VERSION := $(shell sed -n 's/^ *"uv==\([^"]*\)".*/\1/p' pyproject.toml)
# Never download a Python: use the one the venv was made with.
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup runtime lock proto promtool servers check perf_analyzer test faults lint run shell bench bench-capture rehearse models images clean certs dist ocr ocr-models bench-ocr

# Everything a checkout needs (tests, lint, benchmarks): the dev extra.
setup: $(STAMP) $(GEN)

# Only what the mesh needs to run (`make run`): a fraction of the dev extra's size.
runtime: $(RUN_STAMP) $(GEN)

# When pyproject.toml changed since the lock was made, both re-lock first: `uv lock` keeps every
# pin that still fits and only resolves what is new.
define bootstrap
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	@$(UV) lock --check --quiet 2>/dev/null || { \
		echo "uv.lock does not match pyproject.toml: re-locking (make lock). Commit the new uv.lock."; \
		$(UV) lock; }
endef

# Installs exactly what uv.lock pins for the dev extra, direct and indirect (uv sync is exact:
# anything else in the venv goes). It holds the runtime's, so that is installed too.
$(STAMP): pyproject.toml uv.lock
	$(bootstrap)
	$(UV) sync --locked --extra dev --python $(BIN)/python --quiet
	touch $@ $(RUN_STAMP)

# The runtime's pins only; --inexact leaves whatever else is there (a dev install stays whole).
$(RUN_STAMP): pyproject.toml uv.lock
	$(bootstrap)
	$(UV) sync --locked --inexact $(RUN_EXTRAS:%=--extra %) --python $(BIN)/python --quiet
	touch $@

# Re-resolve after editing the dependencies in pyproject.toml; commit uv.lock with them.
# To move one locked package on: $(UV) lock --upgrade-package NAME.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) lock

# Stubs are generated under proto/gen/ (importable as proto.gen.*), apart from
# hand-written code, never edited and never committed.
proto: $(GEN)

$(GEN): $(RUN_STAMP) $(PROTOS) scripts/gen_proto.py
	$(BIN)/python scripts/gen_proto.py

# promtool from Debian's prometheus package, unpacked into the venv (nothing installed system-wide,
# no daemon started): the tests check the alerting rules and every node's exposition with it.
PROMTOOL := $(BIN)/promtool

promtool: $(PROMTOOL)

# A failed download fails the target (and `make test`): the checks must not skip unseen.
$(PROMTOOL): | $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cd $$tmp \
		&& { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus; }; } \
		&& dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$@

# PostgreSQL and redis-server for the tests that start their own (installed as root when missing).
servers:
	scripts/install_test_servers.sh

# What CI runs (.ci/run) and the README's test command: the lint, then the whole suite.
check: lint test

# Triton's perf_analyzer (the PyPI wheel's C++ binary, which needs glibc 2.38), made runnable here
# with the next Debian release's libc unpacked beside it, all under the venv: tests/e2e runs the
# real binary against a model node and the orchestrator.
PERF_ANALYZER := $(VENV)/perf_analyzer/perf_analyzer

perf_analyzer: $(PERF_ANALYZER)

# A failed set-up fails the target (and `make test`): its tests must not skip unseen.
$(PERF_ANALYZER): scripts/perf_analyzer_setup.sh | $(STAMP)
	@PYTHON=$(CURDIR)/$(BIN)/python bash scripts/perf_analyzer_setup.sh $(CURDIR)/$(VENV)/perf_analyzer >/dev/null \
		|| { rm -f $@; echo "perf_analyzer could not be set up (scripts/perf_analyzer_setup.sh failed)" >&2; exit 1; }

test: setup promtool servers perf_analyzer ocr-models
	$(BIN)/python -m pytest

# The fault suite alone (`make test` runs it too): replicas killed, drained and frozen under
# load, hung branches, overload, restarts, a soak, the bad-input matrix, fuzzing.
faults: setup
	$(BIN)/python -m pytest tests/faults -s

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# A local CA, one node certificate (server and client) and a bearer token in certs/ (ignored by
# git: private keys are never committed), for `make run ARGS=--tls` and manual mTLS checks.
certs: runtime
	$(BIN)/python -m meshctl.certs certs

# A wheel of the project in dist/ (the generated stubs included): `pip install dist/*.whl` gives
# the `onnxmesh` command and the runtimes, for a mesh in a folder of its own (docs/your-own-mesh.md).
dist: setup
	rm -rf dist build
	$(UV) build --wheel --out-dir dist

# The digits demo's mesh file, every node its own process: `onnxmesh up demo/mesh.yaml`.
run: runtime
	$(BIN)/python -m meshctl.cli up demo/mesh.yaml $(ARGS)

# The OCR example (examples/ocr): PaddleOCR's PP-OCRv4 ONNX models and character set, out of the
# rapidocr-onnxruntime wheel (Apache-2.0, downloaded with pip, checked by its SHA-256, git-ignored);
# then its mesh, every step its own process: `onnxmesh up examples/ocr/mesh.yaml`.
OCR_MODELS := examples/ocr/recognize/ppocr-rec/1/model.onnx

ocr-models: $(OCR_MODELS)

$(OCR_MODELS): examples/ocr/fetch_models.py | $(STAMP)
	$(BIN)/python examples/ocr/fetch_models.py

ocr: setup ocr-models
	$(BIN)/python -m meshctl.cli up examples/ocr/mesh.yaml $(ARGS)

# The OCR mesh against the same steps in one process and RapidOCR() in-process (bench/ocr.py):
# a few minutes, so not part of `make bench`. ARGS="--rounds 1 --duration 4" for a quick look.
bench-ocr: setup ocr-models
	$(BIN)/python -m bench.ocr $(ARGS)

# A shell with the venv first on PATH, so `onnxmesh ...` and `python ...` run as the README prints
# them; `exit` leaves it.
shell: runtime
	@echo "onnxmesh: a shell with $(VENV) active (onnxmesh, python -m ...); 'exit' leaves it"
	@VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH=$(CURDIR)/$(BIN):$$PATH $${SHELL:-/bin/sh}

bench: setup
	$(BIN)/python -m bench $(ARGS)

# What payload capture costs: p50 and throughput at 0 %, 1 % and 100 % (short runs).
bench-capture: runtime
	$(BIN)/python -m bench.probes.capture $(ARGS)

# A rolling update of model_a with traffic flowing, on local processes.
rehearse: runtime
	$(BIN)/python -m meshctl.rehearsal $(ARGS)

models: setup
	$(BIN)/python scripts/train_digits.py

# The five images, tagged as k8s/ names them (docker when its daemon answers, else podman;
# offline, the base images are built from Debian packages first). Needs only python3.
# `make images ARGS="--help"` lists the options (tag, engine, CA bundle, base images).
images:
	$(PYTHON) -m images $(ARGS)

clean:
	rm -rf $(VENV) proto/gen .mypy_cache .ruff_cache .pytest_cache
