"""What a run remembers about its own progress: the metrics file, and bounded running figures for status.

Per-group history goes to metrics.jsonl (append-only); memory keeps only running aggregates (count, sum and max of
staleness), the last mean reward and the evaluation history (one point per evaluation: small).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses at most the line being written."""

    path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@dataclass
class RunStats:
    staleness_count: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    last_reward_mean: float = math.nan
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy)

    def add_step(self, staleness: list[int], reward_mean: float) -> None:
        self.staleness_count += len(staleness)
        self.staleness_sum += sum(staleness)
        self.staleness_max = max([self.staleness_max, *staleness])
        self.last_reward_mean = reward_mean

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.staleness_count if self.staleness_count else 0.0

    @property
    def last_eval_accuracy(self) -> float:
        return self.eval_history[-1][1] if self.eval_history else -1.0

    def replay(self, lines: str) -> None:
        """Rebuild from the metrics file of a resumed run (the part that survived the rewind)."""
        for line in lines.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "eval":
                self.eval_history.append((record["step"], record["accuracy"]))
            elif record.get("kind") == "train":
                self.add_step(record["staleness"], record["reward_mean"])
