"""Pruning on several processes with ``torch.distributed``: every collective CleanAI makes.

Under an initialised process group a :class:`~cleanai.StructuredPruner` works as one process
would on the union of every rank's data:

- ``calibrate``: each rank streams its own shard (a ``DistributedSampler``, or :func:`shard`),
  then every statistic, a sum with its count, is summed across ranks (:func:`all_reduce_stats`;
  Taylor gradients likewise), so every rank holds the same numbers;
- ``plan``: rank 0 plans and the plan is broadcast;
- ``apply``: every rank applies it, then a digest of each rank's model is compared
  (:func:`check_same_model`; also before calibrating and planning), and a mismatch names the rank.

A failure on one rank (no data, an error in its forward) is reported on every rank as a
:class:`DistributedError` instead of leaving the others waiting in a collective. After pruning a
``DistributedDataParallel`` model, wrap its module again with :func:`rewrap`.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .importance.stats import ActivationStats

logger = logging.getLogger(__name__)
#: relative tolerance of the value checksums compared across ranks (float64 sums of identical
#: tensors agree exactly on identical hardware; the slack covers other reduction orders)
DIGEST_RTOL = 1e-9


class DistributedError(RuntimeError):
    """Ranks disagree: one failed where others did not, or their models differ."""


def _dist():
    import torch.distributed as dist
    return dist


def active_group(process_group: Any = None) -> Any:
    """The process group to work on, or ``None`` when pruning is local: ``process_group`` when
    given, else the default group when ``torch.distributed`` is initialised with more than
    one rank."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise DistributedError("a process_group was given but torch.distributed is not "
                                   "initialised: call torch.distributed.init_process_group first")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def rank_and_world(group: Any) -> Tuple[int, int]:
    """This process's rank in ``group`` and the group's size."""
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; any other
    model as it is."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def shard(data: Iterable, process_group: Any = None) -> Iterator[Any]:
    """This rank's share of an iterable of batches: batches ``rank, rank + world, ...``.

    For loaders without a ``DistributedSampler``; every rank iterates the whole of ``data`` and
    keeps its own batches. Without a process group, every batch."""
    group = active_group(process_group)
    if group is None:
        yield from data
        return
    rank, world = rank_and_world(group)
    for i, batch in enumerate(data):
        if i % world == rank:
            yield batch


def _device(group: Any) -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_(tensor: torch.Tensor, group: Any) -> None:
    """All-reduce ``tensor`` (a sum) in place, through the backend's device when it is
    elsewhere."""
    dev = _device(group)
    if tensor.device == dev:
        _dist().all_reduce(tensor, group=group)
        return
    moved = tensor.to(dev)
    _dist().all_reduce(moved, group=group)
    tensor.copy_(moved)


def _gather(obj: Any, group: Any) -> List[Any]:
    out: List[Any] = [None] * _dist().get_world_size(group)
    _dist().all_gather_object(out, obj, group=group)
    return out


def agree(error: Optional[BaseException], group: Any, what: str) -> None:
    """Collective: every rank says whether ``what`` failed on it. When every rank failed with
    the same kind of error the local error is raised again on each (they all take the same
    path); otherwise every rank raises a :class:`DistributedError` naming the failed ones."""
    note = None if error is None else f"{type(error).__name__}: {error}"
    notes = _gather(note, group)
    failed = [(r, n) for r, n in enumerate(notes) if n is not None]
    if not failed:
        return
    kinds = {n.split(":", 1)[0] for _, n in failed}
    if len(failed) == len(notes) and len(kinds) == 1 and error is not None:
        raise error  # the same kind of failure everywhere: every rank takes the same path
    where = "; ".join(f"rank {r}: {n}" for r, n in failed)
    raise DistributedError(f"{what} failed on {len(failed)} of {len(notes)} ranks ({where}); "
                           f"every rank stops here") from error


def all_reduce_stats(stats: "ActivationStats", group: Any) -> None:
    """Sum calibration statistics across ranks in place: counts, per-channel sums and second
    moments, so every rank holds what one process would on all ranks' data together.

    Keys seen on some ranks only count as zeros elsewhere; a key whose width differs between
    ranks (the models differ) is a :class:`DistributedError`. Runs once per statistics object."""
    if getattr(stats, "reduced_over", None) is group:
        return
    mine = {k: (tuple(s.shape), k in stats.grams and tuple(stats.grams[k].shape))
            for k, s in stats.sums.items()}
    views = _gather((mine, sorted(stats._cross), sorted(stats.self_attention), stats.batches),
                    group)
    keys: Dict[str, Tuple[Tuple[int, ...], Any]] = {}
    for rank, (seen, _, _, _) in enumerate(views):
        for k, (shape, gram) in seen.items():
            if k in keys and keys[k][0] != shape:
                raise DistributedError(f"the input of {k!r} has {shape[1]} channels on rank "
                                       f"{rank} but {keys[k][0][1]} on another rank: the ranks' "
                                       f"models differ")
            keys[k] = (shape, keys.get(k, (None, False))[1] or gram)
    order = sorted(keys)
    widths = [keys[k][0][1] for k in order]
    dev = next(iter(stats.sums.values())).device if stats.sums else _device(group)
    # counts and sums in one buffer: [count, 3 x channels] per key
    flat = torch.zeros(sum(1 + 3 * w for w in widths), dtype=torch.float64, device=dev)
    at = 0
    for k, w in zip(order, widths):
        if k in stats.sums:
            flat[at] = stats.positions(k)
            flat[at + 1:at + 1 + 3 * w] = stats.sums[k].to(flat).reshape(-1)
        at += 1 + 3 * w
    _sum_(flat, group)
    at = 0
    for k, w in zip(order, widths):
        stats.count[k] = float(flat[at])
        wide = stats.sums[k].dtype if k in stats.sums else torch.float64
        stats.sums[k] = flat[at + 1:at + 1 + 3 * w].reshape(3, w).to(wide).clone()
        at += 1 + 3 * w
        if keys[k][1]:  # second moments, one tensor at a time (they can be large)
            gram = stats.grams.get(k)
            if gram is None:
                gram = torch.zeros(keys[k][1], dtype=torch.float64, device=dev)
            _sum_(gram, group)
            stats.grams[k] = gram
            _sum_half(stats, k, keys[k][1], dev, group)
    cross = set().union(*(set(v[1]) for v in views))
    stats._cross = cross
    stats.self_attention = set().union(*(set(v[2]) for v in views)) - cross
    stats.batches = sum(v[3] for v in views)
    stats.reduced_over = group


def _sum_half(stats: "ActivationStats", key: str, shape: Tuple[int, int], device: Any,
              group: Any) -> None:
    """Sum the odd-batch half of ``key``'s second moments (see ``ActivationStats.held_out``)
    across ranks; a rank that saw no odd batch adds zeros."""
    width = shape[0]
    flat = torch.zeros(1 + width, dtype=torch.float64, device=device)
    gram = torch.zeros(shape, dtype=torch.float32, device=device)
    if key in stats.half_grams:
        flat[0] = float(stats.half_count[key])
        flat[1:] = stats.half_sums[key].to(flat)
        gram = stats.half_grams[key].to(gram)
    _sum_(flat, group)
    _sum_(gram, group)
    if float(flat[0]) > 0:
        stats.half_count[key] = float(flat[0])
        stats.half_sums[key] = flat[1:].clone()
        stats.half_grams[key] = gram


def all_reduce_tensors(tensors: Sequence[Optional[torch.Tensor]], like: Sequence[torch.Tensor],
                       group: Any) -> List[Optional[torch.Tensor]]:
    """Sum a list of optional tensors across ranks (one per parameter, say): a slot that is
    ``None`` on every rank stays ``None``; one that is ``None`` on some ranks counts as zeros
    there, of the shape, dtype and device of ``like[i]`` (the parameter). Every rank must pass
    the same number of slots."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    union = sorted(set().union(*(set(p) for p in _gather(present, group))))
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for i in union:
        t = tensors[i]
        if t is None:
            t = torch.zeros_like(like[i], memory_format=torch.contiguous_format)
        _sum_(t, group)
        out[i] = t
    return out


def model_digest(model: nn.Module, graph: Any = None) -> Dict[str, Any]:
    """What is compared across ranks: every tensor's name and shape, a hash of those, the
    dtypes and the graph's groups (when given), and each parameter's float64 sum and norm
    (meta tensors: shapes only). Buffer values are left out: under DDP each rank's BatchNorm
    statistics follow its own last batch."""
    h = hashlib.sha256()
    tensors, names, sums = [], [], []
    params = {id(p) for p in model.parameters()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        tensors.append((name, tuple(t.shape)))
        if id(t) not in params or t.device.type == "meta":
            continue
        x = t.detach()
        names.append(name)
        sums.append(torch.stack([x.sum(dtype=torch.float64),  # on the CPU: a model may span
                                 torch.linalg.vector_norm(x, dtype=torch.float64)]).cpu())
    if graph is not None:
        h.update(repr([(g.id, g.size, int(g.prunable)) for g in graph.groups]).encode())
    values = torch.stack(sums).cpu().tolist() if sums else []  # one copy from the device
    return {"hash": h.hexdigest(), "tensors": tensors, "values": list(zip(names, values))}


def check_same_model(model: nn.Module, group: Any, when: str, graph: Any = None) -> None:
    """Collective: compare every rank's :func:`model_digest` with rank 0's and raise a
    :class:`DistributedError` naming the first rank (and tensor) that differs."""
    digests = _gather(model_digest(model, graph), group)
    ref = digests[0]
    for rank, d in enumerate(digests[1:], start=1):
        if d["hash"] != ref["hash"]:
            diff = next(((a, b) for a, b in zip(d["tensors"], ref["tensors"]) if a != b), None)
            detail = (f"{diff[0][0]!r} is {list(diff[0][1])} there, {diff[1][0]!r} "
                      f"{list(diff[1][1])} on rank 0" if diff else
                      f"{len(d['tensors'])} tensors there, {len(ref['tensors'])} on rank 0, "
                      f"or other dtypes or channel groups")
            raise DistributedError(f"{when}: rank {rank}'s model differs from rank 0's in its "
                                   f"structure ({detail})")
        for (name, a), (_, b) in zip(d["values"], ref["values"]):
            if any(abs(x - y) > DIGEST_RTOL * max(abs(x), abs(y), 1e-30) for x, y in zip(a, b)):
                raise DistributedError(f"{when}: rank {rank}'s model differs from rank 0's in "
                                       f"the values of {name!r} (sum {a[0]:.6g} vs {b[0]:.6g}); "
                                       f"load the same weights on every rank (DDP broadcasts "
                                       f"rank 0's when it wraps the model)")


def broadcast_buffers(model: nn.Module, group: Any) -> None:
    """Collective: every rank takes rank 0's floating-point buffers (BatchNorm statistics), as
    DDP does before each forward, so calibration runs the same model on every rank."""
    dist = _dist()
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    dev = _device(group)
    for b in model.buffers():
        if b.is_floating_point() and b.device.type != "meta":
            if b.device == dev and b.is_contiguous():
                dist.broadcast(b.data, src=src, group=group)
                continue
            moved = b.detach().to(dev).contiguous()
            dist.broadcast(moved, src=src, group=group)
            with torch.no_grad():
                b.copy_(moved)


def broadcast_object(obj: Any, group: Any) -> Any:
    """Rank 0's ``obj`` (of ``group``), on every rank."""
    dist = _dist()
    box = [obj]
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def is_leader(group: Any) -> bool:
    """Whether this process is rank 0 of ``group``."""
    return _dist().get_rank(group) == 0


def rewrap(ddp: nn.Module, **overrides: Any) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``ddp.module`` after pruning, with the old
    wrapper's settings (devices, process group, buffer syncing, unused-parameter search,
    bucket size, ...); ``overrides`` are passed to the constructor as well. Communication hooks
    registered on the old wrapper are not carried over: register them again.

    DDP lays out gradient buckets for the parameter shapes it saw when it was built, so a
    pruned module needs a new wrapper; train with the returned one and drop the old."""
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"rewrap expects a DistributedDataParallel model, got "
                        f"{type(ddp).__name__}")
    kwargs = dict(device_ids=ddp.device_ids, output_device=ddp.output_device, dim=ddp.dim,
                  process_group=ddp.process_group,
                  find_unused_parameters=ddp.find_unused_parameters,
                  gradient_as_bucket_view=ddp.gradient_as_bucket_view,
                  static_graph=ddp.static_graph,
                  bucket_cap_mb=ddp.bucket_bytes_cap / 1024 ** 2,
                  mixed_precision=getattr(ddp, "mixed_precision", None))
    if not getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True)):
        kwargs["broadcast_buffers"] = False  # rank-local buffers: not synced at init either
    kwargs.update(overrides)
    with warnings.catch_warnings():  # broadcast_buffers' deprecation: it alone keeps that
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(ddp.module, **kwargs)
