"""Who is calling: the learner's table of sampler tokens and the interceptor that checks every call against it.

Each sampler holds a secret token; the learner holds a file of them (`--tokens-file`), one `name:token` per line
(a bare `token` gets the name `anon-<hash prefix>`; `#` starts a comment). Samplers send theirs as call metadata
`authorization: Bearer <token>` (heterorl/common/contract.py) on every RPC. `TokenInterceptor` looks it up by its
SHA-256 among the known tokens and refuses the call with UNAUTHENTICATED and `Reason.TOKEN_MISSING` or
`Reason.TOKEN_INVALID` otherwise, before the request is even parsed. Only the standard health check stays open
(Docker and Kubernetes probes carry no token). The file is re-read when it changes, so a token can be revoked
without a restart. `heterorl new-token NAME --out FILE` (heterorl/credentials.py) adds one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from heterorl.common.contract import METADATA_KEY, NAME_RE, SCHEME, TOKEN_ENV, Reason, check_token, error_status
from heterorl.server.ratelimit import Refusals

logger = logging.getLogger(__name__)

# The standard health service stays reachable without a token: probes of orchestrators carry none.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def token_digest(token: str) -> bytes:
    """What the table keeps of a token (never the token itself)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenEntry:
    name: str
    digest: bytes = field(repr=False)


def parse_tokens(text: str, source: str = "tokens file") -> tuple[TokenEntry, ...]:
    """Entries of a tokens file: `name:token` or `token` per line; blank lines and `#` comments are skipped."""
    entries: list[TokenEntry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        if ":" in line:
            name, token = (part.strip() for part in line.split(":", 1))
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"{where}: a name must be 1..64 characters of A-Z a-z 0-9 . _ -, got {name!r}")
        else:
            name, token = "", line
        digest = token_digest(check_token(token, where))
        name = name or f"anon-{digest.hex()[:8]}"
        if name in names:
            raise ValueError(f"{where}: name {name!r} already used on line {names[name]}")
        if digest in digests:
            raise ValueError(f"{where}: the same token already appears on line {digests[digest]}")
        names[name], digests[digest] = number, number
        entries.append(TokenEntry(name, digest))
    if not entries:
        raise ValueError(f"{source} holds no tokens")
    return tuple(entries)


class TokenTable:
    """The learner's known tokens, re-read from their file when it changes (a bad new file keeps the old table).

    The file's stamp is looked at no more often than every `reload_check_s` seconds, so a call costs no stat().
    """

    def __init__(self, path: Path, reload_check_s: float = 1.0):
        self.path = Path(path)
        self.reload_check_s = reload_check_s
        self._lock = threading.Lock()
        self._entries, self._stamp = self._load()
        self._by_digest = {e.digest: e for e in self._entries}
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> tuple[tuple[TokenEntry, ...], tuple[int, int, int]]:
        try:
            stamp = self._stat()
            text = self.path.read_text()
        except OSError as err:
            raise ValueError(f"cannot read tokens file {self.path}: {err.strerror}") from None
        return parse_tokens(text, f"tokens file {self.path}"), stamp

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def world_readable(self) -> bool:
        return bool(self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_check_s:
            return
        with self._lock:
            if now - self._checked < self.reload_check_s:
                return
            self._checked = now
            try:
                if self._stat() == self._stamp:
                    return
                entries, self._stamp = self._load()
                self._entries, self._by_digest = entries, {e.digest: e for e in entries}
                logger.info("tokens file %s changed: %d tokens now", self.path, len(self._entries))
            except (OSError, ValueError) as err:
                logger.warning("tokens file %s changed but cannot be used (%s); keeping the previous tokens",
                               self.path, err)

    def lookup(self, token: str) -> str | None:
        """The name of `token`, or None.

        Found by the SHA-256 of the presented token in a dict, so a call costs the same with 10 or 10,000 tokens
        (the interceptor runs on gRPC's one serving thread: a scan of every entry per call was the largest single
        cost there with 1,000 samplers, benchmarks/fleet.py). Timing reveals nothing useful: where the lookup
        goes depends on the digest of what was presented, and steering it to a known digest needs a preimage."""
        self.maybe_reload()
        presented = token_digest(token)
        entry = self._by_digest.get(presented)
        return entry.name if entry is not None and hmac.compare_digest(presented, entry.digest) else None


# ---- the interceptor -------------------------------------------------------------------------------------------


class AuthenticatedContext:
    """A handler's ServicerContext plus the name of the credential the call was made with."""

    def __init__(self, context: grpc.ServicerContext, principal: str):
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def principal_of(context) -> str:
    """The caller's identity: its token's name, else its client certificate's common name, else ''."""
    principal = getattr(context, "principal", None)
    if principal is not None:
        return principal
    try:
        auth = context.auth_context()
    except (AttributeError, ValueError):
        return ""
    names = auth.get("x509_common_name") if auth else None
    return f"cert:{names[0].decode(errors='replace')}" if names else ""


def _rebuild(handler: grpc.RpcMethodHandler, wrap: Callable, parse: bool = True) -> grpc.RpcMethodHandler:
    """The same handler (shape and serializers) with its behaviour passed through `wrap`; `parse=False` hands the
    behaviour raw bytes, so a refused caller's message is never even deserialized."""
    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(behaviour),
        request_deserializer=handler.request_deserializer if parse else None,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class Verdict:
    """What the interceptor made of a call's credential: a principal, or the reason and message of a refusal."""

    principal: str | None
    reason: Reason | None = None
    message: str = ""


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a known token (UNAUTHENTICATED, counted by reason); passes the token's name on."""

    def __init__(self, tokens: TokenTable, refusals: Refusals, open_methods: frozenset[str] = OPEN_METHODS):
        self.tokens = tokens
        self.refusals = refusals
        self.open_methods = open_methods

    def check(self, metadata) -> Verdict:
        values = [value for key, value in (metadata or ()) if key == METADATA_KEY]
        if not values:
            return Verdict(None, Reason.TOKEN_MISSING, (
                f"no token: send call metadata '{METADATA_KEY}: Bearer <token>' (samplers: --token-file or "
                f"the {TOKEN_ENV} environment variable)"
            ))
        if len(values) > 1:
            return Verdict(None, Reason.TOKEN_INVALID, f"{len(values)} '{METADATA_KEY}' metadata entries; send one")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return Verdict(None, Reason.TOKEN_INVALID, f"'{METADATA_KEY}' metadata must be 'Bearer <token>'")
        name = self.tokens.lookup(token.strip())
        if name is None:
            return Verdict(None, Reason.TOKEN_INVALID, "token not recognised by this learner")
        return Verdict(name)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.open_methods:
            return handler
        verdict = self.check(handler_call_details.invocation_metadata)
        if verdict.principal is None:
            self.refusals.add(verdict.reason)
            status = error_status(grpc.StatusCode.UNAUTHENTICATED, verdict.message, verdict.reason,
                                  field=METADATA_KEY)

            def refuse(_behaviour):
                def behaviour(_request, context):
                    context.abort_with_status(status)

                return behaviour

            return _rebuild(handler, refuse, parse=False)
        principal = verdict.principal

        def with_principal(behaviour):
            def authenticated(request, context):
                return behaviour(request, AuthenticatedContext(context, principal))

            return authenticated

        return _rebuild(handler, with_principal)
