"""Experiment tracking: every number of metrics.jsonl, per step, to TensorBoard and/or Weights & Biases.

`--report-to tensorboard,wandb` (a list; `none` or nothing: metrics.jsonl only), as `report_to` in TRL and
transformers. Each record of metrics.jsonl becomes scalars tagged `<kind>/<key>` (`train/loss`,
`eval/accuracy`) at its `step`; lists, strings and the bookkeeping keys are left out. TensorBoard event files go
under RUN_DIR/tensorboard through torch's `SummaryWriter`; W&B runs offline under RUN_DIR/wandb unless
WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later). A missing package is a
ValueError naming the extra to install, raised when the learner starts.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'heterorl[report]'"
NOT_SCALARS = frozenset({"kind", "step", "time"})  # the step is the x axis; wall time is each event's own


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers as `<kind>/<key>` tags; NaN and infinities are kept (both tools plot them as gaps)."""
    kind = record.get("kind", "metrics")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Reporter(Protocol):
    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(f"--report-to tensorboard needs the tensorboard package: {EXTRA_HINT} "
                             "(or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)
        self.log_dir = log_dir

    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"--report-to wandb needs the wandb package: {EXTRA_HINT} (or pip install wandb)") from None
        directory = run_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")  # no network assumed; WANDB_MODE=online streams instead
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "heterorl"), name=run_id, dir=str(run_dir),
                              mode=mode, config=config, reinit="finish_previous")

    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None:
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Reports:
    """The reporters a run asked for; `write` takes each metrics.jsonl record as the loop writes it."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    @classmethod
    def open(cls, targets: list[str], run_dir: Path, run_id: str, config: dict[str, Any]) -> Reports:
        reporters: list[Reporter] = []
        try:
            for target in dict.fromkeys(targets):  # each once, in the order given
                if target == "tensorboard":
                    reporters.append(TensorBoardReporter(run_dir / "tensorboard"))
                elif target == "wandb":
                    reporters.append(WandbReporter(run_dir, run_id, config))
                elif target != "none":
                    raise ValueError(f"report_to: unknown target {target!r}")
        except BaseException:
            for reporter in reporters:
                reporter.close()
            raise
        if reporters:
            logger.info("reporting metrics to %s", ", ".join(t for t in dict.fromkeys(targets) if t != "none"))
        return cls(reporters)

    def write(self, record: dict) -> None:
        if not self.reporters:
            return
        values = scalars(record)
        step = int(record.get("step", 0))
        for reporter in self.reporters:
            try:
                reporter.write(step, values, record.get("time"))
            except Exception:  # noqa: BLE001 - a tracking tool must never stop training
                logger.exception("reporting step %d to %s failed", step, type(reporter).__name__)

    def close(self) -> None:
        for reporter in self.reporters:
            try:
                reporter.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing %s failed", type(reporter).__name__)
        self.reporters = []
