"""`heterorl-learner`: serve prompts and weights over gRPC and train on the groups samplers send back."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path

from heterorl.common import config as config_lib
from heterorl.server.config import LearnerConfig


def parse_config(argv: list[str] | None = None) -> LearnerConfig:
    """Flags and `--config FILE.toml`; with `--resume RUN_DIR` the run's stored config, with what was set now on top."""
    parser = argparse.ArgumentParser(
        prog="heterorl-learner",
        description="The heterorl learner: owns the optimizer, leases prompts, publishes weight versions.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with any of the settings below")
    config_lib.add_flags(parser, LearnerConfig)
    args = parser.parse_args(argv)
    try:
        config = config_lib.build(LearnerConfig, args.config, args)
        if config.resume is None and config.resume_existing:
            from heterorl.server.db import DB_NAME

            if (config.run_dir / DB_NAME).exists():
                config.resume = config.run_dir
        if config.resume is not None:
            from heterorl.server.checkpoint import resume_config
            from heterorl.server.db import DB_NAME, RunDB

            explicit = {k for k, v in vars(args).items() if v is not None and k != "config"}
            if args.config is not None:
                with open(args.config, "rb") as fh:
                    explicit |= set(tomllib.load(fh))
            db_path = Path(config.resume) / DB_NAME
            if not db_path.exists():
                raise ValueError(f"--resume {config.resume}: there is no run to resume ({DB_NAME} is missing)")
            db = RunDB.open(db_path, config.db_sync)
            try:
                stored = db.load().config
            finally:
                db.close()
            config = resume_config(stored, config, explicit)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return config


def log(message: str) -> None:
    print(f"[learner {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    from heterorl.server.auth import ServerSecurity

    # Credentials and the bind policy are checked before the model is loaded, so a refusal is immediate.
    try:
        security = ServerSecurity.from_config(config, log=log)
        security.check_bind(config.host)
    except ValueError as err:
        print(f"heterorl-learner: error: {err}", file=sys.stderr)
        return 2
    # Imported late so `--help` answers without loading torch.
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"received signal {signum}; finishing the current step and stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        learner = Learner(config, log=log)
    except ValueError as err:  # a wrong run directory, or a checkpoint that does not match its database
        print(f"heterorl-learner: error: {err}", file=sys.stderr)
        return 2
    server, port = build_server(learner, config.host, config.port, security=security)
    server.start()
    address = config.run_dir / "learner.json"
    address.with_suffix(".json.tmp").write_text(
        json.dumps({"host": config.host, "port": port, "pid": os.getpid(), "run_id": learner.run_id})
    )
    address.with_suffix(".json.tmp").rename(address)  # readers never see half a file
    log(f"serving heterorl.v1.Learner on {config.host}:{port} (run {learner.run_id}, dir {config.run_dir}; "
        f"{security.describe()})")
    try:
        summary = learner.run(stop)
    finally:
        server.stop(grace=2.0).wait()
        learner.close()
    log(
        f"done: {summary['steps']} steps, {summary['versions_published']} versions, accuracy "
        f"{summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f}; summary in "
        f"{config.run_dir / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
