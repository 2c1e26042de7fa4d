"""Who may talk to the learner, over what, and how fast.

heterorl accepts samplers from strangers' machines, so the learner authenticates every call before a handler sees
it and limits what any one caller can cost it:

- **Tokens.** Each sampler holds a secret token; the learner holds a file of them (`--tokens-file`), one
  `name:token` per line (a bare `token` gets the name `anon-<hash prefix>`; `#` starts a comment). Samplers send
  theirs as call metadata `authorization: Bearer <token>` on every RPC. `TokenInterceptor` checks it with a
  constant-time comparison against every known token and answers UNAUTHENTICATED otherwise. Only the standard
  health check stays open (Docker and Kubernetes probes carry no token). A token never appears on a command line:
  files and the environment only. The file is re-read when it changes, so a token can be revoked without a
  restart.
- **TLS** (`--tls-cert/--tls-key`), optionally **mutual** (`--tls-client-ca`: a client certificate from that CA
  is required and its common name becomes the caller's identity when no tokens are configured).
- **Bind check.** Without tokens or client certificates anybody who can reach the port can join, so a learner
  refuses to listen beyond loopback unless told `--insecure` explicitly.
- **Rate limits** per sampler (token buckets for calls and for groups) answer RESOURCE_EXHAUSTED, which samplers
  treat as "back off and retry".
- **Refusals** are counted learner-wide by reason (`Refusals`), and per sampler by the learner's registry.

`python -m heterorl.server.auth new-token NAME --out FILE` appends a fresh token to a tokens file;
`python -m heterorl.server.auth pki DIR` writes a throwaway CA with server and client certificates (openssl CLI).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

METADATA_KEY = "authorization"  # the HTTP convention: `authorization: Bearer <token>`
SCHEME = "bearer"
# The standard health service stays reachable without a token: probes of orchestrators carry none.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
RELOAD_CHECK_S = 1.0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_token(token: str, where: str = "token") -> str:
    """The token if it is well formed (16..512 URL-safe/base64 characters, no ':'); ValueError otherwise."""
    if not TOKEN_RE.fullmatch(token):
        raise ValueError(
            f"{where}: a token must be 16..512 characters of A-Z a-z 0-9 . _ ~ + / = - "
            f"(got {len(token)} characters{'' if token.isprintable() else ', some not printable'})"
        )
    return token


def generate_token() -> str:
    """A fresh 256-bit token."""
    return secrets.token_urlsafe(32)


# ---- tokens ----------------------------------------------------------------------------------------------------


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
        digest = _digest(check_token(token, where))
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


def token_from_text(text: str, where: str) -> str:
    """A client's token: the first non-comment line of `text`, either `token` or a `name:token` line (so a line
    of the learner's tokens file works as is). Shared with the sampler's side (heterorl/node/client.py)."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            return check_token(line.split(":", 1)[1].strip() if ":" in line else line, where)
    raise ValueError(f"{where} holds no token")


class TokenTable:
    """The learner's known tokens, re-read from their file when it changes (a bad new file keeps the old table)."""

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self._lock = threading.Lock()
        self._entries, self._stamp = self._load()
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
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            try:
                if self._stat() == self._stamp:
                    return
                self._entries, self._stamp = self._load()
                self.log(f"tokens file {self.path} changed: {len(self._entries)} tokens now")
            except (OSError, ValueError) as err:
                self.log(f"tokens file {self.path} changed but cannot be used ({err}); keeping the previous tokens")

    def lookup(self, token: str) -> str | None:
        """The name of `token`, or None. Compares with every entry in constant time, never stopping early."""
        self.maybe_reload()
        presented = _digest(token)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.name
        return found


# ---- refusal counts and rate limits ----------------------------------------------------------------------------


class Refusals:
    """Learner-wide counts of refused requests by reason (also those no sampler can be blamed for)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class RateLimiter:
    """Token buckets by key: `rate` per second sustained, `burst` at once; rate 0 disables the limit."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
            raise ValueError(f"a rate limit needs rate >= 0 and burst >= 1, got rate {rate}, burst {burst}")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of that count)

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """0 if the call may proceed (and it is charged), else the seconds until it could."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.max_keys:  # forget keys whose buckets have refilled (they are fresh anyway)
                full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
                for k in full:
                    del self._buckets[k]
            return (cost - tokens) / self.rate


@dataclass(frozen=True)
class RateLimits:
    calls_per_s: float = 50.0
    calls_burst: float = 200.0
    groups_per_s: float = 200.0
    groups_burst: float = 800.0

    def __post_init__(self) -> None:
        for what, rate, burst in (("calls", self.calls_per_s, self.calls_burst),
                                  ("groups", self.groups_per_s, self.groups_burst)):
            if not (rate >= 0 and (rate == 0 or burst >= 1)):
                raise ValueError(f"rate limit of {what}: need rate >= 0 and burst >= 1, got {rate}/s, burst {burst}")


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


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a known token (UNAUTHENTICATED, counted); passes the token's name on."""

    def __init__(self, tokens: TokenTable, refusals: Refusals, open_methods: frozenset[str] = OPEN_METHODS):
        self.tokens = tokens
        self.refusals = refusals
        self.open_methods = open_methods

    def _check(self, metadata) -> tuple[str | None, str, str]:
        """(principal, reason, message): principal None means refused for `reason`."""
        values = [value for key, value in (metadata or ()) if key == METADATA_KEY]
        if not values:
            return None, "token_missing", (
                f"no token: send call metadata '{METADATA_KEY}: Bearer <token>' (samplers: --token-file or "
                "the HETERORL_TOKEN environment variable)"
            )
        if len(values) > 1:
            return None, "token_invalid", f"{len(values)} '{METADATA_KEY}' metadata entries; send exactly one"
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return None, "token_invalid", f"'{METADATA_KEY}' metadata must be 'Bearer <token>'"
        name = self.tokens.lookup(token.strip())
        if name is None:
            return None, "token_invalid", "token not recognised by this learner"
        return name, "", ""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.open_methods:
            return handler
        principal, reason, message = self._check(handler_call_details.invocation_metadata)
        if principal is None:
            self.refusals.add(reason)

            def refuse(_behaviour):
                def behaviour(_request, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

                return behaviour

            return _rebuild(handler, refuse, parse=False)

        def with_principal(behaviour):
            def authenticated(request, context):
                return behaviour(request, AuthenticatedContext(context, principal))

            return authenticated

        return _rebuild(handler, with_principal)


# ---- the learner's whole security setting ----------------------------------------------------------------------


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


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


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
    def from_config(cls, config, log: Callable[[str], None] = print) -> "ServerSecurity":
        """Read the files a LearnerConfig names; ValueError with the file and the problem if one is unusable."""
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if config.tls_client_ca is not None and config.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        tokens = TokenTable(config.tokens_file, log=log) if config.tokens_file is not None else None
        if tokens is not None and tokens.world_readable():
            log(f"warning: tokens file {config.tokens_file} is readable by other users (chmod 600 it)")
        return cls(
            tokens=tokens,
            tls_cert=_read_pem(config.tls_cert, "TLS certificate"),
            tls_key=_read_pem(config.tls_key, "TLS key"),
            tls_client_ca=_read_pem(config.tls_client_ca, "client CA"),
            insecure=config.insecure,
            limits=RateLimits(
                config.rate_calls_per_s, config.rate_calls_burst, config.rate_groups_per_s, config.rate_groups_burst
            ),
        )

    @property
    def authenticates(self) -> bool:
        return self.tokens is not None or self.tls_client_ca is not None

    def describe(self) -> str:
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


# ---- helpers for operators and tests ---------------------------------------------------------------------------


def append_token(path: Path, name: str) -> str:
    """Add `name:<fresh token>` to a tokens file (created with mode 600); returns the token."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"a name must be 1..64 characters of A-Z a-z 0-9 . _ -, got {name!r}")
    path = Path(path)
    existing = path.read_text() if path.exists() else ""
    if existing.strip():
        parse_tokens(existing + f"\n{name}:{'x' * 16}", f"tokens file {path}")  # refuses a name already used
    token = generate_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(("" if not existing or existing.endswith("\n") else "\n") + f"{name}:{token}\n")
    return token


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway certificate authority and the certificates it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def write_pki(directory: Path, server_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
              client_name: str = "sampler", days: int = 2) -> Pki:
    """A throwaway CA, a server certificate for `server_names` and a client certificate, with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to write certificates; install openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        result = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
        "-subj", "/CN=heterorl throwaway CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in server_names)
    leaves = {"server": (server_names[0], f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
              "client": (client_name, f"subjectAltName=DNS:{client_name}\nextendedKeyUsage=clientAuth\n")}
    for leaf, (common_name, extensions) in leaves.items():
        (d / f"{leaf}.ext").write_text("basicConstraints=CA:FALSE\n" + extensions)
        run("req", *key, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN={common_name}")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{leaf}.pem", "-days", str(days), "-extfile", f"{leaf}.ext")
    for name in ("ca.key", "server.key", "client.key"):
        (d / name).chmod(0o600)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heterorl.server.auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new-token", help="append NAME:<fresh token> to a tokens file (mode 600)")
    p.add_argument("name")
    p.add_argument("--out", type=Path, required=True, help="tokens file of the learner")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the file already holds tokens")
    p = sub.add_parser("pki", help="write a throwaway CA, server and client certificates into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--server-name", action="append", default=None,
                   help="DNS name or IP of the learner (repeatable; default: localhost and 127.0.0.1)")
    p.add_argument("--client-name", default="sampler")
    args = parser.parse_args(argv)
    try:
        if args.command == "new-token":
            if args.if_missing and args.out.exists() and args.out.read_text().strip():
                print(f"{args.out} already holds tokens; left as it is")
                return 0
            append_token(args.out, args.name)
            print(f"added a token named {args.name!r} to {args.out}; give that line to the sampler as its --token-file")
        else:
            pki = write_pki(args.dir, tuple(args.server_name or ("localhost", "127.0.0.1")), args.client_name)
            print(f"wrote CA {pki.ca}, server {pki.server_cert} / {pki.server_key}, "
                  f"client {pki.client_cert} / {pki.client_key}")
    except (ValueError, RuntimeError, OSError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
