# syntax=docker/dockerfile:1.7
#
# One Dockerfile for every node of the mesh; SERVICE picks which one:
#
#   docker build --build-arg SERVICE=preprocess   -t onnxmesh/preprocess:0.1.0   .
#   docker build --build-arg SERVICE=model_a      -t onnxmesh/model-a:0.1.0      .
#   docker build --build-arg SERVICE=model_b      -t onnxmesh/model-b:0.1.0      .
#   docker build --build-arg SERVICE=orchestrator -t onnxmesh/orchestrator:0.1.0 .
#
# Model-in-image: a model service's image carries only its own model directory, so a new
# model version is a new image tag of that one service (see docs/kubernetes.md).

ARG SERVICE=model_a
# Builder and runtime must share one base: the venv's interpreter is a symlink into it.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------
# builder: build tools, the dependencies, the generated gRPC stubs, the package.
FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential make \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so code edits reuse this (slow) layer.
# grpcio-tools is taken from the dev extra so its pin stays in one place (it must match grpcio).
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python - <<'EOF' > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
tools = [d for d in project["optional-dependencies"]["dev"] if d.startswith("grpcio-tools")]
print("\n".join(project["dependencies"] + tools))
EOF

COPY Makefile ./
COPY proto/ proto/
COPY services/ services/
COPY orchestrator/ orchestrator/
# The operator tooling too, so every image has the `onnxmesh` CLI (e.g. for a throw-away client pod).
COPY meshctl/ meshctl/

# `make proto` normally sets up .venv first; point it at this venv and mark it installed.
# Model files never go into the package: each runtime image copies its own directory.
RUN touch "$VIRTUAL_ENV/.installed-stamp" \
    && make proto VENV="$VIRTUAL_ENV" \
    && rm -rf services/*/models \
    && pip install --no-deps . \
    && pip uninstall -y grpcio-tools

# ---------------------------------------------------------------------------------------
# runtime: slim, no compilers, a numeric non-root user, read-only friendly.
FROM ${PYTHON_IMAGE} AS runtime

# Numeric so Kubernetes can verify runAsNonRoot without resolving a user name.
ARG UID=10001
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ONNXMESH_HOST=0.0.0.0 \
    ONNXMESH_METRICS_PORT=9090

COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/onnxmesh
USER ${UID}:${UID}

# ---------------------------------------------------------------------------------------
# One final stage per service. Exec-form ENTRYPOINT cannot expand variables, so each
# service gets a literal one; `FROM svc-${SERVICE}` at the end picks the stage (BuildKit
# builds only the stages the chosen one needs). Ports and modules are those of
# services/common/topology.py (tests/unit/test_topology.py keeps them equal).
FROM runtime AS svc-preprocess
COPY --chown=0:0 services/preprocess/models /opt/onnxmesh/models
ENV ONNXMESH_PORT=8011 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8011 9090
ENTRYPOINT ["python", "-m", "services.preprocess"]

FROM runtime AS svc-model_a
COPY --chown=0:0 services/model_a/models /opt/onnxmesh/models
ENV ONNXMESH_PORT=8021 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8021 9090
ENTRYPOINT ["python", "-m", "services.model_a"]

FROM runtime AS svc-model_b
COPY --chown=0:0 services/model_b/models /opt/onnxmesh/models
ENV ONNXMESH_PORT=8031 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8031 9090
ENTRYPOINT ["python", "-m", "services.model_b"]

# The orchestrator has no models; it bakes the repo's graph spec at the path where
# Kubernetes mounts the ConfigMap, so `docker run` and the cluster read the same path.
FROM runtime AS svc-orchestrator
COPY --chown=0:0 orchestrator/graphs.yaml /etc/onnxmesh/graphs.yaml
ENV ONNXMESH_PORT=8001 ONNXMESH_GRAPHS=/etc/onnxmesh/graphs.yaml
EXPOSE 8001 9090
ENTRYPOINT ["python", "-m", "orchestrator"]

FROM svc-${SERVICE}
ARG SERVICE
LABEL org.opencontainers.image.title="onnxmesh-${SERVICE}"
