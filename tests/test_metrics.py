"""Prometheus metrics of a live learner and sampler (real daemons, scraped over HTTP, parsed with
prometheus_client's own parser), and the docker/ monitoring files checked against them."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from heterorl.common.contract import Reason
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint by sample name (`x_total`, `x_bucket`, ...), parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {samples.get(name)}"
    return found[0]


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions, keywords, label
    names (inside braces or by/without lists) nor strings."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        following = expr[match.end():].lstrip()
        if not following.startswith("("):  # a function call
            names.add(match.group())
    return names - {"le", "and", "or", "unless", "bool", "offset"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "heterorl-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _compose_flags(service: str) -> dict[str, str]:
    spec = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    command = spec["services"][service]["command"]
    return dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)


def test_prometheus_config_scrapes_the_compose_services():
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    learner, sampler = _compose_flags("learner"), _compose_flags("sampler")
    assert learner["metrics-host"] == sampler["metrics-host"] == "0.0.0.0"  # reachable from the prometheus container
    assert jobs["heterorl-learner"]["static_configs"][0]["targets"] == [f"learner:{learner['metrics-port']}"]
    (dns,) = jobs["heterorl-sampler"]["dns_sd_configs"]
    gpu_sampler, relay = _compose_flags("sampler-gpu"), _compose_flags("relay")
    assert gpu_sampler["metrics-port"] == sampler["metrics-port"]  # one DNS job finds both kinds of sampler
    assert dns["names"] == ["sampler", "sampler-gpu"] and dns["port"] == int(sampler["metrics-port"])  # every replica
    assert relay["metrics-host"] == "0.0.0.0"
    assert jobs["heterorl-relay"]["static_configs"][0]["targets"] == [f"relay:{relay['metrics-port']}"]


def test_promql_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{job="x"}[5m]))) / b_total > 0'
    ) == {"a_bucket", "b_total"}


@pytest.mark.slow
def test_live_learner_and_sampler_metrics_move(processes, tmp_path):
    learner_port, sampler_port = free_port(), free_port()
    _, target = processes.learner(tmp_path / "run", metrics_port=learner_port)
    processes.sampler("metrics-sampler", target, "--metrics-port", str(sampler_port), "--max-batch", "2")

    deadline = time.time() + 180
    while True:
        learner = scrape(learner_port)  # the step's hooks ran (the step gauge moves before them) and step 2's eval
        if value(learner, "heterorl_train_step_seconds_count") >= 2 and value(learner, "heterorl_eval_seconds_count") >= 2:
            break
        assert time.time() < deadline, "the learner did not reach step 2"
        time.sleep(0.5)
    # A request the learner must refuse: a sampler id it never registered.
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.LearnerStub(channel).Heartbeat(pb.HeartbeatRequest(sampler_id="S-neverregistered", version=1))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    learner, sampler = scrape(learner_port), scrape(sampler_port)
    assert value(learner, "heterorl_learner_step") >= 2
    assert value(learner, "heterorl_learner_version") >= 3  # version 1 plus one per step
    accepted = value(learner, "heterorl_groups_accepted_total")
    assert accepted >= 4 and value(learner, "heterorl_groups_trained_total") >= 4  # 2 groups per step
    assert value(learner, "heterorl_requests_refused_total", reason=Reason.UNKNOWN_SAMPLER.value) >= 1
    assert value(learner, "heterorl_requests_refused_total", reason=Reason.RATE_LIMITED.value) == 0
    assert value(learner, "heterorl_group_staleness_versions_count") >= 4
    assert value(learner, "heterorl_train_step_seconds_count") >= 2
    assert value(learner, "heterorl_publish_seconds_count") >= 3
    assert value(learner, "heterorl_weights_served_bytes_total") > 0
    assert value(learner, "heterorl_eval_seconds_count") >= 2  # at step 0 and step 2
    assert 0 <= value(learner, "heterorl_eval_accuracy_ratio") <= 1
    assert value(learner, "heterorl_train_loss") == value(learner, "heterorl_train_loss")  # set, not NaN
    assert value(learner, "heterorl_importance_weight_mean") > 0
    assert value(learner, "heterorl_samplers_alive") == 1

    assert value(sampler, "heterorl_sampler_groups_acked_total") >= 4
    assert value(sampler, "heterorl_sampler_tokens_generated_total") > 0
    assert value(sampler, "heterorl_sampler_tokens_per_second") > 0
    assert value(sampler, "heterorl_sampler_held_version") >= 1
    assert value(sampler, "heterorl_sampler_versions_loaded_total") >= 1
    assert value(sampler, "heterorl_sampler_download_bytes_total") > 0
    assert value(sampler, "heterorl_sampler_download_seconds_count") >= 1
    assert value(sampler, "heterorl_sampler_generate_seconds_count") >= 2
    assert value(sampler, "heterorl_sampler_submit_seconds_count") >= 2
    assert value(sampler, "heterorl_sampler_retries_total", call="submit") >= 0
    assert value(sampler, "heterorl_sampler_version_lag_versions") >= 0

    # Counters only grow, and they keep growing while the run goes on.
    deadline = time.time() + 120
    while value(scrape(learner_port), "heterorl_groups_accepted_total") <= accepted:
        assert time.time() < deadline, "accepted groups stopped being counted"
        time.sleep(0.5)

    # Every metric the Grafana dashboard queries exists in a live scrape.
    exposed = set(learner) | set(sampler)
    wanted = {name for expr in dashboard_exprs() for name in promql_metric_names(expr)}
    assert wanted and wanted <= exposed, f"the dashboard queries metrics nobody exposes: {sorted(wanted - exposed)}"
    # Prometheus conventions: the prefix, and counters end in _total.
    assert all(name.startswith("heterorl_") for name in exposed if not name.startswith(("python_", "process_")))


def test_retries_are_counted_by_call():
    from heterorl.node.metrics import CountingRetryPolicy

    counted: list[str] = []
    policy = CountingRetryPolicy(initial_s=0.001, max_s=0.002, on_retry=counted.append)
    failures = iter([grpc.RpcError(), grpc.RpcError()])  # no status at all: not connected, transient

    def call():
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "done"

    assert policy.call("model files", call) == "done"
    assert counted == ["model files", "model files"]
