"""`heterorl status --watch`: the learner's Status as a live table, redrawn every `--interval` seconds like `top`.

One row per sampler: engine, version held, lag behind the learner, groups accepted and refused, the log-prob
mismatch score (mean |claimed - recomputed| nats per token of the checked groups), and its last call. The
Status reply carries no per-sampler token rate; the header has the learner's step, version, groups per minute
(from the change between two polls) and the last held-out accuracy. Drawn with `rich` where it is installed,
else with plain ANSI clears. Ctrl-C ends it (exit 0); an unreachable learner is shown and polled again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

SAMPLER_COLUMNS = ("sampler", "name", "engine", "version", "lag", "accepted", "refused", "mismatch", "seen", "state")


@dataclass
class Rates:
    """Groups per minute from successive polls of the learner's cumulative counts."""

    _last: tuple[float, int, int] | None = None  # (time, trained, accepted)
    trained_per_min: float | None = None
    accepted_per_min: float | None = None
    _run: str = field(default="")

    def update(self, status, now: float) -> None:
        trained, accepted = status.groups_trained, sum(s.groups_accepted for s in status.samplers)
        if self._last is not None and status.run_id == self._run and now > self._last[0]:
            minutes = (now - self._last[0]) / 60
            self.trained_per_min = (trained - self._last[1]) / minutes
            self.accepted_per_min = (accepted - self._last[2]) / minutes
        self._last, self._run = (now, trained, accepted), status.run_id


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def header_lines(status, rates: Rates, target: str) -> list[str]:
    acc = f"{status.last_eval_accuracy:.3f}" if status.last_eval_accuracy >= 0 else "-"
    reward = f"{status.last_reward_mean:.3f}" if status.last_reward_mean == status.last_reward_mean else "-"
    alive = sum(s.alive for s in status.samplers)
    return [
        f"heterorl learner {target}  run {status.run_id}  task {status.task}  loss {status.loss}  "
        f"up {status.uptime_s:.0f}s",
        f"step {status.step}  version {status.version}  held-out accuracy {acc}  reward {reward}  "
        f"groups/min trained {_rate(rates.trained_per_min)} accepted {_rate(rates.accepted_per_min)}",
        f"groups {status.groups_trained} trained, {status.groups_pending} pending, {status.leases_outstanding} leased "
        f"out, {status.leases_expired} leases expired, {status.groups_dropped_stale} stale  samplers {alive} alive "
        f"of {len(status.samplers)}",
    ]


def sampler_rows(status) -> list[tuple[str, ...]]:
    rows = []
    for s in sorted(status.samplers, key=lambda s: s.name):
        mismatch = f"{s.logprob_mean_diff:.3g} ({s.logprob_checked})" if s.logprob_checked else "-"
        state = "QUARANTINED" if s.quarantined else ("alive" if s.alive else "gone")
        rows.append((s.sampler_id[:12], s.name[:24], s.engine, str(s.version), str(max(0, status.version - s.version)),
                     str(s.groups_accepted), str(s.groups_rejected), mismatch, f"{s.last_seen_s_ago:.0f}s ago", state))
    return rows


def plain_frame(status, rates: Rates, target: str) -> str:
    rows = [SAMPLER_COLUMNS, *sampler_rows(status)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SAMPLER_COLUMNS))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([*header_lines(status, rates, target), "", *table])


def rich_frame(status, rates: Rates, target: str):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=False)
    for column in SAMPLER_COLUMNS:
        table.add_column(column, justify="right" if column in ("version", "lag", "accepted", "refused") else "left")
    for row in sampler_rows(status):
        table.add_row(*row, style="red" if row[-1] != "alive" else None)
    return Group(*(Text(line) for line in header_lines(status, rates, target)), table)


def _has_rich() -> bool:
    try:
        import rich.live  # noqa: F401
    except ImportError:
        return False
    return True


def watch(target: str, interval: float, fetch: Callable[[], object], out=None,
          iterations: int = 0) -> int:
    """Poll `fetch` (the learner's Status) every `interval` seconds and redraw; `iterations` > 0 stops after that
    many frames (tests), 0 runs until Ctrl-C."""
    out = out or sys.stdout
    if not interval > 0:
        print(f"heterorl status: --interval must be > 0, got {interval:g}", file=sys.stderr)
        return 2
    rates = Rates()
    use_rich = _has_rich() and out.isatty()

    def frame():
        try:
            status = fetch()
        except grpc.RpcError as err:
            from heterorl.common.hints import learner_call_failed

            text = (f"heterorl learner {target}: did not answer; retrying every {interval:g}s. "
                    f"{learner_call_failed(target, err)}")
            if use_rich:
                from rich.text import Text

                return Text(text)
            return text
        rates.update(status, time.monotonic())
        return rich_frame(status, rates, target) if use_rich else plain_frame(status, rates, target)

    drawn = 0
    try:
        if use_rich:
            from rich.console import Console
            from rich.live import Live

            with Live(frame(), console=Console(file=out), screen=True, auto_refresh=False) as live:
                drawn = 1
                while not iterations or drawn < iterations:
                    time.sleep(interval)
                    live.update(frame(), refresh=True)
                    drawn += 1
        else:
            while not iterations or drawn < iterations:
                if drawn:
                    time.sleep(interval)
                text = frame()
                out.write(("\x1b[H\x1b[2J" if out.isatty() else "\n") + text + "\n")
                out.flush()
                drawn += 1
    except KeyboardInterrupt:
        pass
    return 0
