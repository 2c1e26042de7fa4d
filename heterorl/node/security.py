"""How a sampler proves itself to its learner and verifies it: a bearer token, TLS, mutual TLS.

A token travels as `authorization: Bearer <token>` metadata on every call (the format is the shared contract,
`heterorl.common.contract`), and TLS, optionally with a client certificate for mutual TLS, protects the link.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import grpc

from heterorl.common.contract import TOKEN_ENV, bearer, token_from_text

if TYPE_CHECKING:
    from heterorl.node.config import ClientSecuritySection


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves itself to the learner and verifies it. Empty: plaintext, no token (loopback runs)."""

    token: str = field(default="", repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)      # PEM roots; None with tls=True: system roots
    tls_cert: bytes | None = field(default=None, repr=False)    # client certificate chain (mutual TLS)
    tls_key: bytes | None = field(default=None, repr=False)
    tls: bool = False
    server_name: str = ""  # the name the learner's certificate must carry, when it is not the dialled host

    @classmethod
    def load(cls, token_file: Path | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
             tls_key: Path | None = None, server_name: str = "",
             env: Mapping[str, str] = os.environ) -> "ClientSecurity":
        """Token from `token_file`, else the HETERORL_TOKEN environment variable; TLS on when any TLS file is given."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate and its key go together: give --tls-cert and --tls-key")
        if token_file is not None:
            text = _read(token_file, "token file").decode(errors="replace")
            token = token_from_text(text, f"token file {token_file}")
        elif env.get(TOKEN_ENV, "").strip():
            token = token_from_text(env[TOKEN_ENV], f"the {TOKEN_ENV} environment variable")
        else:
            token = ""
        tls = any(p is not None for p in (tls_ca, tls_cert)) or bool(server_name)
        return cls(token=token, tls_ca=_read(tls_ca, "CA certificate"), tls_cert=_read(tls_cert, "client certificate"),
                   tls_key=_read(tls_key, "client key"), tls=tls, server_name=server_name)

    @classmethod
    def from_config(cls, config: ClientSecuritySection) -> "ClientSecurity":
        """From the `[security]` section of a sampler's config (see `load`)."""
        return cls.load(config.token_file, config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name)

    def describe(self) -> str:
        parts = (["mutual TLS" if self.tls_cert else "TLS"] if self.tls else ["plaintext"])
        return ", ".join(parts + (["token"] if self.token else []))


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (call credentials would need TLS; this works on both)."""

    def __init__(self, token: str):
        self._metadata = bearer(token)

    def _details(self, details):
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


def open_channel(target: str, security: ClientSecurity, options: list[tuple[str, object]] | None = None
                 ) -> tuple[grpc.Channel, grpc.Channel]:
    """(raw channel, channel for calls): TLS when asked, the token added to every call when there is one."""
    options = list(options or [])
    if security.tls:
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.tls_ca, private_key=security.tls_key, certificate_chain=security.tls_cert
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    calls = grpc.intercept_channel(channel, _TokenMetadata(security.token)) if security.token else channel
    return channel, calls
