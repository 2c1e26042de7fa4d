"""The sampler's settings: a top config of sections, each a TOML table; every setting is also one flat flag.

See heterorl.common.config: `[connection] give_up_s = 30` in a file, `--give-up-s 30` on the command line.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from heterorl.common.config import field as setting
from heterorl.common.config import section
from heterorl.common.contract import MAX_LEASE_BATCH, MAX_NAME_CHARS, TOKEN_ENV
from heterorl.common.logs import LoggingConfig
from heterorl.node.engine_base import check_engine, default_engine
from heterorl.node.engine_factory import check_engine_device
from heterorl.node.lag import LagPolicy
from heterorl.node.retry import RetryPolicy


@dataclass
class SamplerSection:
    """Which learner, who this sampler is, and what it generates with."""

    learner: str = setting("127.0.0.1:50051", "learner address HOST:PORT")
    name: str = setting("", "name shown in `heterorl status` (default: host-pid)")
    engine: str = setting(default_engine(), "generation engine: vllm (the default where it is installed) or transformers")
    device: str = setting("cpu", "device to generate on: cpu, cuda or cuda:N (the transformers engine runs there; "
                                 "vLLM picks its GPUs itself: give cuda and CUDA_VISIBLE_DEVICES)")
    tensor_parallel_size: int = setting(1, "GPUs one vLLM engine spans (vLLM tensor parallelism; engine vllm only)")
    max_batch: int = setting(4, f"prompt groups generated together in one batch (1..{MAX_LEASE_BATCH})")
    threads: int = setting(0, "torch threads (0 = torch default)")
    seed: int = setting(0, "sampling seed")
    cache_dir: Path | None = setting(None, "where model files from the learner are kept (default: heterorl cache)")
    max_groups: int = setting(0, "exit after this many acknowledged groups (0 = run until stopped)")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{socket.gethostname()}-{os.getpid()}"[:MAX_NAME_CHARS]
        check_engine(self.engine)
        check_engine_device(self.engine, self.device, self.tensor_parallel_size)
        if not 1 <= self.max_batch <= MAX_LEASE_BATCH:
            raise ValueError(f"max_batch must be in 1..{MAX_LEASE_BATCH}")
        if ":" not in self.learner:
            raise ValueError(f"learner must be HOST:PORT, got {self.learner!r}")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)


@dataclass
class ConnectionSection:
    """Heartbeats and how long to keep retrying an unreachable learner."""

    heartbeat_s: float = setting(10.0, "seconds between heartbeats")
    retry_max_s: float = setting(10.0, "longest pause between reconnection attempts")
    give_up_s: float = setting(0.0, "exit when the learner stays unreachable this long (0 = never)")

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0:
            raise ValueError("heartbeat_s must be > 0")
        self.retry_policy()  # its checks

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(initial_s=min(0.5, self.retry_max_s), max_s=self.retry_max_s, give_up_s=self.give_up_s)


@dataclass
class LagSection:
    """Deliberate lag, for staleness experiments (heterorl/node/lag.py)."""

    lag_versions: int = setting(0, "lag on purpose: refresh weights only once the learner is this many versions ahead")
    lag_seconds: float = setting(0.0, "lag on purpose: refresh weights only once the held version is this many seconds old")
    lag_dist: str = setting(
        "fixed", "'fixed', or 'lognormal': each refresh draws the lag from the paper's log-normal scaled so its "
        "99.75%% quantile is the lag setting (0.25%% quantile: 1/32 of it)"
    )

    def __post_init__(self) -> None:
        self.lag_policy(seed=0)  # its checks

    def lag_policy(self, seed: int) -> LagPolicy:
        return LagPolicy(versions=self.lag_versions, seconds=self.lag_seconds, dist=self.lag_dist, seed=seed)


@dataclass
class ClientSecuritySection:
    """How the sampler proves itself and verifies the learner (heterorl/node/security.py); a token is never a flag."""

    token_file: Path | None = setting(None, "file holding this sampler's token ('token' or 'name:token'; default: "
                                            f"the {TOKEN_ENV} environment variable)")
    tls_ca: Path | None = setting(None, "PEM CA to verify the learner's certificate with; turns TLS on")
    tls_cert: Path | None = setting(None, "PEM client certificate for mutual TLS (with --tls-key); turns TLS on")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_server_name: str = setting("", "name the learner's certificate carries when it differs from the dialled host; "
                                       "turns TLS on")


@dataclass
class WeightSourcesSection:
    """Relays to download weights from (heterorl/node/relay_sources.py); leases and groups still go to the learner.

    Relays are untrusted: every byte is checked against the learner's own manifest, and the learner's token is
    never sent to a relay (a relay that wants one gets --relay-token-file)."""

    weights_from: list[str] = setting([], "relay addresses HOST:PORT to download weights from, tried in order before "
                                          "the learner; several allowed")
    relay_ban_s: float = setting(60.0, "seconds a relay that sent bad, short or no bytes is skipped")
    relay_stall_s: float = setting(15.0, "a relay stream that delivers nothing for this many seconds is dropped")
    relay_token_file: Path | None = setting(None, "file holding the token relays ask for ('token' or 'name:token'); "
                                                  "never the learner's")
    relay_tls_ca: Path | None = setting(None, "PEM CA to verify relays' certificates with; turns TLS on for relays")

    def __post_init__(self) -> None:
        for address in self.weights_from:
            if ":" not in address:
                raise ValueError(f"weights_from: a relay address must be HOST:PORT, got {address!r}")
        if not self.relay_ban_s >= 0:
            raise ValueError("relay_ban_s must be >= 0")
        if not self.relay_stall_s > 0:
            raise ValueError("relay_stall_s must be > 0")


@dataclass
class ReportSection:
    """A node daemon's Prometheus endpoint (the sampler's heterorl/node/metrics.py, the relay's relay.py)."""

    metrics_port: int = setting(0, "serve Prometheus metrics over HTTP on this port (0 = off)")
    metrics_host: str = setting("127.0.0.1", "address the Prometheus metrics endpoint binds to")

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")


@dataclass
class SamplerConfig:
    sampler: SamplerSection = section(SamplerSection)
    connection: ConnectionSection = section(ConnectionSection)
    lag: LagSection = section(LagSection)
    security: ClientSecuritySection = section(ClientSecuritySection)
    relays: WeightSourcesSection = section(WeightSourcesSection)
    report: ReportSection = section(ReportSection)
    logging: LoggingConfig = section(LoggingConfig)

    def lag_policy(self) -> LagPolicy:
        """The lag policy, seeded with the sampler's seed."""
        return self.lag.lag_policy(seed=self.sampler.seed)
