"""`heterorl-learner`: serve prompts and weights over gRPC and train on the groups samplers send back."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from heterorl.common import config as config_lib
from heterorl.server.config import LearnerConfig


def parse_config(argv: list[str] | None = None) -> LearnerConfig:
    return config_lib.parse(
        LearnerConfig, "heterorl-learner", "The heterorl learner: owns the optimizer, leases prompts, publishes weight versions.", argv
    )


def log(message: str) -> None:
    print(f"[learner {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    # Imported late so `--help` answers without loading torch.
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"received signal {signum}; finishing the current step and stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    learner = Learner(config, log=log)
    server, port = build_server(learner, config.host, config.port)
    server.start()
    (config.run_dir / "learner.json").write_text(
        json.dumps({"host": config.host, "port": port, "pid": os.getpid(), "run_id": learner.run_id})
    )
    log(f"serving heterorl.v1.Learner on {config.host}:{port} (run {learner.run_id}, dir {config.run_dir})")
    try:
        summary = learner.run(stop)
    finally:
        server.stop(grace=2.0).wait()
    log(
        f"done: {summary['steps']} steps, {summary['versions_published']} versions, accuracy "
        f"{summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f}; summary in "
        f"{config.run_dir / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
