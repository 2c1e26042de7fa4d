"""The one retry policy of every call a sampler makes to its learner.

Samplers run on flaky links: a call that fails with a transient status (the learner is restarting, the link
dropped, a rate limit) is tried again after an exponential backoff with jitter, capped at `max_s`, for at most
`give_up_s` (0: for ever). Calls the learner refused on purpose are not retried. When a refusal carries a reason
(`heterorl.common.contract.Reason`), the reason decides: RATE_LIMITED and LEARNER_STOPPING are worth waiting for,
every other reason is final, whatever its status code. Built on tenacity, so the waits, the clock and the
give-up rule are the library's, written once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc
import tenacity

from heterorl.common.contract import Reason, refusal_reason
from heterorl.common.hints import learner_call_failed

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses worth another try when the learner attached no reason (a transport failure, a proxy, an old learner).
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
# Refusal reasons that mean "later", not "no".
RETRY_REASONS = frozenset({Reason.RATE_LIMITED, Reason.LEARNER_STOPPING})


class Stopped(Exception):
    """The sampler was asked to stop while waiting for the learner."""


def is_transient(err: BaseException) -> bool:
    """Worth retrying: a reason that says so, a transient status with no reason, or no status at all (no
    connection yet)."""
    if not isinstance(err, grpc.RpcError):
        return False
    if not isinstance(err, grpc.Call):
        return True
    reason = refusal_reason(err)
    if reason is not None:
        return reason in RETRY_REASONS
    return err.code() in TRANSIENT


def describe(err: BaseException) -> str:
    """A short account of a failed call for the log."""
    if isinstance(err, grpc.Call):
        reason = refusal_reason(err)
        return f"{err.code().name}{f' ({reason.value})' if reason else ''}: {(err.details() or '')[:300]}"
    return "not connected"


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts: the n-th wait is uniform in [d/2, d] with d = min(max_s, initial_s * 2^(n-1))."""

    initial_s: float = 0.5
    max_s: float = 10.0
    give_up_s: float = 0.0  # 0 = keep trying for ever

    def __post_init__(self) -> None:
        if not (self.initial_s > 0 and self.max_s >= self.initial_s and self.give_up_s >= 0):
            raise ValueError("retry: need initial_s > 0, max_s >= initial_s, give_up_s >= 0")

    def retrying(self, what: str, stop: threading.Event | None = None,
                 retry_on: Callable[[BaseException], bool] = is_transient, where: str = "") -> tenacity.Retrying:
        """A tenacity controller for `what`: retries errors `retry_on` accepts, waits by this policy (a set `stop`
        event ends the wait with `Stopped`), re-raises the last error once `give_up_s` is spent."""
        half_initial, half_max = self.initial_s / 2, self.max_s / 2
        wait = (tenacity.wait_exponential(multiplier=half_initial, max=half_max)
                + tenacity.wait_random_exponential(multiplier=half_initial, max=half_max))
        event = stop or threading.Event()

        def sleep(seconds: float) -> None:
            if event.wait(seconds):
                raise Stopped()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            attempt = state.attempt_number
            if attempt == 1 or attempt % 10 == 0:
                err = state.outcome.exception() if state.outcome else None
                asked = isinstance(err, grpc.Call) and refusal_reason(err) in RETRY_REASONS
                hint = "" if asked or not where or err is None else f"; {learner_call_failed(where, err)}"
                log.warning("%s: learner%s %s (%s); retrying (attempt %d)%s", what, f" at {where}" if where else "",
                            "asks to wait" if asked else "unreachable", describe(err) if err else "?", attempt, hint)

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(retry_on),
            wait=wait,
            stop=tenacity.stop_after_delay(self.give_up_s) if self.give_up_s else tenacity.stop_never,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def call(self, what: str, fn: Callable[[], T], stop: threading.Event | None = None, where: str = "") -> T:
        """fn(), retried by this policy."""
        return self.retrying(what, stop, where=where)(fn)
