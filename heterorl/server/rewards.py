"""The run's reward, contained: user code may raise, hang or crash without taking the learner along.

A run's reward is a weighted list (`heterorl.common.rewards.RewardSpec`, e.g. `math=1,format=0.2`); each
term is scored by itself and the terms are summed. Fast built-in rewards run inline, and an exception or a value
that is not a finite number refuses the group. A custom `module:function` reward, and the built-in `math` (sympy can
run away on a pathological expression, and math-verify's own SIGALRM timeouts cannot work in gRPC threads), run in
a small pool of worker processes (spawn context; each worker imports the function once): the learner never imports
a custom module itself, a call that runs past `timeout_s` is refused and its worker killed and replaced, and a
worker that dies (a crash, `os._exit` in user code) is replaced too. Either way the caller gets `Refused` with
`Reason.REWARD_FAILED` or `Reason.REWARD_TIMEOUT`, and the gRPC worker and the trainer carry on.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import queue
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc

from heterorl.common.contract import Reason
from heterorl.common.rewards import (
    REWARDS,
    RewardFn,
    RewardSpec,
    check_reward_name,
    format_reward,
    get_reward,
    parse_reward_spec,
)
from heterorl.server.errors import Refused

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a worker's import of the reward module
# Built-in rewards that run in worker processes rather than inline (see the module docstring).
POOLED_BUILTINS = frozenset({"math"})


def _serve(name: str, conn: Connection) -> None:
    """A worker process: import the reward once, then score batches until the pipe closes."""
    try:
        fn = get_reward(name)
        if name in POOLED_BUILTINS:
            fn("0", "0")  # its heavy imports now, at start-up, not inside the first group's time limit
    except BaseException as err:  # noqa: BLE001 - reported to the learner, which refuses to start
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            texts, answer = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", [fn(text, answer) for text in texts]))
        except BaseException as err:  # noqa: BLE001 - the learner refuses this group and carries on
            conn.send(("error", f"{type(err).__name__}: {err}"))


def _failed(message: str) -> Refused:
    return Refused(grpc.StatusCode.FAILED_PRECONDITION, message, Reason.REWARD_FAILED)


def _finite(values: list[object], name: str) -> list[float]:
    out = []
    for value in values:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _failed(f"the run's reward {name!r} returned {value!r}, not a number") from None
        if not math.isfinite(number):
            raise _failed(f"the run's reward {name!r} returned {number}, not a finite number")
        out.append(number)
    return out


class _Worker:
    def __init__(self, name: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(name, child), name=f"reward-{name}", daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise ValueError(f"reward {name!r}: its worker did not start within {START_TIMEOUT_S:.0f}s")
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as err:
            kind, detail = "error", f"its worker process died while importing it ({err!r})"
        if kind != "ready":
            self.kill()
            raise ValueError(f"reward {name!r} cannot be loaded: {detail}")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _Pool:
    """Up to `size` workers, started on demand; a worker that overruns or dies is dropped and replaced."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False
        self._release(_Worker(name))  # fails now, at start-up, if the reward cannot be imported
        with self._lock:
            self._started = 1

    def _checkout(self) -> _Worker:
        """An idle worker, or a new one while fewer than `size` run; waits otherwise (a worker dropped meanwhile
        frees a place, so waiting threads look again)."""
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                grow = self._started < self.size
                if grow:
                    self._started += 1
            if grow:
                try:
                    return _Worker(self.name)
                except BaseException:
                    with self._lock:
                        self._started -= 1
                    raise
            try:
                return self._idle.get(timeout=0.2)
            except queue.Empty:
                continue

    def _release(self, worker: _Worker) -> None:
        self._idle.put(worker)

    def _drop(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1

    def call(self, texts: list[str], answer: str, timeout_s: float) -> list[object]:
        if self._closed:
            raise _failed("the learner is stopping")
        try:
            worker = self._checkout()
        except ValueError as err:
            raise _failed(str(err)) from None
        try:
            worker.conn.send((texts, answer))
            if not worker.conn.poll(timeout_s):
                self._drop(worker)
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the run's reward {self.name!r} ran past its limit of {timeout_s:g}s on this group",
                              Reason.REWARD_TIMEOUT)
            kind, detail = worker.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as err:
            self._drop(worker)
            raise _failed(f"the run's reward {self.name!r} crashed its worker process: {err!r}") from None
        self._release(worker)
        if kind != "ok":
            raise _failed(f"the run's reward {self.name!r} raised {detail}")
        return detail

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


@dataclass
class RewardCounts:
    refused_failed: int = 0   # groups refused: the reward raised, crashed or returned no finite number
    refused_timeout: int = 0  # groups refused: the reward ran past its limit
    eval_failures: int = 0    # evaluation answers scored 0 because the reward failed on them

    @property
    def refused(self) -> int:
        return self.refused_failed + self.refused_timeout


@dataclass
class _Term:
    name: str
    weight: float
    inline: RewardFn | None  # None: scored in `pool`
    pool: _Pool | None


class Scorer:
    """Scores completions with the run's weighted rewards; every failure is a `Refused`, counted in `counts`."""

    def __init__(self, spec: RewardSpec | str, timeout_s: float, workers: int = 2):
        self.spec = spec if isinstance(spec, RewardSpec) else parse_reward_spec(spec)
        self.name = self.spec.name
        self.timeout_s = timeout_s
        self.counts = RewardCounts()
        self._lock = threading.Lock()
        self._terms: list[_Term] = []
        try:
            for term in self.spec.terms:
                self._terms.append(self._term(term.name, term.weight, workers))
        except BaseException:
            self.close()
            raise

    def _term(self, name: str, weight: float, workers: int) -> _Term:
        if name == "format":
            return _Term(name, weight, format_reward(self.spec.format_pattern), None)
        if name in REWARDS and name not in POOLED_BUILTINS:
            return _Term(name, weight, REWARDS[name], None)
        check_reward_name(name)
        return _Term(name, weight, None, _Pool(name, workers))

    def _raw(self, term: _Term, texts: list[str], answer: str) -> list[float]:
        """One term's unweighted scores."""
        if term.pool is not None:
            return _finite(term.pool.call(texts, answer, self.timeout_s), term.name)
        try:
            values = [term.inline(text, answer) for text in texts]
        except Exception as err:  # noqa: BLE001 - contained: this group is refused
            raise _failed(f"the run's reward {term.name!r} raised {type(err).__name__}: {err}") from None
        return _finite(values, term.name)

    def _score(self, texts: list[str], answer: str) -> list[float]:
        totals = [0.0] * len(texts)
        for term in self._terms:
            if term.weight == 0.0:
                continue
            for i, value in enumerate(self._raw(term, texts, answer)):
                totals[i] += term.weight * value
        return totals

    def _count(self, refused: Refused) -> None:
        with self._lock:
            if refused.reason is Reason.REWARD_TIMEOUT:
                self.counts.refused_timeout += 1
            else:
                self.counts.refused_failed += 1

    def score(self, texts: list[str], answer: str) -> list[float]:
        """The weighted reward of each text against `answer`; Refused (REWARD_FAILED / REWARD_TIMEOUT) on failure."""
        try:
            return self._score(texts, answer)
        except Refused as refused:
            self._count(refused)
            raise

    def _eval_failed(self, err: Refused) -> None:
        with self._lock:
            self.counts.eval_failures += 1
        logger.warning("evaluation answer scored 0: %s", err)

    def score_or_zero(self, text: str, answer: str) -> float:
        """For evaluation: a reward that fails scores 0 (counted and logged), and the evaluation goes on."""
        try:
            return self._score([text], answer)[0]
        except Refused as err:
            self._eval_failed(err)
            return 0.0

    def correct(self, texts: list[str], answer: str) -> list[bool]:
        """For evaluation: whether each text is right by the first reward (unweighted score >= 1; the others, such as
        a format bonus, do not make an answer right). A reward that fails marks the texts wrong (counted)."""
        try:
            return [value >= 1.0 for value in self._raw(self._terms[0], texts, answer)]
        except Refused as err:
            self._eval_failed(err)
            return [False] * len(texts)

    def close(self) -> None:
        for term in self._terms:
            if term.pool is not None:
                term.pool.close()

