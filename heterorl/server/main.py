"""`heterorl-learner`: serve prompts and weights over gRPC and train on the groups samplers send back."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from heterorl.common import config as config_lib
from heterorl.common.logs import setup_logging, stop_on_signals
from heterorl.server.config import LearnerConfig

logger = logging.getLogger("heterorl.server")


def _parser() -> argparse.ArgumentParser:
    return config_lib.argument_parser(
        LearnerConfig, "heterorl-learner",
        "The heterorl learner: owns the optimizer, leases prompts, publishes weight versions.",
    )


def plan(argv: list[str] | None = None):
    """Flags and `--config FILE.toml`, checked against RUN_DIR (heterorl.server.resume.plan_run): with `--resume`
    the run's stored config with what was set now on top. Exits with a message on a bad setting or directory;
    with `--print-config`, prints that effective config as TOML and exits."""
    parser = _parser()
    args = parser.parse_args(argv)
    from heterorl.server.resume import plan_run

    try:
        requested = config_lib.build(LearnerConfig, args.config, args)
        explicit = config_lib.explicit_settings(LearnerConfig, args.config, args)
        checked = plan_run(requested, explicit)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.print_config:
        if checked.db is not None:
            checked.db.close()
        print(config_lib.to_toml(checked.config), end="", flush=True)
        parser.exit(0)
    return checked


def parse_config(argv: list[str] | None = None) -> LearnerConfig:
    """The effective config of a command line (the run database it may open is closed again)."""
    checked = plan(argv)
    if checked.db is not None:
        checked.db.close()
    return checked.config


def main(argv: list[str] | None = None) -> int:
    checked = plan(argv)
    config = checked.config
    setup_logging(config.logging.log_level, config.logging.log_format)
    from heterorl.server.security import ServerSecurity

    # Credentials and the bind policy are checked before the model is loaded, so a refusal is immediate.
    try:
        security = ServerSecurity.from_config(config.security)
        security.check_bind(config.serve.host)
    except ValueError as err:
        if checked.db is not None:
            checked.db.close()
        logger.error("stopping: %s", err)
        return 2
    # Imported late so `--help` answers without loading torch.
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    stop = stop_on_signals("the current step")

    try:
        learner = Learner(checked)
    except ValueError as err:  # a reward that cannot load, or a checkpoint that does not match its database
        logger.error("stopping: %s", err)
        return 2
    server, port = build_server(learner, config.serve.host, config.serve.port, security=security)
    server.start()
    address = config.run.run_dir / "learner.json"
    address.with_suffix(".json.tmp").write_text(
        json.dumps({"host": config.serve.host, "port": port, "pid": os.getpid(), "run_id": learner.run_id})
    )
    address.with_suffix(".json.tmp").rename(address)  # readers never see half a file
    logger.info("serving heterorl.v1.Learner on %s:%d (run %s, dir %s; %s)", config.serve.host, port, learner.run_id,
                config.run.run_dir, security.describe())
    try:
        summary = learner.run(stop)
    finally:
        server.stop(grace=2.0).wait()
        learner.close()
    logger.info("done: %d steps, %d versions, accuracy %.3f -> %.3f; summary in %s", summary["steps"],
                summary["versions_published"], summary["base_accuracy"], summary["final_accuracy"],
                config.run.run_dir / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
