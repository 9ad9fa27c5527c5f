"""Triton's extensions to the Open Inference Protocol, free of any wire format: request and response
parameters, system shared memory, per-model statistics. Their protobuf forms are in `grpc/triton.py`."""
