"""`python -m meshctl.grpcurl`: grpcurl's everyday calls with grpcio alone.

grpcurl is not packaged in Debian 12; every node serves reflection, which is all this needs:

    python -m meshctl.grpcurl [-plaintext] ADDRESS list [SERVICE]
    python -m meshctl.grpcurl [-plaintext] [-d JSON] ADDRESS SERVICE/METHOD

As grpcurl does, it learns each message type from the server's reflection, reads the request as
JSON (`-d`, `{}` when absent) and prints the answer as JSON (bytes fields in base64). Unary
methods only. Plaintext unless the ONNXMESH_TLS_* variables say TLS (as for every onnxmesh tool;
`-plaintext` is accepted so grpcurl's command lines run as they are), with the token of
ONNXMESH_TOKEN_FILE. Exit codes: 0 answered, 1 the call failed (one line), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from meshctl.targets import explain
from services.common.errors import from_status
from services.common.grpc.security import SecurityError, environ_security

TIMEOUT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meshctl.grpcurl", description=__doc__.split("\n\n")[0])
    parser.add_argument("-plaintext", action="store_true", help="accepted for grpcurl's command lines")
    parser.add_argument("-d", dest="data", default="{}", help="the request as JSON (default: {})")
    parser.add_argument("address", help="HOST:PORT")
    parser.add_argument("what", help="'list', or SERVICE/METHOD to call")
    parser.add_argument("service", nargs="?", help="with list: that service's methods")
    return parser


def channel(address: str) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    security = environ_security(os.environ)
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address), security.metadata
    return grpc.secure_channel(address, credentials, options=security.options()), security.metadata


def method_of(pool: descriptor_pool.DescriptorPool, name: str) -> MethodDescriptor:
    service, _, method = name.replace("/", ".").rpartition(".")
    try:
        return pool.FindServiceByName(service).FindMethodByName(method)  # type: ignore[no-untyped-call,no-any-return]
    except KeyError:
        raise SystemExit(f"grpcurl: no method {name!r} on the server (see: list {service})") from None


def run(args: argparse.Namespace) -> str:
    conn, metadata = channel(args.address)
    with conn:
        database = ProtoReflectionDescriptorDatabase(conn)
        pool = descriptor_pool.DescriptorPool(database)
        if args.what == "list":
            if args.service is None:
                return "\n".join(sorted(database.get_services()))
            if args.service not in database.get_services():
                raise SystemExit(f"grpcurl: no service {args.service!r} on the server (see: list)")
            service = pool.FindServiceByName(args.service)  # type: ignore[no-untyped-call]
            return "\n".join(sorted(m.full_name for m in service.methods))
        method = method_of(pool, args.what)
        if method.client_streaming or method.server_streaming:
            raise SystemExit(f"grpcurl: {method.full_name} streams; only unary methods are served here")
        request = json_format.Parse(args.data, message_factory.GetMessageClass(method.input_type)())
        response_class = message_factory.GetMessageClass(method.output_type)
        call = conn.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=TIMEOUT_S, metadata=metadata)
        return json_format.MessageToJson(response, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except grpc.RpcError as err:
        failure = from_status(err.code().name, err.details() or "")
        print(f"grpcurl: {explain(args.address, failure, connecting=True)}", file=sys.stderr)
        return 1
    except (json_format.ParseError, SecurityError) as exc:
        print(f"grpcurl: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
