"""The one exception the learner's modules raise to refuse a request; the service turns it into a gRPC status."""

from __future__ import annotations

import grpc

from heterorl.common.contract import Reason


class Refused(Exception):
    """A request the learner will not carry out: the gRPC status to answer with, a message naming the field and
    the limit (or what to do next), and the machine-readable reason it travels and is counted under."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason, **metadata: str):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.metadata = metadata
