"""Reading TLS material, the same way for every daemon that serves or dials gRPC (learner, relay)."""

from __future__ import annotations

from pathlib import Path


def read_pem(path: Path | None, what: str) -> bytes | None:
    """The bytes of a PEM file, or None without a path; ValueError naming the file when it is unusable."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data
