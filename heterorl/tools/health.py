"""`heterorl health`: is a daemon up? For container health checks (docker/Dockerfile, docker/docker-compose.yml).

    heterorl health --target 127.0.0.1:50051            # learner or relay: the standard gRPC health service
    heterorl health --url http://127.0.0.1:9401/metrics  # sampler: it serves no gRPC, only its metrics endpoint

Exit code 0: SERVING (or HTTP 200); 1: anything else (not serving, unreachable, timed out). The learner and the relay
answer grpc.health.v1 without a token, so a probe needs no credentials. Probes run every few seconds in every
container, and `heterorl` itself imports torch (seconds of CPU), so the images call this module directly:
`python -m heterorl.tools.health ...` imports only grpc.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path


def grpc_serving(target: str, service: str = "", timeout: float = 3.0, tls_ca: Path | None = None,
                 server_name: str = "") -> tuple[bool, str]:
    """(serving?, what was seen) from `target`'s grpc.health.v1 Check; TLS when `tls_ca` is given."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def http_ok(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(HTTP 200?, what was seen) from a GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200, f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return False, str(getattr(err, "reason", err))


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="HOST:PORT of a gRPC daemon (learner, relay)")
    what.add_argument("--url", help="an HTTP URL that must answer 200 (a sampler's --metrics-port endpoint)")
    p.add_argument("--service", default="", help="gRPC service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a daemon that serves TLS")
    p.add_argument("--tls-server-name", default="", help="name its certificate carries, if not the dialled host")
    p.set_defaults(func=cmd_health)


def cmd_health(args: argparse.Namespace) -> int:
    if args.target is not None:
        try:
            ok, seen = grpc_serving(args.target, args.service, args.timeout, args.tls_ca, args.tls_server_name)
        except OSError as err:  # an unreadable --tls-ca
            print(f"heterorl health: {err}", file=sys.stderr)
            return 2
        where = args.target
    else:
        ok, seen = http_ok(args.url, args.timeout)
        where = args.url
    print(f"{where}: {seen}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `health` to the `heterorl` command's subcommands."""
    add_arguments(sub.add_parser("health", help="exit 0 when a learner or relay is SERVING (container health checks)"))


def main(argv: list[str] | None = None) -> int:
    """`python -m heterorl.tools.health`: the same command without importing the rest of heterorl."""
    parser = argparse.ArgumentParser(prog="heterorl health", description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
