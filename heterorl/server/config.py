"""Everything a learner run is configured by: a top config of sections, each a TOML table.

Every setting name is unique across the sections, so each is also one flat flag (`--group-size 4`) and one keyword
of `from_flat(LearnerConfig, group_size=4)` (heterorl.common.config). In TOML a setting lives in its section's
table: `[train] group_size = 4`. Each section checks its own settings; the top config checks what spans two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from heterorl.common.config import field, section
from heterorl.common.logs import LoggingConfig
from heterorl.common.rewards import BOXED_PATTERN, parse_reward_spec
from heterorl.server.losses import LossConfig
from heterorl.server.scheduling import POLICIES
from heterorl.server.precision import COMPUTE_DTYPE_HELP, DEVICE_HELP, check_compute_dtype, check_device_spec
from heterorl.server.trust import TrustConfig


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class RunSection:
    """What the run is: model, task, reward, seed, where it lives and how long it trains."""

    model: str = field("smollm2-135m", "'smollm2-135m', 'tiny', or a local Hugging Face causal-LM directory")
    task: str = field("arithmetic", "'arithmetic', 'jsonl', or 'dataset' (local JSONL/JSON/Parquet/save_to_disk "
                                    "data, see [data])")
    task_path: Path | None = field(None, "the task's data: a JSONL file (task 'jsonl'), or a .jsonl/.json/.parquet "
                                         "file or a datasets save_to_disk directory (task 'dataset')")
    task_options: str = field("", 'task options as a JSON object, e.g. \'{"low": 0, "high": 9}\' for arithmetic')
    reward: str | None = field(None, "reward name or 'module:function', or several summed: 'math,format' "
                                     "(built in: math, format, last_number, exact_match, digit_fraction; default: "
                                     "the task's)")
    reward_weights: list[float] = field([], "weight of each reward in --reward, in order (default: 1 each)")
    format_pattern: str = field(BOXED_PATTERN, "regular expression the 'format' reward looks for (default: an "
                                               "answer in \\boxed{})")
    reward_timeout_s: float = field(10.0, "seconds a 'module:function' reward may take per group before the group "
                                          "is refused (it runs in a worker process that is then replaced)")
    seed: int = field(0, "seed for the prompt stream, model init of 'tiny' and sampling on the learner")
    run_dir: Path = field(Path("runs/learner"), "directory for metrics, checkpoint and summary")
    max_steps: int = field(0, "stop after this many optimizer steps (0 = run until stopped)")
    threads: int = field(0, "torch threads (0 = torch default)")

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.task_path is not None:
            self.task_path = Path(self.task_path)
        _check([
            (self.reward_timeout_s > 0, "reward_timeout_s must be > 0"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
        ])
        self.task_kwargs()
        if self.reward is not None or self.reward_weights:
            self.reward_spec("last_number")  # its checks (the task's default reward is known later)

    def reward_spec(self, task_default: str):
        """The run's weighted reward (heterorl.common.rewards.RewardSpec)."""
        if self.reward is None and len(self.reward_weights) > 1:
            raise ValueError("reward_weights has several values but --reward names no rewards")
        return parse_reward_spec(self.reward or task_default, self.reward_weights or None, self.format_pattern)

    def task_kwargs(self) -> dict:
        """Keyword options of the task: `task_options` (a JSON object) plus `task_path`."""
        try:
            options = json.loads(self.task_options) if self.task_options else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"task_options is not valid JSON: {err}") from None
        if not isinstance(options, dict):
            raise ValueError(f"task_options must be a JSON object, got {self.task_options!r}")
        if self.task_path is not None:
            options["path"] = self.task_path
        return options


@dataclass
class DataSection:
    """How task 'dataset' reads its files (nothing is downloaded), and the system prompt of every task."""

    question_column: str = field("question", "column holding the question (task 'dataset')")
    answer_column: str = field("answer", "column holding the reference answer (task 'dataset')")
    id_column: str | None = field(None, "column naming each problem (default: a hash of the question)")
    eval_path: Path | None = field(None, "held-out problems in a second file (task 'dataset'; else --eval-fraction)")
    eval_fraction: float | None = field(None, "share of the problems held out, chosen by a seeded hash of each "
                                              "problem (default: the task's own, 0.1 for files)")
    data_format: str = field("auto", "auto (by suffix; a directory is save_to_disk), jsonl, json, parquet or arrow")
    data_split: str | None = field(None, "split of a save_to_disk DatasetDict (default: 'train')")
    system_prompt: str | None = field(None, "system message put before every question, in the model's chat template")

    def __post_init__(self) -> None:
        if self.eval_path is not None:
            self.eval_path = Path(self.eval_path)
        _check([
            (self.eval_fraction is None or 0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (self.eval_path is None or not self.eval_fraction, "give eval_path or eval_fraction, not both"),
            (bool(self.question_column) and bool(self.answer_column), "question_column and answer_column must "
                                                                      "not be empty"),
        ])

    def task_kwargs(self, task: str) -> dict:
        """The options of task `task` that these settings give; ValueError for one that applies to 'dataset' only."""
        only_dataset = {"question_column": "question", "answer_column": "answer", "id_column": None,
                        "eval_path": None, "data_format": "auto", "data_split": None}
        options = {key: getattr(self, key) for key in only_dataset}
        if task != "dataset":
            changed = [key for key, value in options.items() if value != only_dataset[key]]
            if changed:
                raise ValueError(f"{', '.join(changed)}: set for task {task!r} but read by task 'dataset' only")
            options = {}
        if self.eval_fraction is not None:
            options["eval_fraction"] = self.eval_fraction
        return options


@dataclass
class ServeSection:
    """Where the learner listens, how long leases last, how many groups may be out, how weights travel."""

    host: str = field("127.0.0.1", "address to bind the gRPC server to")
    port: int = field(50051, "port to bind (0 picks a free one; it is written to RUN_DIR/learner.json)")
    lease_ttl_s: float = field(300.0, "seconds a sampler has to return a leased prompt group (adaptive: the most)")
    lease_policy: str = field("adaptive", "how leases are sized: 'uniform' (what a sampler asks for, each for "
                                          "lease_ttl_s) or 'adaptive' (by each sampler's measured speed and round "
                                          "trip: heterorl/server/scheduling.py)")
    lease_min_ttl_s: float = field(15.0, "adaptive: the shortest expiry a lease gets (at most lease_ttl_s)")
    lease_target_versions: float = field(2.0, "adaptive: a batch of leases should come back within this many "
                                              "published versions")
    lease_refresh_lag: int = field(8, "adaptive: samplers more than this many versions behind are told to load "
                                      "a newer version before generating (0 = never)")
    max_inflight_groups: int = field(0, "most groups leased or waiting to be trained (0 = 3 x groups_per_step)")
    keep_versions: int = field(4, "published versions kept for samplers to fetch")
    chunk_bytes: int = field(2 << 20, "bytes per weight chunk on the wire")

    def __post_init__(self) -> None:
        _check([
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.lease_ttl_s > 0, "lease_ttl_s must be > 0"),
            (self.lease_policy in POLICIES, f"lease_policy must be one of {', '.join(POLICIES)}, got "
                                            f"{self.lease_policy!r}"),
            (self.lease_min_ttl_s > 0, "lease_min_ttl_s must be > 0"),
            (self.lease_target_versions > 0, "lease_target_versions must be > 0"),
            (self.lease_refresh_lag >= 0, "lease_refresh_lag must be >= 0"),
            (self.max_inflight_groups >= 0, "max_inflight_groups must be >= 0"),
            (self.keep_versions >= 1, "keep_versions must be >= 1"),
            (64 << 10 <= self.chunk_bytes <= 3 << 20, "chunk_bytes must be in 64 KiB..3 MiB"),
        ])


@dataclass
class TrainSection:
    """The optimizer and what it trains on: group shape, learning rate, staleness allowed."""

    group_size: int = field(8, "completions per prompt (G)")
    groups_per_step: int = field(4, "prompt groups per optimizer step (B)")
    lr: float = field(4e-6, "AdamW learning rate")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping norm (0 disables)")
    max_staleness: int | None = field(None, "drop (and count) groups more than this many versions old")
    device: str = field("auto", DEVICE_HELP)
    compute_dtype: str = field("auto", COMPUTE_DTYPE_HELP)
    grad_checkpointing: bool = field(False, "recompute activations in backward: less memory, more time")
    micro_batch_tokens: int = field(0, "token budget of one forward/backward (prompt + completion tokens, whole "
                                       "groups each; a bigger group goes alone); 0 = the whole batch at once")
    nproc: int = field(1, "ranks of the learner on this host: heterorl-learner re-launches itself through torchrun "
                          "with this many processes (FSDP2 shards weights, gradients and AdamW state over them); "
                          "under torchrun the launcher decides and this is ignored")
    collective_timeout_s: float = field(600.0, "seconds a collective of a learner with several ranks may wait for "
                                               "another rank before the learner stops (a rank died or hangs)")

    def __post_init__(self) -> None:
        _check([
            (1 <= self.nproc <= 1024, "nproc must be in 1..1024"),
            (self.collective_timeout_s > 0, "collective_timeout_s must be > 0"),
            (1 <= self.group_size <= 256, "group_size must be in 1..256"),
            (1 <= self.groups_per_step <= 4096, "groups_per_step must be in 1..4096"),
            (self.lr > 0, "lr must be > 0"),
            (self.max_staleness is None or self.max_staleness >= 0, "max_staleness must be >= 0"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
        ])
        check_device_spec(self.device)
        check_compute_dtype(self.compute_dtype)


@dataclass
class LossSection:
    """The policy loss (heterorl/server/losses.py) and its hyper-parameters."""

    loss: str = field("gepo", "gepo | grpo | gspo | dr_grpo | reinforce")
    eps_low: float = field(0.2, "lower clip range of the importance weight")
    eps_high: float = field(0.2, "upper clip range of the importance weight")
    beta_k3: float = field(0.0, "weight of the k3 penalty toward the behaviour policy")
    adv_norm: str = field("mean", "group advantage: 'mean' (r - mean) or 'mean_std'")

    def __post_init__(self) -> None:
        self.loss_config()  # its checks

    def loss_config(self) -> LossConfig:
        return LossConfig(name=self.loss, eps_low=self.eps_low, eps_high=self.eps_high, beta_k3=self.beta_k3,
                          adv_norm=self.adv_norm)


@dataclass
class SamplingSection:
    """How every sampler generates (imposed on them at registration); the learner scores at the same settings."""

    temperature: float = field(0.7, "sampling temperature (the learner scores log-probs at the same temperature)")
    top_p: float = field(1.0, "nucleus sampling mass (1 disables)")
    top_k: int = field(0, "top-k truncation (0 disables)")
    max_new_tokens: int = field(16, "most tokens per completion")
    stop: list[str] = field([], "stop strings: a completion ends at the first one it produces")
    max_prompt_tokens: int = field(1024, "longest prompt in tokens; longer prompts of the task are skipped")

    def __post_init__(self) -> None:
        _check([
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (1 <= self.max_new_tokens <= 32768, "max_new_tokens must be in 1..32768"),
            (1 <= self.max_prompt_tokens <= 1 << 20, "max_prompt_tokens must be in 1..1048576"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (len(self.stop) <= 16, "at most 16 stop strings"),
        ])


@dataclass
class EvalSection:
    """Held-out evaluation (greedy, on the learner)."""

    eval_every: int = field(10, "evaluate on the held-out split every N steps (0 = only first and last)")
    eval_size: int = field(200, "held-out problems per evaluation (at most the task's held-out split)")
    eval_max_new_tokens: int = field(0, "tokens per evaluation answer (0 = max_new_tokens)")
    eval_samples: int = field(0, "besides greedy accuracy, pass@1 averaged over K samples per problem at the run's "
                                 "temperature (0 = greedy only)")
    eval_batch_size: int = field(32, "sequences per evaluation generate call (bounds the evaluation's memory)")

    def __post_init__(self) -> None:
        _check([
            (self.eval_every >= 0 and self.eval_size >= 0, "eval_every and eval_size must be >= 0"),
            (self.eval_max_new_tokens >= 0, "eval_max_new_tokens must be >= 0"),
            (0 <= self.eval_samples <= 256, "eval_samples must be in 0..256"),
            (1 <= self.eval_batch_size <= 4096, "eval_batch_size must be in 1..4096"),
        ])


@dataclass
class TrustSection:
    """Recomputing samplers' claimed log-probs (heterorl/server/trust.py)."""

    verify_fraction: float = field(0.25, "share of groups whose log-probs are recomputed under their version")
    verify_first: int = field(4, "a new sampler's first groups are always recomputed")
    logprob_tolerance: float = field(0.05, "mean |claimed - recomputed| log-prob per token (nats) that is a mismatch")
    quarantine_after: int = field(2, "mismatched groups after which a sampler is quarantined (its groups not trained)")

    def __post_init__(self) -> None:
        self.trust_config()  # its checks

    def trust_config(self) -> TrustConfig:
        return TrustConfig(verify_fraction=self.verify_fraction, verify_first=self.verify_first,
                           tolerance=self.logprob_tolerance, quarantine_after=self.quarantine_after)


@dataclass
class SecuritySection:
    """Who may call (heterorl/server/security.py); a token itself is never a setting, only a file."""

    tokens_file: Path | None = field(None, "file of sampler tokens, one 'name:token' per line ('#' comments); "
                                           "re-read when it changes")
    tls_cert: Path | None = field(None, "PEM certificate (chain) of the server; with --tls-key turns TLS on")
    tls_key: Path | None = field(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = field(None, "PEM CA that client certificates must chain to (mutual TLS)")
    insecure: bool = field(False, "allow listening beyond loopback with neither tokens nor client certificates")
    rate_calls_per_s: float = field(50.0, "calls per second allowed per sampler, sustained (0 = no limit)")
    rate_calls_burst: float = field(200.0, "calls a sampler may make at once above the sustained rate")
    rate_groups_per_s: float = field(200.0, "trajectory groups per second accepted per sampler (0 = no limit)")
    rate_groups_burst: float = field(800.0, "groups a sampler may send at once above the sustained rate")


@dataclass
class DurabilitySection:
    """The run database and checkpoints (heterorl/server/db.py, heterorl/server/checkpoint.py)."""

    resume: Path | None = field(None, "continue the run in this RUN_DIR from its database and last checkpoint")
    resume_existing: bool = field(False, "when RUN_DIR already holds a run, continue it (as --resume RUN_DIR) "
                                         "instead of refusing: for learners restarted by a service manager")
    checkpoint_every: int = field(10, "write a resumable train-state checkpoint every N steps (0 = only at the end "
                                      "and on SIGTERM)")
    db_sync: str = field("full", "run database commits: 'full' (fsync each commit; acks survive power loss) or "
                                 "'normal' (acks survive any learner crash, not an OS crash)")

    def __post_init__(self) -> None:
        if self.resume is not None:
            self.resume = Path(self.resume)
        _check([
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.db_sync in ("full", "normal"), f"db_sync must be 'full' or 'normal', got {self.db_sync!r}"),
        ])


REPORT_TARGETS = ("none", "tensorboard", "wandb")


@dataclass
class ReportSection:
    """Where the run's figures go besides metrics.jsonl: a Prometheus endpoint, TensorBoard, W&B
    (heterorl/server/metrics.py, heterorl/server/reporting.py)."""

    metrics_port: int = field(0, "serve Prometheus metrics over HTTP on this port (0 = off)")
    metrics_host: str = field("127.0.0.1", "address the Prometheus metrics endpoint binds to")
    report_to: list[str] = field([], "also log every metric of metrics.jsonl per step to: none, tensorboard "
                                     "(RUN_DIR/tensorboard), wandb (offline unless WANDB_MODE says otherwise); "
                                     "several allowed")

    def __post_init__(self) -> None:
        unknown = [t for t in self.report_to if t not in REPORT_TARGETS]
        _check([
            (0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535"),
            (not unknown, f"report_to: unknown target(s) {unknown}; choose from {', '.join(REPORT_TARGETS)}"),
            ("none" not in self.report_to or len(set(self.report_to)) == 1, "report_to: 'none' cannot be combined "
                                                                            "with other targets"),
        ])


@dataclass
class LearnerConfig:
    run: RunSection = section(RunSection)
    data: DataSection = section(DataSection)
    serve: ServeSection = section(ServeSection)
    train: TrainSection = section(TrainSection)
    loss: LossSection = section(LossSection)
    sampling: SamplingSection = section(SamplingSection)
    eval: EvalSection = section(EvalSection)
    trust: TrustSection = section(TrustSection)
    security: SecuritySection = section(SecuritySection)
    durability: DurabilitySection = section(DurabilitySection)
    report: ReportSection = section(ReportSection)
    logging: LoggingConfig = section(LoggingConfig)

    def __post_init__(self) -> None:
        self.task_kwargs()  # [data] settings that the task would not read are refused now, by name

    def task_kwargs(self) -> dict:
        """Keyword options of the run's task: [run] task_options and task_path, then the [data] settings."""
        return {**self.run.task_kwargs(), **self.data.task_kwargs(self.run.task)}

    @property
    def inflight_limit(self) -> int:
        """Most groups leased or waiting to be trained."""
        return self.serve.max_inflight_groups or 3 * self.train.groups_per_step

    @property
    def eval_tokens(self) -> int:
        """Tokens per evaluation answer."""
        return self.eval.eval_max_new_tokens or self.sampling.max_new_tokens
