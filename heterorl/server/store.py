"""Accepted trajectory groups waiting to be trained, oldest first."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


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

    def __len__(self) -> int:
        return len(self._groups)
