"""A learner on several processes: torch.distributed (launched by torchrun), FSDP2 sharding, rank 0 in charge.

Rank 0 is the learner everyone else sees: it serves gRPC and owns the run database, leases and the version store.
Every rank holds a shard of the fp32 master weights, gradients and AdamW state (`fully_shard`). Rank 0 drives the
others with commands on a gloo group of their own (`Ranks.announce` -> `follow`): "step" (the batch and which whole
groups each rank trains), "snapshot" (gather the weights for publishing), "save" / "load" (distributed
checkpoints), "stop". Each command is then carried out by every rank with the same collectives.

Two process groups, two timeouts: the followers wait for the next command as long as rank 0 needs (it may
evaluate or wait for samplers for minutes); the collectives of a command run on the default group with
`--collective-timeout-s`, so a rank that dies or hangs mid-command fails the command on rank 0 within that time (a
dead peer's closed socket fails it at once), and the learner stops with a `RankFailure`; `--resume` continues from
the last checkpoint. Rank 0's sending of a command is bounded by the same timeout: a gloo broadcast returns only
once every receiver has taken it, so a rank that hangs between two commands would otherwise hold rank 0 forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from heterorl.server.microbatch import group_tokens, plan_micro_batches
from heterorl.server.store import StoredGroup

logger = logging.getLogger(__name__)

COMMAND_WAIT = datetime.timedelta(days=30)  # followers wait this long for rank 0's next command
STOP = "stop"


class RankFailure(RuntimeError):
    """A collective failed or timed out: some rank died or hangs. The learner cannot go on; `--resume` can."""


def launched() -> bool:
    """True in a process started by torchrun (or another launcher that sets the torch.distributed environment)
    for a world of more than one rank. A world of one is an ordinary learner."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(spec: str, local_rank: int) -> str:
    """The device of one rank: `cuda:LOCAL_RANK` on GPU hosts (each rank one GPU), else the CPU.

    `cuda:N` names one GPU, which cannot hold several ranks; it is refused rather than silently ignored.
    """
    if spec.startswith("cuda:"):
        raise ValueError(f"--device {spec} names one GPU, but this learner has several ranks: give --device cuda "
                         f"(each rank uses the GPU of its local rank) or --device cpu")
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device on this host")
        return f"cuda:{local_rank}"
    return "cpu"


@dataclass
class Ranks:
    """This process's place among the learner's ranks, and the command channel between rank 0 and the others."""

    rank: int
    world: int
    device: str
    timeout_s: float
    commands: dist.ProcessGroup
    broken: bool = False  # a collective failed: no further command may be sent
    stopped: bool = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def announce(self, command: str, payload: object = None) -> None:
        """Rank 0: tell every other rank to carry out `command` with rank 0 (a no-op on the others, which call
        the same code from `follow`)."""
        if not self.leader:
            return
        if self.broken or self.stopped:
            state = "down" if self.broken else "stopped"
            raise RankFailure(f"cannot send {command!r}: the learner's ranks are {state}")
        with self.collective(f"sending {command!r} to the other ranks"):
            self._send(command, payload)

    def _send(self, command: str, payload: object) -> None:
        """Broadcast one pickled command on the command group, waiting at most `timeout_s` for each part (the
        group's own timeout is the followers' long wait). The ranks are one learner's processes: pickle is theirs."""
        blob = pickle.dumps((command, payload), protocol=pickle.HIGHEST_PROTOCOL)
        wait = datetime.timedelta(seconds=self.timeout_s)
        size, data = torch.tensor([len(blob)], dtype=torch.int64), torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        for tensor in (size, data):
            dist.broadcast(tensor, src=0, group=self.commands, async_op=True).wait(timeout=wait)

    def receive(self) -> tuple[str, object]:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.commands)
        blob = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(blob, src=0, group=self.commands)
        command, payload = pickle.loads(blob.numpy().tobytes())
        return command, payload

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a `RankFailure` that says what happened and what to do."""
        started = time.monotonic()
        try:
            yield
        except RankFailure:
            self.broken = True
            raise
        except RuntimeError as err:  # gloo/NCCL errors and timeouts (DistBackendError is a RuntimeError)
            self.broken = True
            raise RankFailure(
                f"{what} failed after {time.monotonic() - started:.1f}s on rank {self.rank} of {self.world}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; another rank of this learner died "
                f"or did not answer within --collective-timeout-s {self.timeout_s:g}; the learner stops "
                f"(continue the run with --resume)") from err

    def stop(self) -> None:
        """Rank 0: release the other ranks (they leave `follow`); best effort once something failed."""
        if not self.leader or self.stopped:
            return
        if not self.broken:
            # A plain broadcast, which `receive` reads like any command (one int64 size, then the pickle): the
            # bounded async send as the last operation before teardown aborted rank 0 at exit once in three runs.
            try:
                dist.broadcast_object_list([(STOP, None)], src=0, group=self.commands)
            except RuntimeError as err:
                logger.warning("could not tell the other ranks to stop: %s", err)
        self.stopped = True

    def gather(self, value: object) -> list[object] | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        out: list[object] | None = [None] * self.world if self.leader else None
        dist.gather_object(value, out, dst=0)
        return out


def start(device_spec: str, timeout_s: float) -> Ranks:
    """Join the process group torchrun set up: gloo on CPUs, NCCL on GPUs (plus a gloo group for commands)."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = rank_device(device_spec, local)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    commands = dist.new_group(backend="gloo", timeout=COMMAND_WAIT)
    logger.info("rank %d of %d (pid %d) on %s", rank, world, os.getpid(), device)
    return Ranks(rank, world, device, timeout_s, commands)


def finish(ranks: Ranks) -> None:
    """Leave the process group (rank 0 first releases the others)."""
    ranks.stop()
    if not ranks.broken:
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


# ---- sharding ------------------------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks, each sharded as its own FSDP unit (the longest ModuleList of the model)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """FSDP2 over the blocks and the root; bf16 parameters in forward/backward when computing in bf16, gradients
    always reduced in fp32. Gradients are summed, not averaged, over ranks: each rank's loss is already its share
    of the whole batch's loss (every loss divides by whole-batch counts), so the sum is the 1-rank gradient."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
    units = [fully_shard(layer, mp_policy=policy) for layer in decoder_layers(model)]
    units.append(fully_shard(model, mp_policy=policy))
    for unit in units:  # per unit: each reduces its own gradients
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def gather_weights(model: torch.nn.Module, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """Every parameter whole, cast to `dtype` before the all-gather (half the bytes of fp32 for bf16; the cast of a
    shard is the shard of the cast), one tensor at a time; on the CPU where `keep`, dropped elsewhere.

    Names are those of `heterorl.common.weights.weight_tensors` (tied weights once), so a version gathered here
    names the same tensors as one from a single-rank learner."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        local = param.detach().to(dtype)
        whole = local.full_tensor() if hasattr(local, "full_tensor") else local
        if keep:
            out[name] = whole.to("cpu", copy=True).contiguous()
    return out


# ---- which rank trains which groups --------------------------------------------------------------------------


def plan_shares(groups: Sequence[StoredGroup], world: int, token_budget: int) -> list[list[list[int]]]:
    """For each rank, its micro-batches as indices into `groups`: whole groups (a group's denominator never spans
    ranks), balanced by tokens (largest first to the least loaded rank), then split under the token budget.

    Every rank gets the same number of micro-batches, padded with empty ones: FSDP's collectives run once per
    forward/backward, so all ranks must run as many; a rank with nothing to do runs an empty one.
    """
    load = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(groups)), key=lambda i: -group_tokens(groups[i])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owned[rank].append(index)
        load[rank] += group_tokens(groups[index])
    shares = []
    for indices in owned:
        indices.sort()
        chunks, at = [], 0
        for chunk in plan_micro_batches([groups[i] for i in indices], token_budget):  # consecutive runs
            chunks.append(indices[at : at + len(chunk)])
            at += len(chunk)
        shares.append(chunks)
    count = max(1, max(len(s) for s in shares))
    return [s + [[] for _ in range(count - len(s))] for s in shares]


# ---- ranks > 0 -----------------------------------------------------------------------------------------------


def follow(trainer, ranks: Ranks) -> int:
    """The loop of every rank but 0: carry out rank 0's commands until it says stop; the exit status.

    Each command calls the same trainer method rank 0 runs, so both sides issue the same collectives.
    """
    done = 0
    while True:
        try:
            command, payload = ranks.receive()
        except RuntimeError as err:
            logger.error("rank %d: lost rank 0 while waiting for a command (%s); stopping", ranks.rank,
                         str(err).splitlines()[0] if str(err) else type(err).__name__)
            return 1
        if command == STOP:
            logger.info("rank %d: stopping after %d commands", ranks.rank, done)
            return 0
        try:
            if command == "step":
                groups, plans, norms = payload  # type: ignore[misc]
                trainer.run_share(groups, plans[ranks.rank], norms)
            elif command == "snapshot":
                trainer.snapshot(payload)
            elif command == "save":
                trainer.save_state(*payload)  # type: ignore[misc]
            elif command == "load":
                trainer.load_state(*payload)  # type: ignore[misc]
            else:
                raise RankFailure(f"unknown command {command!r} from rank 0 (mixed heterorl versions?)")
        except RankFailure as err:
            logger.error("rank %d: %s", ranks.rank, err)
            return 1
        done += 1


# ---- `heterorl-learner --nproc N` ----------------------------------------------------------------------------


def relaunch(argv: Sequence[str], nproc: int) -> None:
    """Replace this process by torchrun starting `nproc` ranks of the learner on this host (same pid, so signals
    sent to the learner reach torchrun, which passes them on). Does not return."""
    # `--nproc` goes: torchrun's parser would take it for an abbreviation of its own --nproc-per-node.
    args, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "heterorl.server", *args]
    logger.info("starting %d ranks: %s", nproc, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def free_port() -> int:
    """A free TCP port on loopback (for a rendezvous in tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
