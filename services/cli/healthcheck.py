"""Health probes of the platform's processes, usable as a command (container healthchecks).

    python -m services.cli.healthcheck grpc 127.0.0.1:50051     # gRPC health answers
    python -m services.cli.healthcheck grpc 127.0.0.1:50051 --serving
    python -m services.cli.healthcheck grpc serving:50051 --tls-ca ca.crt [--tls-cert c --tls-key k]
    python -m services.cli.healthcheck http http://127.0.0.1:9101/metrics

Exit code 0 when healthy, 1 otherwise, with one line saying what was seen. The local stack
(services/cli/localstack/) uses the same functions, so a container and a local process are
judged alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.localinfra import http_ok
from services.shared.tls import channel_credentials


def grpc_health_status(
    address: str,
    service: str = "",
    timeout_s: float = 1.0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> str | None:
    """The serving status the gRPC health service reports (e.g. ``SERVING``), or None when
    nothing answers. ``credentials``: a TLS channel (see services/shared/tls.py)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    except grpc.RpcError:
        return None
    finally:
        channel.close()
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe a platform process; exit 0 if healthy.")
    kinds = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = kinds.add_parser("grpc", help="grpc.health.v1.Health/Check answers")
    grpc_parser.add_argument("address", help="host:port")
    grpc_parser.add_argument(
        "--serving", action="store_true", help="require SERVING (not just an answer)"
    )
    grpc_parser.add_argument(
        "--tls-ca", type=Path, help="speak TLS, trusting this CA bundle (PEM)", default=None
    )
    grpc_parser.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    grpc_parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    grpc_parser.add_argument(
        "--server-name", default="", help="name to check the server certificate against"
    )
    http_parser = kinds.add_parser("http", help="an HTTP GET answers 2xx")
    http_parser.add_argument("url")
    args = parser.parse_args(argv)

    if args.kind == "grpc":
        credentials = (
            channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
            if args.tls_ca is not None
            else None
        )
        status = grpc_health_status(
            args.address, credentials=credentials, server_name=args.server_name
        )
        healthy = status == "SERVING" if args.serving else status is not None
        print(f"grpc {args.address}: {status or 'no answer'}")
        return 0 if healthy else 1
    healthy = http_ok(args.url)
    print(f"http {args.url}: {'ok' if healthy else 'no 2xx answer'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
