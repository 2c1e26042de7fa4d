"""`heterorl-relay`: fetch each weight version once from a learner (or relay) and serve it to samplers nearby.

    heterorl-relay --upstream LEARNER:50051 [--port 50061] [--keep-versions 4] [--metrics-port 9102]
    heterorl-sampler --learner LEARNER:50051 --weights-from RELAY:50061

Exit codes: 0 stopped by a signal; 2 bad settings (including unreadable token, certificate or key files, or a port
that cannot be bound).
"""

from __future__ import annotations

import logging
import sys

from heterorl.common import config as config_lib
from heterorl.common.logs import setup_logging, stop_on_signals
from heterorl.node.relay import Relay, RelayConfig, build_relay_server

log = logging.getLogger("heterorl.relay")


def parse_config(argv: list[str] | None = None) -> RelayConfig:
    return config_lib.parse(
        RelayConfig, "heterorl-relay",
        "A heterorl weight relay: fetches each version once from its upstream and serves it to samplers. Samplers "
        "verify everything it sends against the learner's own hashes, so it needs no trust.", argv,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(config.logging.log_level, config.logging.log_format)
    stop = stop_on_signals("serving")
    try:
        relay = Relay(config, stop)
        server, port = build_relay_server(relay, config.relay.host, config.relay.port)
        if config.report.metrics_port:
            relay.metrics.serve(config.report.metrics_host, config.report.metrics_port)
    except (ValueError, OSError) as err:
        log.error("stopping: %s", err)
        return 2
    server.start()
    relay.start()
    log.info("relay %s listening on %s:%d, fetching from %s", config.relay.name, config.relay.host, port,
             config.relay.upstream)
    stop.wait()
    server.stop(grace=2).wait()
    relay.close()
    log.info("relay stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
