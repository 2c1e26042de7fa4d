"""The sampler's one retry policy: what it retries (transient statuses, and the reasons that mean "later"), how
long it waits, when it gives up, and that a stop request ends a wait."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from heterorl.common.contract import Reason, error_status
from heterorl.node.retry import RetryPolicy, Stopped, is_transient


class FailedCall(grpc.RpcError, grpc.Call):
    """A failed call as the client library raises it, with or without a refusal reason in its trailers."""

    def __init__(self, code: grpc.StatusCode, reason: Reason | None = None):
        status = error_status(code, "refused", reason) if reason else None
        self._code, self._details = code, "refused"
        self._trailers = tuple(status.trailing_metadata) if status else ()

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


@pytest.mark.parametrize("code,reason,transient", [
    (grpc.StatusCode.UNAVAILABLE, None, True),  # a dropped link, a restarting learner
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, True),
    (grpc.StatusCode.UNAVAILABLE, Reason.LEARNER_STOPPING, True),
    (grpc.StatusCode.INVALID_ARGUMENT, None, False),
    (grpc.StatusCode.NOT_FOUND, Reason.UNKNOWN_SAMPLER, False),
    # The reason decides over the status code: a refusal is final whatever code carries it.
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.MESSAGE_SIZE, False),
    (grpc.StatusCode.UNAVAILABLE, Reason.LEASE_RELEASED, False),
])
def test_what_is_retried(code, reason, transient):
    assert is_transient(FailedCall(code, reason)) is transient


def test_transient_failures_are_retried_until_they_pass():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise FailedCall(grpc.StatusCode.UNAVAILABLE)
        return "done"

    assert RetryPolicy(initial_s=0.02, max_s=0.04).call("test", flaky) == "done"
    waits = [b - a for a, b in zip(calls, calls[1:])]
    assert len(waits) == 3
    assert 0.01 <= waits[0] and all(w < 0.5 for w in waits)  # at least half the first backoff, capped


def test_a_refusal_is_not_retried():
    calls = []

    def refused():
        calls.append(1)
        raise FailedCall(grpc.StatusCode.FAILED_PRECONDITION, Reason.REWARD_FAILED)

    with pytest.raises(grpc.RpcError):
        RetryPolicy(initial_s=0.01, max_s=0.02).call("test", refused)
    assert len(calls) == 1


def test_it_gives_up_after_give_up_s_with_the_last_error():
    calls = []

    def down():
        calls.append(1)
        raise FailedCall(grpc.StatusCode.UNAVAILABLE)

    started = time.monotonic()
    with pytest.raises(FailedCall):
        RetryPolicy(initial_s=0.01, max_s=0.02, give_up_s=0.3).call("test", down)
    assert 0.3 <= time.monotonic() - started < 2.0 and len(calls) > 5


def test_a_stop_request_ends_the_wait():
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        RetryPolicy(initial_s=5.0, max_s=5.0).call("test", lambda: (_ for _ in ()).throw(
            FailedCall(grpc.StatusCode.UNAVAILABLE)), stop=stop)
    assert time.monotonic() - started < 2.0
