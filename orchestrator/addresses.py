"""Where the orchestrator finds a spec's services: ONNXMESH_SERVICE_<NAME>_ADDRESS.

A mesh file's services carry no address: whoever starts the orchestrator (`onnxmesh up`, the
rendered Kubernetes manifests) passes each in its variable. The names are derived here once.
"""

from __future__ import annotations

import re

_ADDRESS_VARIABLE = re.compile(r"ONNXMESH_SERVICE_(?P<name>[A-Z0-9_]+)_ADDRESS")


def address_variable(service: str) -> str:
    """The environment variable that tells the orchestrator where a spec service is.

    ``model_a`` -> ``ONNXMESH_SERVICE_MODEL_A_ADDRESS``: upper case, and every character other
    than a letter or a digit becomes ``_`` (``model-a`` names the same variable).
    """
    return f"ONNXMESH_SERVICE_{re.sub(r'[^A-Z0-9]', '_', service.upper())}_ADDRESS"


def service_of_address_variable(name: str) -> str | None:
    """The service an address variable is about, in lower case; None for any other variable.

    ``ONNXMESH_SERVICE_MODEL_A_CANARY_ADDRESS`` -> ``model_a_canary``. A variable does not tell
    ``-`` from ``_``: compare ``address_variable(service)`` with it to match a given service.
    """
    match = _ADDRESS_VARIABLE.fullmatch(name)
    return match["name"].lower() if match else None
