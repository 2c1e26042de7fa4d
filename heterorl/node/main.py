"""`heterorl-sampler`: generate and score completions for a learner, from its address alone."""

from __future__ import annotations

import signal
import sys
import threading
import time

from heterorl.common import config as config_lib
from heterorl.node.sampler import SamplerConfig


def parse_config(argv: list[str] | None = None) -> SamplerConfig:
    return config_lib.parse(
        SamplerConfig, "heterorl-sampler", "A heterorl sampler: pulls weights from a learner, generates, scores, streams groups back.", argv
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    import torch

    from heterorl.node.client import AuthenticationFailed
    from heterorl.node.sampler import Sampler

    if config.threads:
        torch.set_num_threads(config.threads)

    def log(message: str) -> None:
        print(f"[sampler {config.name} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"received signal {signum}; stopping after the current batch")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sampler = Sampler(config, stop, log=log)
    except ValueError as err:  # an unreadable or malformed token, certificate or key file
        print(f"heterorl-sampler: error: {err}", file=sys.stderr)
        return 2
    try:
        stats = sampler.run()
    except AuthenticationFailed as err:
        log(f"stopping: {err}. Check --token-file / HETERORL_TOKEN against the learner's --tokens-file.")
        return 3
    log(
        f"stopped: {stats.groups_acked} groups acknowledged, {stats.groups_refused} refused, "
        f"{stats.versions_loaded} versions loaded, {stats.tokens_generated} tokens generated"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
