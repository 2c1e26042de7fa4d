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
    except (ValueError, OSError) as err:  # one line, cause and fix: the usage would bury it
        parser.exit(2, f"{parser.prog}: error: {err}\n")
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
    from heterorl.server import distributed

    if distributed.launched():  # one rank of several, under torchrun
        return main_rank(argv)
    checked = plan(argv)
    if checked.config.train.nproc > 1:  # `--nproc N`: become torchrun with N ranks of this same command line
        if checked.db is not None:
            checked.db.close()
        distributed.relaunch(sys.argv[1:] if argv is None else argv, checked.config.train.nproc)
    config = checked.config
    setup_logging(config.logging.log_level, config.logging.log_format)
    return serve(checked)


def serve(checked, ranks=None) -> int:
    """Rank 0 (or the only rank): load, serve gRPC, train until done or stopped; the exit status."""
    config = checked.config
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
    from heterorl.common.progress import quiet_library_bars
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    quiet_library_bars()  # a log gets progress lines, not the libraries' redrawn bars (heterorl/common/progress.py)

    stop = stop_on_signals("the current step")

    try:
        learner = Learner(checked, ranks=ranks)
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
    ranks_note = f", {ranks.world} ranks" if ranks is not None else ""
    logger.info("serving heterorl.v1.Learner on %s:%d (run %s, dir %s; %s%s)", config.serve.host, port,
                learner.run_id, config.run.run_dir, security.describe(), ranks_note)
    try:
        summary = learner.run(stop)
    finally:
        server.stop(grace=2.0).wait()
        learner.close()
    logger.info("done: %d steps, %d versions, accuracy %.3f -> %.3f; summary in %s", summary["steps"],
                summary["versions_published"], summary["base_accuracy"], summary["final_accuracy"],
                config.run.run_dir / "summary.json")
    return 0


def main_rank(argv: list[str] | None) -> int:
    """One rank of a learner on several processes (heterorl.server.distributed): rank 0 plans the run and serves
    as `serve` does; the others wait for its effective config, load the model and follow its commands."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:  # the same command line on every rank: a bad flag stops them all here, before they connect
        requested = config_lib.build(LearnerConfig, args.config, args)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    setup_logging(requested.logging.log_level, requested.logging.log_format)
    from heterorl.server import distributed

    try:
        ranks = distributed.start(requested.train.device, requested.train.collective_timeout_s)
    except ValueError as err:
        logger.error("stopping: %s", err)
        return 2
    try:
        if not ranks.leader:
            return follow(ranks)
        checked = plan(argv)
        from heterorl.common.model import resolve_model

        resolve_model(checked.config.run.model)  # built or checked once, before the other ranks load it
        ranks.announce("config", checked.config)
        return serve(checked, ranks)
    except distributed.RankFailure as err:
        logger.error("stopping: %s", err)
        # The run database and the server are closed by now. A collective that timed out leaves gloo's worker
        # thread waiting on the hung peer, and the interpreter would wait for that thread at exit: leave at once.
        logging.shutdown()
        os._exit(1)
    finally:
        distributed.finish(ranks)


def follow(ranks) -> int:
    """Ranks > 0: build the same sharded trainer as rank 0 and carry out its commands until it stops."""
    import signal

    from heterorl.server import bootstrap, distributed
    from heterorl.server.learner import trainer_config
    from heterorl.server.trainer import Trainer

    def on_signal(signum, _frame) -> None:  # rank 0 decides when to stop, and needs this rank until then
        logger.info("rank %d: received signal %d; rank 0 decides when the ranks stop", ranks.rank, signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        command, config = ranks.receive()
    except RuntimeError as err:
        logger.error("rank %d: lost rank 0 before the run started (%s)", ranks.rank, err)
        return 1
    if command != "config":  # rank 0 stopped before the run started
        return 0
    inputs = bootstrap.load(config)
    trainer = Trainer(inputs.model, inputs.pad_id, trainer_config(config), ranks=ranks)
    return distributed.follow(trainer, ranks)


if __name__ == "__main__":
    sys.exit(main())
