"""The run's reward function, contained: user code may raise, hang or crash without taking the learner along.

Built-in rewards (by name, `heterorl.common.tasks.REWARDS`) are ours and fast: they run inline, and an exception
or a value that is not a finite number refuses the group. A custom `module:function` reward runs in a small pool of
worker processes (spawn context; each worker imports the function once): the learner never imports the module
itself, a call that runs past `timeout_s` is refused and its worker killed and replaced, and a worker that dies
(a crash, `os._exit` in user code) is replaced too. Either way the caller gets `Refused` with
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
from heterorl.common.tasks import REWARDS, get_reward
from heterorl.server.errors import Refused

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a worker's import of the reward module


def _serve(name: str, conn: Connection) -> None:
    """A worker process: import the reward once, then score batches until the pipe closes."""
    try:
        fn = get_reward(name)
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


class Scorer:
    """Scores completions with the run's reward; every failure is a `Refused`, counted in `counts`."""

    def __init__(self, name: str, timeout_s: float, workers: int = 2):
        self.name = name
        self.timeout_s = timeout_s
        self.counts = RewardCounts()
        self._lock = threading.Lock()
        if name in REWARDS:
            self._inline, self._pool = REWARDS[name], None
        else:
            get_reward_path_checked(name)
            self._inline, self._pool = None, _Pool(name, workers)

    def _score(self, texts: list[str], answer: str) -> list[float]:
        if self._pool is not None:
            return _finite(self._pool.call(texts, answer, self.timeout_s), self.name)
        try:
            values = [self._inline(text, answer) for text in texts]
        except Exception as err:  # noqa: BLE001 - contained: this group is refused
            raise _failed(f"the run's reward {self.name!r} raised {type(err).__name__}: {err}") from None
        return _finite(values, self.name)

    def score(self, texts: list[str], answer: str) -> list[float]:
        """The reward of each text against `answer`; Refused (REWARD_FAILED / REWARD_TIMEOUT) when it fails."""
        try:
            return self._score(texts, answer)
        except Refused as refused:
            with self._lock:
                if refused.reason is Reason.REWARD_TIMEOUT:
                    self.counts.refused_timeout += 1
                else:
                    self.counts.refused_failed += 1
            raise

    def score_or_zero(self, text: str, answer: str) -> float:
        """For evaluation: a reward that fails scores 0 (counted and logged), and the evaluation goes on."""
        try:
            return self._score([text], answer)[0]
        except Refused as err:
            with self._lock:
                self.counts.eval_failures += 1
            logger.warning("evaluation answer scored 0: %s", err)
            return 0.0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def get_reward_path_checked(name: str) -> None:
    """ValueError unless `name` has the form of an import path 'package.module:function' (nothing is imported)."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        get_reward(name)  # raises the registry's own message: unknown name, or a malformed path

