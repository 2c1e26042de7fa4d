"""The sampler's Prometheus metrics: one registry per `Sampler`, served over HTTP with `--metrics-port`.

Latencies (generation, submission, weight downloads) are observed where they happen, once per batch or per
download; counts the sampler keeps anyway (`SamplerStats`) and its versions are read when Prometheus scrapes.
Retries are counted by call through the one retry policy (`CountingRetryPolicy`). Names follow Prometheus
conventions: `heterorl_sampler_` prefix, units in names, `_total` on counters.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Iterator

import tenacity
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heterorl.common.metrics_endpoint import MetricsEndpoint
from heterorl.common.contract import Reason
from heterorl.node.retry import RetryPolicy, is_transient

if TYPE_CHECKING:
    import threading

    from heterorl.node.sampler import Sampler


SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RETRIED_CALLS = ("connect", "register", "model_files", "lease", "submit", "weights", "weights_manifest")


@dataclasses.dataclass(frozen=True)
class CountingRetryPolicy(RetryPolicy):
    """The sampler's retry policy, counting each retry by the call it retries (`heterorl_sampler_retries_total`)."""

    on_retry: Callable[[str], None] | None = None

    def retrying(self, what: str, stop: threading.Event | None = None,
                 retry_on: Callable[[BaseException], bool] = is_transient, where: str = "") -> tenacity.Retrying:
        controller = super().retrying(what, stop, retry_on, where)
        if self.on_retry is not None:
            logged, count = controller.before_sleep, self.on_retry

            def before_sleep(state: tenacity.RetryCallState) -> None:
                count(what)
                if logged is not None:
                    logged(state)

            controller.before_sleep = before_sleep
        return controller


class SamplerMetrics(MetricsEndpoint):
    def __init__(self, sampler: Sampler):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tokens_per_second = Gauge("heterorl_sampler_tokens_per_second", "completion tokens per second of the "
                                       "last generated batch", registry=r)
        self.generate_seconds = Histogram("heterorl_sampler_generate_seconds", "time to generate one batch of "
                                          "groups", buckets=SECONDS_BUCKETS, registry=r)
        self.submit_seconds = Histogram("heterorl_sampler_submit_seconds", "time until the learner acknowledged "
                                        "(or refused) a batch of groups, retries included", buckets=SECONDS_BUCKETS,
                                        registry=r)
        self.download_seconds = Histogram("heterorl_sampler_download_seconds", "time to download and load one "
                                          "version's weights", buckets=SECONDS_BUCKETS, registry=r)
        self.corrupt_chunks = Counter("heterorl_sampler_corrupt_chunks_total", "weight chunks that failed their "
                                      "hash and were fetched again", registry=r)
        self.reconnects = Counter("heterorl_sampler_download_reconnects_total", "weight streams reopened after a "
                                  "break", registry=r)
        self.retries = Counter("heterorl_sampler_retries_total", "calls to the learner tried again, by call",
                               ["call"], registry=r)
        self.relay_failures = Counter("heterorl_sampler_relay_failures_total", "weight downloads from a relay "
                                      "abandoned, by relay and kind (corrupt, wrong_payload, truncated, stalled, "
                                      "unavailable, ...): the relay is then skipped for --relay-ban-s", ["relay", "kind"],
                                      registry=r)
        self.weight_downloads = Counter("heterorl_sampler_weight_downloads_total", "versions downloaded, by the source "
                                        "that finished the download (a relay's address, or 'learner')", ["source"],
                                        registry=r)
        for call in RETRIED_CALLS:  # a series per call from the start, so rate() sees the first retry
            self.retries.labels(call)
        r.register(_SamplerCounts(sampler))
        self._http = None

    def count_retry(self, what: str) -> None:
        self.retries.labels(what.replace(" ", "_")).inc()

    def relay_failed(self, relay: str, kind: str) -> None:
        self.relay_failures.labels(relay, kind).inc()

    def downloaded_from(self, source: str) -> None:
        self.weight_downloads.labels(source).inc()

    def generated(self, tokens: int, seconds: float) -> None:
        self.generate_seconds.observe(seconds)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def submitted(self, seconds: float) -> None:
        self.submit_seconds.observe(seconds)

    def downloaded(self, seconds: float, corrupt_chunks: int, reconnects: int) -> None:
        self.download_seconds.observe(seconds)
        self.corrupt_chunks.inc(corrupt_chunks)
        self.reconnects.inc(reconnects)


class _SamplerCounts(Collector):
    """`SamplerStats` and the versions, read at scrape time."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def describe(self) -> list[Metric]:
        return list(self._families(described=True))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(described=False)

    def _families(self, described: bool) -> Iterator[Metric]:
        sampler, stats = self.sampler, self.sampler.stats
        session = None if described else sampler.session
        held = session.engine.version if session is not None else 0
        newest = 0 if described else sampler.latest_version
        yield GaugeMetricFamily("heterorl_sampler_held_version", "weights version loaded in the engine", value=held)
        yield GaugeMetricFamily("heterorl_sampler_learner_version", "newest version the learner has announced",
                                value=newest)
        yield GaugeMetricFamily("heterorl_sampler_version_lag_versions", "versions the loaded weights are behind "
                                "the learner's newest", value=max(0, newest - held) if session is not None else 0)
        yield CounterMetricFamily("heterorl_sampler_tokens_generated", "completion tokens generated",
                                  value=stats.tokens_generated)
        yield CounterMetricFamily("heterorl_sampler_groups_generated", "groups generated", value=stats.groups_generated)
        yield CounterMetricFamily("heterorl_sampler_groups_acked", "groups the learner acknowledged",
                                  value=stats.groups_acked)
        refused = CounterMetricFamily("heterorl_sampler_groups_refused", "groups refused by the learner (or void), "
                                      "dropped, by reason", labels=["reason"])
        counts = dict(stats.refusals)
        for reason in [r.value for r in Reason] + sorted(set(counts) - {r.value for r in Reason}):
            refused.add_metric([reason], counts.get(reason, 0))
        yield refused
        yield GaugeMetricFamily("heterorl_sampler_outbox_groups", "generated groups not yet acknowledged",
                                value=len(sampler.outbox))
        yield CounterMetricFamily("heterorl_sampler_versions_loaded", "weight versions loaded",
                                  value=stats.versions_loaded)
        yield CounterMetricFamily("heterorl_sampler_download_bytes", "weight bytes downloaded",
                                  value=stats.weight_bytes)
