"""How many channels a group may and should lose: the total a ratio asks for, the most it may
still give, and the rounding that keeps its kept count a multiple of ``round_to``."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.graph import Group

__all__ = ["target_removed", "cap", "rounded", "unit_of", "positions_per_channel"]


def target_removed(group: Group, ratio: float, size0: int, max_ratio: float,
                   round_to: int) -> int:
    """Channels ``group`` (``size0`` channels before any step) should have lost, in total,
    once ``ratio`` is reached."""
    n = math.floor(size0 * ratio + 1e-9)
    n = min(n, math.floor(size0 * max_ratio + 1e-9), size0 - 1)
    return rounded(group, n, size0, max_ratio, round_to)


def cap(group: Group, size0: int, max_ratio: float) -> int:
    """How many more channels ``group`` may lose: not its protected ones, not its last, not
    past ``max_ratio`` of its original ``size0``."""
    return min(group.prunable, group.size - 1,
               math.floor(size0 * max_ratio + 1e-9) - (size0 - group.size))


def rounded(group: Group, n: int, size0: int, max_ratio: float, round_to: int) -> int:
    """``n`` channels removed in total, adjusted so the kept count is a multiple of
    ``round_to`` and of the group's own ``multiple`` (counted in positions per channel, for
    flattened members), never past ``max_ratio``."""
    round_to = unit_of(group, round_to)
    if round_to == 1 or n <= 0:
        return n
    per = positions_per_channel(group)
    unit = round_to // math.gcd(round_to, per)
    keep = size0 - n
    keep = max(unit, int(round(keep / unit)) * unit) if size0 >= unit else size0
    most = math.floor(size0 * max_ratio + 1e-9)
    if size0 - keep > most:  # rounding down went past the cap: round up instead
        keep = min(size0, math.ceil((size0 - most) / unit) * unit)
    return max(0, min(size0 - keep, size0 - 1))


def unit_of(group: Group, round_to: Optional[int]) -> int:
    """The multiple a group's kept count must be: ``round_to`` and the group's own
    ``multiple`` (a layer's kernel alignment) together; 1 when free."""
    return math.lcm(round_to or 1, group.multiple)


def positions_per_channel(group: Group) -> int:
    """Positions of the group's producer per channel (more than one after a flatten)."""
    for m in group.members:
        if m.kind == "out":
            return max(1, len(m.positions) // max(1, len(torch.unique(m.channels))))
    return 1
