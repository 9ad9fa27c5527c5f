# One Dockerfile for every image of the mesh; SERVICE picks which one. `make images` builds
# them all (images/build.py: docker with BuildKit, else podman/buildah); by hand:
#
#   docker build --build-arg SERVICE=preprocess   -t onnxmesh/preprocess:0.1.0   .
#   docker build --build-arg SERVICE=model_a      -t onnxmesh/model-a:0.1.0      .
#   docker build --build-arg SERVICE=model_b      -t onnxmesh/model-b:0.1.0      .
#   docker build --build-arg SERVICE=orchestrator -t onnxmesh/orchestrator:0.1.0 .
#   docker build --build-arg SERVICE=jobs         -t onnxmesh/jobs:0.1.0         .
#
# Every Python package comes from uv.lock (uv sync --locked), as for `make setup`. Behind a
# proxy with its own CA, pass the host's bundle as a build secret; it is mounted for the RUN
# steps that download and never stored in a layer:
#
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...
#
# Plain Dockerfile syntax only (no heredocs): BuildKit (Docker 23+, its built-in frontend: no
# `# syntax=` line, which would pull one from a registry) and Debian 12's buildah 1.28 both build it.
# Model-in-image: a model service's image carries only its own model directory, so a new
# model version is a new image tag of that one service (see docs/kubernetes.md).

ARG SERVICE=model_a
# Builder and runtime must share one Python: the venv's interpreter is a symlink into the base.
# Offline (no registry), `make images` builds both from Debian packages (images/base.py).
ARG PYTHON_IMAGE=python:3.11-slim
ARG BUILDER_IMAGE=${PYTHON_IMAGE}

# ---------------------------------------------------------------------------------------
# builder: uv, the locked dependencies, the generated gRPC stubs, the package. No compiler:
# every locked package is a wheel.
FROM ${BUILDER_IMAGE} AS builder

# The uv release that made uv.lock (the `dev` extra pins it; a test keeps the two equal).
ARG UV_VERSION=0.13.9
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# with-ca: trust the build secret `ca_bundle` for the command it runs, when one was given.
COPY images/with-ca.sh /usr/local/bin/with-ca
RUN --mount=type=secret,id=ca_bundle \
    with-ca sh -c 'python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir "uv==$UV_VERSION"'
ENV PATH="/opt/uv/bin:$PATH"

WORKDIR /src
# Dependencies first, from the lock alone, so code edits reuse this (slow) layer. The proto
# extra (grpcio-tools) is only for generating the stubs; the final syncs below remove it.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/uv \
    with-ca uv sync --locked --no-install-project --extra proto --extra jobs

COPY scripts/gen_proto.py scripts/gen_proto.py
COPY proto/ proto/
RUN /opt/venv/bin/python scripts/gen_proto.py

COPY services/ services/
COPY orchestrator/ orchestrator/
COPY meshctl/ meshctl/
COPY jobs/ jobs/
# Model files never go into the package: each service image copies its own directory.
RUN rm -rf services/*/models

# The venv of the nodes: exactly the lock's default dependencies and the package itself
# (uv sync is exact: grpcio-tools and the jobs extra leave again). No pip, no dev tools.
FROM builder AS venv-nodes
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/uv \
    with-ca uv sync --locked --no-editable --compile-bytecode

# The venv of the jobs image: the same plus the jobs extra (the job store, PostgreSQL).
FROM builder AS venv-jobs
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/uv \
    with-ca uv sync --locked --no-editable --compile-bytecode --extra jobs

# ---------------------------------------------------------------------------------------
# runtime: the base's Python and a venv; no compilers, no pip, a numeric non-root user,
# read-only friendly.
FROM ${PYTHON_IMAGE} AS runtime-base

# Numeric so Kubernetes can verify runAsNonRoot without resolving a user name.
ARG UID=10001
# onnxruntime's telemetry would try to write a device id under $HOME (read-only here) and
# warn about it at every start.
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ONNXMESH_HOST=0.0.0.0 \
    ONNXMESH_METRICS_PORT=9090
WORKDIR /opt/onnxmesh
USER ${UID}:${UID}

FROM runtime-base AS runtime
COPY --from=venv-nodes /opt/venv /opt/venv

FROM runtime-base AS runtime-jobs
COPY --from=venv-jobs /opt/venv /opt/venv

# The runtime of any mesh's services (`onnxmesh images`, meshctl/images.py): each service's image
# is this plus its model directory and settings; `python -m orchestrator` with a mesh file for
# the orchestrator.
FROM runtime AS svc-node
ENTRYPOINT ["python", "-m", "services.common.model_node"]

# ---------------------------------------------------------------------------------------
# One final stage per image: the demo's services are svc-node with their model directory, name
# and runtime (what `onnxmesh images demo/mesh.yaml` makes of them); exec-form ENTRYPOINT cannot
# expand variables, so the others get a literal one. `FROM svc-${SERVICE}` at the end picks the
# stage (BuildKit and buildah build only the stages the chosen one needs). Ports, names and
# runtimes are demo/mesh.yaml's (tests/unit/test_topology.py keeps them equal).
FROM svc-node AS svc-preprocess
COPY --chown=0:0 services/preprocess/models /opt/onnxmesh/models
ENV ONNXMESH_NAME=preprocess ONNXMESH_RUNTIME=python ONNXMESH_PORT=8011 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8011 9090

FROM svc-node AS svc-model_a
COPY --chown=0:0 services/model_a/models /opt/onnxmesh/models
ENV ONNXMESH_NAME=model_a ONNXMESH_RUNTIME=onnx ONNXMESH_PORT=8021 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8021 9090

FROM svc-node AS svc-model_b
COPY --chown=0:0 services/model_b/models /opt/onnxmesh/models
ENV ONNXMESH_NAME=model_b ONNXMESH_RUNTIME=onnx ONNXMESH_PORT=8031 ONNXMESH_MODEL_DIR=/opt/onnxmesh/models
EXPOSE 8031 9090

# The orchestrator has no models; it bakes the demo's mesh file (its graphs) at the path where
# Kubernetes mounts the ConfigMap, so `docker run` and the cluster read the same path. It has the
# jobs extra: payload capture writes to the job store (SQLite, or PostgreSQL for replicas).
FROM runtime-jobs AS svc-orchestrator
COPY --chown=0:0 demo/mesh.yaml /etc/onnxmesh/graphs.yaml
ENV ONNXMESH_PORT=8001 ONNXMESH_GRAPHS=/etc/onnxmesh/graphs.yaml
EXPOSE 8001 9090
ENTRYPOINT ["python", "-m", "orchestrator"]

# uv and the nodes' venv: where `onnxmesh images` installs a Python service's extra requirements
# before copying the venv onto svc-node (a runtime image never carries pip or uv).
FROM venv-nodes AS svc-node-builder

# Batch and asynchronous serving (jobs/): the jobs service by default; the worker and the
# batch CronJob set their own command (k8s/components/jobs/).
FROM runtime-jobs AS svc-jobs
ENV ONNXMESH_PORT=8041
EXPOSE 8041
ENTRYPOINT ["python", "-m", "jobs.service"]

FROM svc-${SERVICE}
ARG SERVICE
LABEL org.opencontainers.image.title="onnxmesh-${SERVICE}"
