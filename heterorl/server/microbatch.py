"""Splitting an optimizer batch into micro-batches of whole groups under a token budget.

Whole groups only: every group statistic (the reward baseline, GEPO's denominator D) is taken inside one group,
so a group never spans two micro-batches; a group larger than the budget is a micro-batch of its own. Peak
memory then follows the budget, not B x G x length. The loss stays exactly the full-batch loss because each
micro-batch divides by the whole batch's counts (`batch_norms`, `heterorl.server.losses.BatchNorms`).
"""

from __future__ import annotations

from collections.abc import Sequence

from heterorl.server.losses import BatchNorms
from heterorl.server.store import StoredGroup


def group_tokens(group: StoredGroup) -> int:
    """Tokens a group puts through the model: each completion with its prompt."""
    prompt = len(group.prompt_token_ids)
    return sum(prompt + len(c.token_ids) for c in group.completions)


def plan_micro_batches(groups: Sequence[StoredGroup], token_budget: int) -> list[list[StoredGroup]]:
    """Consecutive runs of whole groups of at most `token_budget` tokens each (0: one micro-batch of all)."""
    if token_budget < 0:
        raise ValueError("token_budget must be >= 0")
    if token_budget == 0:
        return [list(groups)] if groups else []
    batches: list[list[StoredGroup]] = []
    current: list[StoredGroup] = []
    used = 0
    for group in groups:
        size = group_tokens(group)
        if current and used + size > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(group)
        used += size
    if current:
        batches.append(current)
    return batches


def batch_norms(groups: Sequence[StoredGroup]) -> BatchNorms:
    """The loss denominators of the whole batch, from its groups (as `BatchNorms.of` on its padded mask)."""
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    return BatchNorms(sequences=sum(n > 0 for n in lengths), tokens=sum(lengths), width=max(lengths, default=0))
