"""Our proto sources against Triton's own descriptors (tritonclient ships them): every message,
field, number, type and RPC we declare is Triton's, so its tools call us unmodified.

tritonclient registers the same `inference.*` names as our stubs, so its descriptors are read
in a separate process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from google.protobuf.descriptor import Descriptor, FileDescriptor

from proto.gen.inference import grpc_predict_v2_pb2, model_config_pb2

DUMP = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2

def messages(d, out):
    for m in d.values():
        out[m.full_name] = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else ""] for f in m.fields}
        messages(m.nested_types_by_name, out)

out = {}
for module in (service_pb2, model_config_pb2):
    messages(module.DESCRIPTOR.message_types_by_name, out)
    for e in module.DESCRIPTOR.enum_types_by_name.values():
        out[e.full_name] = {v.name: v.number for v in e.values}
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["rpcs"] = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming] for m in service.methods}
print(json.dumps(out))
"""


def _ours() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def messages(d: dict[str, Descriptor]) -> None:
        for m in d.values():
            if m.GetOptions().map_entry:
                out[m.full_name] = None  # map entries: compared through the field that uses them
            else:
                out[m.full_name] = {
                    f.name: [
                        f.number,
                        f.type,
                        f.is_repeated,
                        f.message_type.full_name
                        if f.message_type
                        else f.enum_type.full_name
                        if f.enum_type
                        else "",
                    ]
                    for f in m.fields
                }
            messages(m.nested_types_by_name)

    module: FileDescriptor
    for module in (grpc_predict_v2_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        messages(module.message_types_by_name)
        for e in module.enum_types_by_name.values():
            out[e.full_name] = {v.name: v.number for v in e.values}
    service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    out["rpcs"] = {
        m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
        for m in service.methods
    }
    return out


def test_every_message_field_and_rpc_is_tritons() -> None:
    run = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 0, run.stderr
    theirs = json.loads(run.stdout)
    ours = _ours()
    assert ours["rpcs"] == theirs["rpcs"]
    for name, fields in ours.items():
        if name == "rpcs" or fields is None:
            continue
        assert name in theirs, f"{name} is not one of Triton's"
        for field, spec in fields.items():
            assert theirs[name].get(field) == spec, (
                f"{name}.{field}: ours {spec}, Triton's {theirs[name].get(field)}"
            )
