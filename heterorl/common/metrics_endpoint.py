"""The /metrics HTTP endpoint both daemons serve their Prometheus registry on (`--metrics-port`)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serving and closing `self.registry` over HTTP; the learner's and the sampler's metrics derive from it."""

    registry: CollectorRegistry
    _http = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a daemon thread; returns the port. ValueError when it cannot bind."""
        try:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ValueError(f"cannot serve Prometheus metrics on {host}:{port} ({err.strerror or err}): pick "
                             f"another --metrics-port, or 0 to turn the endpoint off") from None
        bound = self._http.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
