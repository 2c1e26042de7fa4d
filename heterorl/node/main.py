"""`heterorl-sampler`: generate and score completions for a learner, from its address alone.

Exit codes: 0 stopped (signal, --max-groups, or the learner unreachable past --give-up-s); 1 the learner refused
a call this sampler cannot recover from; 2 bad settings or a run this sampler cannot serve (e.g. its weights'
dtype); 3 the learner refused this sampler's credentials.
"""

from __future__ import annotations

import logging
import sys

import grpc

from heterorl.common import config as config_lib
from heterorl.common.logs import setup_logging, stop_on_signals
from heterorl.node.config import SamplerConfig

log = logging.getLogger("heterorl.node")


def parse_config(argv: list[str] | None = None) -> SamplerConfig:
    return config_lib.parse(
        SamplerConfig, "heterorl-sampler",
        "A heterorl sampler: pulls weights from a learner, generates, scores, streams groups back.", argv,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config.logging.log_level, config.logging.log_format)
    from heterorl.common.progress import quiet_library_bars

    quiet_library_bars()  # a log gets progress lines, not the libraries' redrawn bars (heterorl/common/progress.py)
    import torch

    from heterorl.common.contract import refusal_reason
    from heterorl.node.client import AuthenticationFailed
    from heterorl.node.sampler import Sampler, UnsupportedRun

    if config.sampler.threads:
        torch.set_num_threads(config.sampler.threads)

    stop = stop_on_signals("the current batch")
    try:
        sampler = Sampler(config, stop)
    except ValueError as err:  # an unreadable or malformed token, certificate or key file
        log.error("stopping: %s", err)
        return 2
    try:
        stats = sampler.run()
    except AuthenticationFailed as err:
        log.error("stopping: %s; give a token listed in the learner's --tokens-file with --token-file FILE or "
                  "HETERORL_TOKEN (`heterorl new-token NAME --out FILE` on the learner's machine adds one)", err)
        return 3
    except UnsupportedRun as err:
        log.error("stopping: %s", err)
        return 2
    except grpc.RpcError as err:
        reason = refusal_reason(err)
        if reason is None:  # no heterorl refusal: a wrong address or another server (heterorl/common/hints.py)
            from heterorl.common.hints import learner_call_failed

            log.error("stopping: %s", learner_call_failed(config.sampler.learner, err))
            return 1
        code = err.code().name if isinstance(err, grpc.Call) else "no status"
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        log.error("stopping: the learner refused (%s, %s): %s", code, reason.value if reason else "no reason", details)
        return 1
    log.info(
        "stopped: %d groups acknowledged, %d refused, %d versions loaded, %d tokens generated",
        stats.groups_acked, stats.groups_refused, stats.versions_loaded, stats.tokens_generated,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
