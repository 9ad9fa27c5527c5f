"""The gRPC edge: the only place (with `rest/` and `server.py`) that imports grpc or protobuf.

servicer (messages -> data plane), codec (protobuf tensors), client, triton (protobuf forms of
Triton's extensions), reflection, security (mTLS and tokens), traced (trace context on the wire).
"""
