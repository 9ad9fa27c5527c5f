"""Accuracy of graphs through tritonclient, unmodified: `python triton_accuracy.py ADDRESS HOLDOUT GRAPH...`.

Run as its own process by tests/e2e/test_graphs.py: tritonclient and the mesh's generated stubs
both register the `inference.*` protobuf messages, so they cannot share one interpreter. Prints
one JSON object: per graph, its accuracy, input and output names, and the step statuses seen.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tc


def report(address: str, holdout_path: str, graphs: list[str]) -> dict[str, object]:
    holdout = np.load(holdout_path)
    client = tc.InferenceServerClient(address)
    out: dict[str, object] = {}
    for graph in graphs:
        meta = client.get_model_metadata(graph, as_json=True)
        correct = 0
        statuses: dict[str, dict[str, int]] = {}
        for image, label in zip(holdout["images"], holdout["labels"], strict=True):
            tensor = tc.InferInput("image", [1, 8, 8], "UINT8")
            tensor.set_data_from_numpy(image[None])
            result = client.infer(graph, [tensor], client_timeout=10)
            correct += int(result.as_numpy("label")[0] == label)
            for key, value in result.get_response().parameters.items():
                if key.startswith("step."):
                    state = value.string_param.split(":")[0]
                    statuses.setdefault(key, {}).setdefault(state, 0)
                    statuses[key][state] += 1
        out[graph] = {
            "accuracy": correct / len(holdout["labels"]),
            "inputs": [i["name"] for i in meta["inputs"]],
            "outputs": sorted(o["name"] for o in meta["outputs"]),
            "statuses": statuses,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(report(sys.argv[1], sys.argv[2], sys.argv[3:])))
