"""Operator tool for a learner's credentials: mint sampler tokens, write a throwaway PKI for TLS.

Not part of either daemon: `heterorl new-token NAME --out FILE` appends `NAME:<fresh token>` to the learner's
tokens file (mode 600; give that line to the sampler as its --token-file); `heterorl pki DIR` writes a throwaway
certificate authority with a server and a client certificate, using the openssl command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from heterorl.common.contract import NAME_RE


def generate_token() -> str:
    """A fresh 256-bit token."""
    return secrets.token_urlsafe(32)


def append_token(path: Path, name: str) -> str:
    """Add `name:<fresh token>` to a tokens file (created with mode 600); returns the token."""
    from heterorl.server.tokens import parse_tokens  # the learner's own reader judges the file

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

    @classmethod
    def at(cls, directory: Path) -> "Pki":
        """The paths `write_pki` writes into `directory`."""
        d = Path(directory)
        return cls(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


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
    return Pki.at(d)


# ---- the `heterorl new-token` and `heterorl pki` subcommands ----------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `new-token` and `pki` to the `heterorl` command's subcommands."""
    p = sub.add_parser("new-token", help="append NAME:<fresh token> to a learner's tokens file (mode 600)")
    p.add_argument("name")
    p.add_argument("--out", type=Path, required=True, help="tokens file of the learner")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the file already holds tokens")
    p.set_defaults(func=cmd_new_token)
    p = sub.add_parser("pki", help="write a throwaway CA, server and client certificates into DIR (openssl)")
    p.add_argument("dir", type=Path)
    p.add_argument("--server-name", action="append", default=None,
                   help="DNS name or IP of the learner (repeatable; default: localhost and 127.0.0.1)")
    p.add_argument("--client-name", default="sampler")
    p.set_defaults(func=cmd_pki)


def cmd_new_token(args: argparse.Namespace) -> int:
    if args.if_missing and args.out.exists() and args.out.read_text().strip():
        print(f"{args.out} already holds tokens; left as it is")
        return 0
    try:
        append_token(args.out, args.name)
    except (ValueError, OSError) as err:
        print(f"heterorl new-token: {err}", file=sys.stderr)
        return 2
    print(f"added a token named {args.name!r} to {args.out}; give that line to the sampler as its --token-file")
    return 0


def cmd_pki(args: argparse.Namespace) -> int:
    try:
        pki = write_pki(args.dir, tuple(args.server_name or ("localhost", "127.0.0.1")), args.client_name)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"heterorl pki: {err}", file=sys.stderr)
        return 2
    print(f"wrote CA {pki.ca}, server {pki.server_cert} / {pki.server_key}, "
          f"client {pki.client_cert} / {pki.client_key}")
    return 0
