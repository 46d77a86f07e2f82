"""What a pruner measures on calibration data, and how it follows a step: the statistics
compensation reads, the importance's and the allocation's own measurements, in as few passes
over the data as they allow."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..core.runtime import ForwardFn
from ..importance.stats import ActivationStats, collect, stats_key
from .compensate import compensable_keys

if TYPE_CHECKING:  # pragma: no cover
    from .structured import StructuredPruner

__all__ = ["calibrate_here", "follow_step"]


def calibrate_here(pruner: "StructuredPruner", data: Iterable, max_batches: Optional[int],
                   forward_fn: Optional[ForwardFn], progress: bool,
                   shard: Tuple[int, int] = (0, 1)) -> None:
    """:meth:`StructuredPruner.calibrate` on this process: compensation's statistics (which a
    data-dependent importance adopts when it can, sparing its own pass), then the
    importance's and the allocation's; a one-shot iterator is read once for all of them.
    ``shard``: ``(rank, world)`` when ``data`` is this rank's share."""
    passes = (pruner.compensate is not None or
              getattr(pruner.importance, "requires_data", False)) + \
        getattr(pruner.allocation, "requires_data", False)
    if passes > 1 and iter(data) is data:
        data = list(itertools.islice(data, max_batches))
    adopted = False
    if pruner.compensate is not None:
        grams = compensable_keys(pruner.model, pruner.graph) \
            if pruner.compensate == "lstsq" else ()
        pruner.input_stats = collect(pruner.model, pruner.graph, data, max_batches, forward_fn,
                                     progress, grams=grams, shard=shard, halves=True)
        adopted = getattr(pruner.importance, "requires_data", False) and \
            pruner.importance.adopt(pruner.input_stats)
    for scorer in ((pruner.allocation,) if adopted else (pruner.importance, pruner.allocation)):
        calibrate = getattr(scorer, "calibrate", None)
        if calibrate is not None:
            calibrate(pruner.model, pruner.graph, data, max_batches, forward_fn, progress)


def follow_step(pruner: "StructuredPruner", layers: List[Dict[str, Any]]) -> None:
    """After a step (its history ``layers``): compensation's statistics keep the kept input
    channels (unless the importance already makes them follow), and the importance and the
    allocation follow too."""
    stats = pruner.input_stats
    if stats is not None and not _shares(pruner.importance, stats):
        for e in layers:
            if e["kind"] in ("in", "internal"):
                stats.keep(stats_key(e["name"], e["kind"], e["dim"]),
                           torch.tensor(e["keep"], dtype=torch.long))
    for scorer in (pruner.importance, pruner.allocation):
        follow = getattr(scorer, "follow", None)
        if follow is not None:
            follow(layers)


def _shares(importance: Any, stats: ActivationStats) -> bool:
    """Whether ``importance`` reads ``stats`` (it then makes them follow each step)."""
    return any(getattr(o, "stats", None) is stats
               for o in (importance, getattr(importance, "activation", None)))
