"""One line that names why a learner did not answer and what to do about it.

gRPC reports a wrong address, a refused token, a TLS mismatch or a port of some other server with a status and a
transport message meant for gRPC developers ("failed to connect to all addresses; last error: ..."). Samplers and
`heterorl status` turn those into the operator's next step with `learner_call_failed`, in one place.
"""

from __future__ import annotations

import grpc

from heterorl.common.contract import TOKEN_ENV, Reason, refusal_reason

_ADDRESS_FIX = ("check --learner HOST:PORT: the learner logs 'serving heterorl.v1.Learner on HOST:PORT' at start "
                "and writes its port to RUN_DIR/learner.json")
_TOKEN_FIX = (f"give a token listed in the learner's --tokens-file with --token-file FILE or {TOKEN_ENV} "
              "(`heterorl new-token NAME --out FILE` on the learner's machine adds one)")


def _has_port(target: str) -> bool:
    host, sep, port = target.rpartition(":")
    return bool(sep) and port.isdigit() and not host.endswith(":")  # "::1" alone is an IPv6 host, not host:port


def learner_call_failed(target: str, err: BaseException) -> str:
    """Cause and fix, in one line, for a call to the learner at `target` that failed with `err`."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() or "") if isinstance(err, grpc.Call) else ""
    text = details.lower()
    reason = refusal_reason(err) if isinstance(err, grpc.Call) else None
    if not _has_port(target) and not target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return f"--learner {target!r} has no port; give HOST:PORT, e.g. 127.0.0.1:50051 ({_ADDRESS_FIX})"
    if code == grpc.StatusCode.UNAUTHENTICATED or reason in (Reason.TOKEN_MISSING, Reason.TOKEN_INVALID):
        missing = reason == Reason.TOKEN_MISSING or text.startswith("no token")
        what = "wants a token and none was sent" if missing else "does not recognise this token"
        return f"the learner at {target} {what} (UNAUTHENTICATED); {_TOKEN_FIX}"
    if "resolv" in text or "domain name not found" in text or "name or service not known" in text:
        host = target.rpartition(":")[0]
        return (f"cannot resolve the host {host!r} of --learner {target}; give a hostname or IP address this "
                f"machine resolves ({_ADDRESS_FIX})")
    if "connection refused" in text:
        return (f"nothing listens at {target} (connection refused): the learner is not running there or uses "
                f"another port; {_ADDRESS_FIX}")
    if "http/2" in text or "http2" in text or "http/1" in text:
        return (f"{target} is not a gRPC server (it answered plain HTTP, e.g. a --metrics-port); {_ADDRESS_FIX}, "
                "its gRPC port, not the metrics port")
    if "ssl" in text or "tls" in text or "handshake" in text:
        return (f"the TLS handshake with {target} failed ({details[:160]}); if the learner has --tls-cert give "
                "this side --tls-ca (its CA), and without TLS on the learner give no TLS flags here")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{target} answers gRPC but is not a heterorl learner (UNIMPLEMENTED); {_ADDRESS_FIX}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code is None and not details):
        return (f"no answer from {target} in time: a wrong host, a firewall, or a learner still loading; "
                f"{_ADDRESS_FIX}, and that this machine can reach it")
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the learner at {target} is unavailable ({details[:160]}); {_ADDRESS_FIX}"
    name = code.name if code is not None else "no status"
    return f"the learner at {target} refused the call ({name}: {details[:200]})"
