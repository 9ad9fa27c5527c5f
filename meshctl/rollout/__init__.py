"""`onnxmesh rollout`: roll out one model at a time and move canary traffic on Kubernetes.

Every node of the mesh is its own Deployment and each model service's image carries its model,
so a new model version is a new image tag of one Deployment; canary and shadow traffic are steps
of the graph spec that the orchestrator reads from the ConfigMap ``onnxmesh-graphs``. These
commands drive both through the Kubernetes API, on the current kubeconfig context:

===========================================  ===============================================
``status``                                   each Deployment's image, model version, replicas
                                             and rollout condition; which graphs use which
                                             service; splitter weights and mirrors
``set-image COMPONENT IMAGE [--timeout S]``  patch one Deployment's image and version labels,
                                             then wait until the rollout completes
``canary GRAPH STEP --weights a=90,b=10``    set the branch weights of one splitter step
``promote GRAPH STEP [--branch B]``          send 100 % of the step to the canary branch
``abort GRAPH STEP``                         send 100 % back to the stable (first) branch
===========================================  ===============================================

Exit codes: 0 success, 1 failure (a rollout that does not become ready, an API error), 2 usage
(a bad argument, an unknown graph, step, branch or Deployment; the Kubernetes client missing).

The Kubernetes client is an optional extra (``pip install 'onnxmesh[k8s]'``); nothing but
``KubernetesClusterApi`` needs it, so ``--help`` and the tests (which drive a fake cluster) run
without it. The package, by idea:

- ``errors``: what can fail and its exit code;
- ``cluster``: the seams, ``ClusterApi`` (``KubernetesClusterApi`` is the real one) and ``Clock``;
- ``deployments``: image tags, version labels, judging and waiting for a Deployment's rollout;
- ``graphs``: the graph spec read from its ConfigMap with the orchestrator's own parser;
  splitters, mirrors, and which Deployment each spec service is;
- ``weights``: a splitter's weights edited in place in the spec's YAML text;
- ``commands``: set-image, canary, promote, abort and status;
- ``cli``: the parser; ``main(argv)`` is what ``onnxmesh rollout`` and ``python -m meshctl.rollout``
  run.
"""

from meshctl.rollout.cli import build_parser, main, run_rollout

__all__ = ["build_parser", "main", "run_rollout"]
