"""How the learner is reached: TLS credentials, the bind policy, and the whole security setting of one server.

- **TLS** (`--tls-cert/--tls-key`), optionally **mutual** (`--tls-client-ca`: a client certificate from that CA
  is required and its common name becomes the caller's identity when no tokens are configured).
- **Bind check.** Without tokens or client certificates anybody who can reach the port can join, so a learner
  refuses to listen beyond loopback unless told `--insecure` explicitly.
- `ServerSecurity` gathers these with the token table (tokens.py) and the rate limits (ratelimit.py) that the
  `[security]` section of a LearnerConfig names, and checks the files before the model is loaded, so a mistake is
  reported at once.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from heterorl.common.tls import read_pem
from heterorl.server.ratelimit import RateLimits, Refusals
from heterorl.server.tokens import TokenInterceptor, TokenTable

if TYPE_CHECKING:
    from heterorl.server.config import SecuritySection

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address (nothing off this machine can connect)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


@dataclass
class ServerSecurity:
    """Credentials, bind policy and limits of one learner server."""

    tokens: TokenTable | None = None
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    tls_client_ca: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    limits: RateLimits = field(default_factory=RateLimits)

    @classmethod
    def from_config(cls, config: SecuritySection) -> "ServerSecurity":
        """Read the files the `[security]` section names; ValueError with the file and the problem if one is
        unusable."""
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if config.tls_client_ca is not None and config.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        tokens = TokenTable(config.tokens_file) if config.tokens_file is not None else None
        if tokens is not None and tokens.world_readable():
            logger.warning("tokens file %s is readable by other users (chmod 600 it)", config.tokens_file)
        return cls(
            tokens=tokens,
            tls_cert=read_pem(config.tls_cert, "TLS certificate"),
            tls_key=read_pem(config.tls_key, "TLS key"),
            tls_client_ca=read_pem(config.tls_client_ca, "client CA"),
            insecure=config.insecure,
            limits=RateLimits(
                config.rate_calls_per_s, config.rate_calls_burst, config.rate_groups_per_s, config.rate_groups_burst
            ),
        )

    @property
    def authenticates(self) -> bool:
        return self.tokens is not None or self.tls_client_ca is not None

    def describe(self) -> str:
        """What `Status.security` says, e.g. "TLS, 3 tokens"."""
        parts = []
        if self.tls_cert:
            parts.append("mutual TLS" if self.tls_client_ca else "TLS")
        if self.tokens is not None:
            n = len(self.tokens.names)
            parts.append(f"{n} token{'' if n == 1 else 's'}")
        if not parts:
            parts.append("plaintext, no authentication" + (" (--insecure)" if self.insecure else ""))
        return ", ".join(parts)

    def check_bind(self, host: str) -> list[str]:
        """Refuse (ValueError) a non-loopback bind without authentication unless insecure; return warnings."""
        if is_loopback(host):
            return []
        if not self.authenticates:
            if not self.insecure:
                raise ValueError(
                    f"refusing to listen on {host!r} without authentication: anyone who can reach it could join "
                    "the run. Give --tokens-file (and --tls-cert/--tls-key) or --tls-client-ca, bind 127.0.0.1, "
                    "or pass --insecure=true to accept that risk"
                )
            return [f"listening on {host!r} with no authentication (--insecure): anyone who can reach it may join"]
        if self.tls_cert is None:
            return [f"listening on {host!r} without TLS: tokens and trajectories cross the network in plaintext"]
        return []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_client_ca,
            require_client_auth=self.tls_client_ca is not None,
        )

    def interceptors(self, refusals: Refusals) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.tokens, refusals)] if self.tokens is not None else []
