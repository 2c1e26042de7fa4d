"""Accepted trajectory groups waiting to be trained, oldest first, and their compact on-disk form.

The queue itself lives in memory (the trainer takes from it under the learner's lock); every group in it is also
committed to the run database (`heterorl.server.db`) before its sampler is acknowledged, as the bytes of
`encode_group`, so that a restarted learner rebuilds exactly this queue.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from dataclasses import dataclass, field

import numpy as np

_HEADER = struct.Struct("<BII")  # format, prompt tokens, completions
_FORMAT = 1


@dataclass(frozen=True)
class StoredCompletion:
    token_ids: list[int]
    logprobs: list[float]          # behaviour log-probs reported by the sampler
    finish_reason: int
    reward: float                  # the learner's own score
    sampler_reward: float | None   # what the sampler claimed (recorded, never used for training)


@dataclass(frozen=True)
class StoredGroup:
    lease_id: str
    sampler_id: str
    prompt_index: int
    prompt_token_ids: list[int]
    policy_version: int
    completions: tuple[StoredCompletion, ...]
    accepted_at: float


def encode_group(group: StoredGroup) -> bytes:
    """Prompt and completions of a group as bytes, losslessly (log-probs arrive as float32 on the wire).

    Layout: header, then per completion its length, finish reason, reward and claimed reward (NaN: none; a
    claimed reward is validated finite), then all prompt tokens, all completion tokens and all log-probs.
    """
    comps = group.completions
    lengths = [len(c.token_ids) for c in comps]
    return b"".join(
        (
            _HEADER.pack(_FORMAT, len(group.prompt_token_ids), len(comps)),
            np.asarray(lengths, dtype="<u4").tobytes(),
            np.asarray([c.finish_reason for c in comps], dtype="<u4").tobytes(),
            np.asarray([c.reward for c in comps], dtype="<f8").tobytes(),
            np.asarray([math.nan if c.sampler_reward is None else c.sampler_reward for c in comps], dtype="<f8").tobytes(),
            np.asarray(group.prompt_token_ids, dtype="<u4").tobytes(),
            np.asarray([t for c in comps for t in c.token_ids], dtype="<u4").tobytes(),
            np.asarray([x for c in comps for x in c.logprobs], dtype="<f4").tobytes(),
        )
    )


def decode_group(data: bytes, *, lease_id: str, sampler_id: str, prompt_index: int, policy_version: int,
                 accepted_at: float) -> StoredGroup:
    """The inverse of `encode_group`; ValueError if the bytes are not a whole group."""
    if len(data) < _HEADER.size:
        raise ValueError(f"group of lease {lease_id}: {len(data)} bytes is shorter than its header")
    fmt, n_prompt, g = _HEADER.unpack_from(data)
    if fmt != _FORMAT:
        raise ValueError(f"group of lease {lease_id}: unknown format {fmt}")
    pos = _HEADER.size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        size = np.dtype(dtype).itemsize * count
        if pos + size > len(data):
            raise ValueError(f"group of lease {lease_id} is truncated")
        out = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += size
        return out

    lengths = take("<u4", g).tolist()
    finishes = take("<u4", g).tolist()
    rewards = take("<f8", g).tolist()
    claimed = take("<f8", g).tolist()
    prompt = take("<u4", n_prompt).tolist()
    tokens = take("<u4", sum(lengths)).tolist()
    logprobs = take("<f4", sum(lengths)).tolist()
    if pos != len(data):
        raise ValueError(f"group of lease {lease_id} has {len(data) - pos} trailing bytes")
    completions, start = [], 0
    for n, finish, reward, claim in zip(lengths, finishes, rewards, claimed, strict=True):
        completions.append(
            StoredCompletion(tokens[start : start + n], logprobs[start : start + n], finish, reward,
                             None if math.isnan(claim) else claim)
        )
        start += n
    return StoredGroup(lease_id, sampler_id, prompt_index, prompt, policy_version, tuple(completions), accepted_at)


@dataclass
class TrajectoryStore:
    """FIFO of accepted groups. Not thread-safe: the service serialises access with its own lock."""

    _groups: deque[StoredGroup] = field(default_factory=deque)

    def add(self, group: StoredGroup) -> None:
        self._groups.append(group)

    def take(self, n: int) -> list[StoredGroup]:
        taken = []
        while self._groups and len(taken) < n:
            taken.append(self._groups.popleft())
        return taken

    def put_back(self, groups: list[StoredGroup]) -> None:
        """Return taken groups to the front, in their order (training was interrupted)."""
        self._groups.extendleft(reversed(groups))

    def snapshot(self) -> tuple[StoredGroup, ...]:
        """The waiting groups, oldest first (a copy)."""
        return tuple(self._groups)

    def __len__(self) -> int:
        return len(self._groups)
