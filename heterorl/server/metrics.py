"""The learner's Prometheus metrics: one registry per `Learner`, served over HTTP with `--metrics-port`.

Two kinds of figures. What the training loop produces (step, loss, reward, importance weights, KL, staleness,
step/publish/eval/checkpoint times) is pushed by the loop's hooks once per step. What the learner already counts
(groups accepted, trained, pending and dropped; leases; refusals by reason; samplers) is read from those counts
when Prometheus scrapes, so the gRPC hot paths carry no metric code at all, except one counter increment per
weight chunk served. Names follow Prometheus conventions: the `heterorl_` prefix, units in names (`_seconds`,
`_bytes`, `_versions`, `_ratio`), `_total` on counters, the refusal `reason` label taking `Reason` values.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heterorl.common.metrics_endpoint import MetricsEndpoint
from heterorl.common.contract import Reason
from heterorl.server.leases import LeaseState

if TYPE_CHECKING:
    from heterorl.server.learner import Learner
    from heterorl.server.ratelimit import Refusals


STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Loss evidence of one step (heterorl/server/losses.py, trainer.py): record key -> (metric name, help).
STEP_GAUGES = {
    "loss": ("heterorl_train_loss", "policy loss of the last optimizer step"),
    "reward_mean": ("heterorl_train_reward_mean", "mean reward of the last step's completions"),
    "accuracy": ("heterorl_train_accuracy_ratio", "share of the last step's completions with reward >= 1"),
    "is_weight_mean": ("heterorl_importance_weight_mean", "mean importance weight of the last step"),
    "is_weight_var": ("heterorl_importance_weight_variance", "variance of the importance weights of the last step"),
    "is_weight_max": ("heterorl_importance_weight_max", "largest importance weight of the last step"),
    "clip_frac_low": ("heterorl_clip_low_ratio", "share of tokens clipped below in the last step"),
    "clip_frac_high": ("heterorl_clip_high_ratio", "share of tokens clipped above in the last step"),
    "kl_k3": ("heterorl_kl_k3", "k3 estimate of KL(behaviour || current) in the last step"),
    "grad_norm": ("heterorl_grad_norm", "gradient norm (before clipping) of the last step"),
    "staleness_mean": ("heterorl_train_staleness_mean_versions", "mean staleness of the last step's groups"),
}


class LearnerMetrics(MetricsEndpoint):
    """The learner's Prometheus registry: gauges and histograms set by the loop, counts read at scrape time."""

    def __init__(self, learner: Learner):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("heterorl_learner_step", "optimizer steps taken", registry=r).set_function(lambda: learner.trainer.step)
        Gauge("heterorl_learner_version", "newest published weights version",
              registry=r).set_function(lambda: learner.versions.newest)
        self.gauges = {key: Gauge(name, text, registry=r) for key, (name, text) in STEP_GAUGES.items()}
        self.eval_accuracy = Gauge("heterorl_eval_accuracy_ratio", "held-out accuracy of the last evaluation "
                                   "(greedy)", registry=r)
        self.eval_pass1 = Gauge("heterorl_eval_pass1_ratio", "pass@1 of the last evaluation over --eval-samples "
                                "samples (set when it samples)", registry=r)
        self.eval_step = Gauge("heterorl_eval_step", "step of the last evaluation", registry=r)
        self.staleness = Histogram("heterorl_group_staleness_versions", "versions between the one a trained group "
                                   "was generated with and the one it trained", buckets=STALENESS_BUCKETS, registry=r)
        self.step_seconds = Histogram("heterorl_train_step_seconds", "time of one optimizer step",
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.publish_seconds = Histogram("heterorl_publish_seconds", "time to snapshot, record and encode a new "
                                         "version", buckets=SECONDS_BUCKETS, registry=r)
        self.publish_bytes = Gauge("heterorl_publish_delta_bytes", "size of the newest version's delta from the one "
                                   "before (0: none)", registry=r)
        self.eval_seconds = Histogram("heterorl_eval_seconds", "time of one held-out evaluation",
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.checkpoint_seconds = Histogram("heterorl_checkpoint_seconds", "time to write a train-state checkpoint",
                                            buckets=SECONDS_BUCKETS, registry=r)
        self._served = Counter("heterorl_weights_served_bytes_total", "weight payload bytes sent to samplers",
                               registry=r)
        self.serve_bytes = self._served.inc  # bound once: the per-chunk call is one method call
        self._counts = _LearnerCounts(learner)
        r.register(self._counts)
        self._http = None

    # ---- hooks of the training loop (heterorl/server/loop.py) ----------------------------------------------------

    def trained(self, record: dict) -> None:
        """One optimizer step's record (the `train` line of metrics.jsonl)."""
        for key, gauge in self.gauges.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(value)
        for staleness in record.get("staleness", ()):
            self.staleness.observe(staleness)
        if "train_seconds" in record:
            self.step_seconds.observe(record["train_seconds"])

    def published(self, seconds: float, delta_bytes: int) -> None:
        self.publish_seconds.observe(seconds)
        self.publish_bytes.set(delta_bytes)

    def evaluated(self, record: dict) -> None:
        """One evaluation's record (the `eval` line of metrics.jsonl)."""
        self.eval_step.set(record["step"])
        if math.isfinite(record["accuracy"]):
            self.eval_accuracy.set(record["accuracy"])
        pass1 = record.get("pass1")
        if isinstance(pass1, (int, float)) and math.isfinite(pass1):
            self.eval_pass1.set(pass1)
        self.eval_seconds.observe(record["seconds"])

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    # ---- wiring ---------------------------------------------------------------------------------------------------

    def watch_refusals(self, refusals: Refusals) -> None:
        """Expose the gRPC service's learner-wide refusal counts (heterorl/server/ratelimit.py) by reason."""
        self._counts.refusals = refusals


class _LearnerCounts(Collector):
    """Counts the learner keeps anyway, read under its lock when Prometheus scrapes (nothing on the hot path)."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.refusals: Refusals | None = None

    def describe(self) -> list[Metric]:
        return list(self._families(described=True))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(described=False)

    def _families(self, described: bool) -> Iterator[Metric]:
        if described:  # names only: the registry checks for clashes without touching the learner
            leases = {s.value: 0 for s in LeaseState}
            accepted = pending = samplers = alive = refused_reward = 0
        else:
            learner = self.learner
            with learner.lock:
                leases = learner.leases.counts()
                accepted = learner.registry.total_accepted()
                pending = len(learner.store)
                views = learner.registry.views(learner.trust.samplers, time.time())
            samplers, alive = len(views), sum(v.alive for v in views)
            refused_reward = learner.scorer.counts.refused
        yield CounterMetricFamily("heterorl_groups_accepted", "trajectory groups accepted (stored for training)",
                                  value=accepted)
        yield CounterMetricFamily("heterorl_groups_trained", "groups trained on", value=leases[LeaseState.TRAINED.value])
        yield GaugeMetricFamily("heterorl_groups_pending", "accepted groups waiting to be trained", value=pending)
        yield CounterMetricFamily("heterorl_groups_dropped_stale", "groups dropped as older than max_staleness",
                                  value=leases[LeaseState.DROPPED.value])
        yield CounterMetricFamily("heterorl_groups_refused_reward", "groups refused because the run's reward "
                                  "failed or ran past its limit", value=refused_reward)
        yield GaugeMetricFamily("heterorl_leases_outstanding", "prompt leases out with samplers",
                                value=leases[LeaseState.OUTSTANDING.value])
        yield CounterMetricFamily("heterorl_leases_expired", "leases that ran past their TTL",
                                  value=leases[LeaseState.EXPIRED.value] + leases[LeaseState.RELEASED.value])
        yield GaugeMetricFamily("heterorl_samplers_registered", "samplers registered with this run", value=samplers)
        yield GaugeMetricFamily("heterorl_samplers_alive", "samplers seen in the last minute", value=alive)
        refused = CounterMetricFamily("heterorl_requests_refused", "calls refused, by reason (all callers)",
                                      labels=["reason"])
        counts = self.refusals.snapshot() if self.refusals is not None and not described else {}
        for reason in Reason:  # every reason, zeros too, so rate() and alerts see a series from the start
            refused.add_metric([reason.value], counts.get(reason.value, 0))
        yield refused
