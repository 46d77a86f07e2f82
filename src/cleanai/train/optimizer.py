"""Keeping an optimizer valid across a pruning step: its per-parameter state is sliced like the
parameters, and parameters that a step replaced or added are registered in its groups.

How: before the step, a copy of the model's structure is made whose every parameter holds its
own flat positions (``0 .. numel - 1``). The steps taken inside the ``with`` block are replayed
on that copy from the model's history, so each copied parameter ends up holding the original
positions of the elements the real one kept, whatever the layer pruner did (a packed q/k/v, a
grouped conv, an attention head). Any state tensor of the parameter's old shape is then
gathered at those positions: momentum buffers, Adam's ``exp_avg`` / ``exp_avg_sq`` /
``max_exp_avg_sq``; a state tensor reduced over some dims (Adafactor's row and column
statistics) is sliced along the others; scalars (``step``) are kept.
"""
from __future__ import annotations

import logging
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..core.graph import module_signature
from ..pruner.apply import replay
from ..pruner.history import get_history
from ..core.parametrized import deepcopy_module

logger = logging.getLogger(__name__)

EXACT_FLOAT32 = 2 ** 24  # float32 holds every integer up to here exactly


class slice_optimizer_state:
    """Context manager: the pruning steps applied to ``model`` inside it are applied to
    ``optimizer`` too, on exit::

        with cleanai.train.slice_optimizer_state(optimizer, model):
            pruner.step()
        optimizer.step()          # momentum, Adam moments and step counts carried over

    Every step recorded in the model's history inside the block is followed (any pruner,
    :func:`cleanai.replay`, several steps). A parameter object a step replaced takes the old
    one's place in its param group, with its state; one a step added (a bias given by
    compensation) joins the group of its layer's weight with empty state. State the
    optimizer keeps in a layout this cannot map (not the parameter's shape, nor that shape
    reduced over some dims) is dropped for that parameter, with a warning: the optimizer
    starts it afresh, as for a new parameter.

    Raises ``ValueError`` on entry when the optimizer holds none of the model's parameters,
    and ``RuntimeError`` on exit when the model's shapes changed without a recorded step.
    The copy made on entry holds one float per parameter element (float64 past 2**24
    elements in one tensor) until the block ends.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.model = model
        self._names = {id(p): n for n, p in model.named_parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(id(p) in self._names for p in held):
            raise ValueError(f"the optimizer holds none of the {type(model).__name__}'s "
                             f"parameters ({len(held)} others): pass the optimizer that "
                             f"trains this model")
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._probe: Optional[nn.Module] = None
        self._steps = 0
        self._signature: Dict[str, Tuple[int, ...]] = {}

    def __enter__(self) -> "slice_optimizer_state":
        history = get_history(self.model)
        self._steps = len(history["steps"]) if history else 0
        self._signature = module_signature(self.model)
        self._probe = position_probe(self.model)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        probe, self._probe = self._probe, None
        if exc_type is not None:  # the step failed and was rolled back: nothing to follow
            return False
        history = get_history(self.model)
        steps = history["steps"][self._steps:] if history else []
        if not steps:
            if module_signature(self.model) != self._signature:
                raise RuntimeError("the model's parameter shapes changed inside the block "
                                   "without a recorded CleanAI step; the optimizer's state "
                                   "cannot follow")
            return False
        for step in steps:
            replay(probe, step["layers"])
        follow(self.optimizer, self.model, probe, self._names, self._shapes)
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        return False


def position_probe(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters hold their own flat positions (the rest, buffers
    and attributes, copied as they are); shared parameters stay shared."""
    memo = {}
    for p in model.parameters():
        n = p.numel()
        dtype = torch.float32 if n <= EXACT_FLOAT32 else torch.float64
        memo[id(p)] = nn.Parameter(torch.arange(n, dtype=dtype).view(p.shape), requires_grad=False)
    return deepcopy_module(model, memo)


def follow(optimizer: torch.optim.Optimizer, model: nn.Module, probe: nn.Module,
           names: Dict[int, str], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Slice ``optimizer``'s state and swap its parameters, from ``probe`` (see the module)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    state = optimizer.state
    for group in optimizer.param_groups:
        params = group["params"]
        for i, old in enumerate(params):
            name = names.get(id(old))
            if name is None:
                continue  # not this model's
            new = model.get_parameter(name)
            if new is old and tuple(new.shape) == shapes[name]:
                continue  # not cut by the steps
            positions = probe.get_parameter(name).detach()
            if tuple(new.shape) != tuple(positions.shape):
                raise RuntimeError(f"{name}: the replayed step gives shape "
                                   f"{tuple(positions.shape)}, the model has {tuple(new.shape)}")
            old_state = state.pop(old, None)
            if old_state is not None:
                state[new] = sliced_state(old_state, shapes[name], positions, name)
            params[i] = new
            held.add(id(new))
    for group in optimizer.param_groups:  # once every group holds its new objects
        for extra in list(_added(model, group, names, held)):
            group["params"].append(extra)
            held.add(id(extra))


def _added(model: nn.Module, group: dict, names: Dict[int, str], held: set) -> Iterator[nn.Parameter]:
    """Parameters the steps added (not in the model before) to a module whose other
    parameters are in ``group``."""
    in_group = {id(p) for p in group["params"]}
    for module_name, module in model.named_modules():
        own = list(module._parameters.values())
        if not any(p is not None and id(p) in in_group for p in own):
            continue
        for p in own:
            if p is not None and id(p) not in names and id(p) not in held and p.requires_grad:
                yield p


def sliced_state(entry: dict, old_shape: Tuple[int, ...], positions: torch.Tensor,
                 name: str) -> dict:
    """One parameter's optimizer state with every tensor of its layout sliced to ``positions``
    (the kept elements' flat positions in the old parameter, shaped like the new one)."""
    out = {}
    flat = positions.reshape(-1).to(torch.long)
    keeps: Optional[List[torch.Tensor]] = None
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
            out[key] = value.reshape(-1).index_select(0, flat.to(value.device)).view(positions.shape)
        elif not isinstance(value, torch.Tensor) or value.numel() == 1:
            out[key] = value  # a step count, a scalar
        else:
            if keeps is None:
                keeps = per_dim_keeps(positions, old_shape)
            reduced = _reduced(value, old_shape, keeps)
            if reduced is None:
                warnings.warn(f"optimizer state {key!r} of {name} has shape "
                              f"{tuple(value.shape)}, which does not follow the parameter's "
                              f"{old_shape}; that parameter's state restarts", stacklevel=4)
                return {}
            out[key] = reduced
    return out


def per_dim_keeps(positions: torch.Tensor, old_shape: Tuple[int, ...]) -> Optional[List[torch.Tensor]]:
    """The kept indices along each dim when the kept elements form a grid (one index list per
    dim, as slicing dim by dim gives); ``None`` when they do not."""
    if len(old_shape) != positions.dim():
        return None
    strides = torch.tensor(old_shape[1:] + (1,)).flip(0).cumprod(0).flip(0).tolist()
    keeps = []
    for d in range(positions.dim()):
        index = [0] * positions.dim()
        index[d] = slice(None)
        line = positions[tuple(index)].to(torch.long)
        keeps.append((line // strides[d]) % old_shape[d])
    grid = torch.zeros((), dtype=torch.long)
    for d, keep in enumerate(keeps):
        grid = grid.unsqueeze(-1) + (keep * strides[d])
    if grid.shape != positions.shape or not torch.equal(grid, positions.to(torch.long)):
        return None
    return keeps


def _reduced(value: torch.Tensor, old_shape: Tuple[int, ...],
             keeps: Optional[List[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``value`` sliced along the dims where it has the parameter's size; ``None`` when its
    shape is not the parameter's with some dims reduced to 1."""
    if keeps is None or value.dim() != len(old_shape) or \
            any(v not in (1, s) for v, s in zip(value.shape, old_shape)):
        return None
    for d, (v, keep) in enumerate(zip(value.shape, keeps)):
        if v != 1:
            value = value.index_select(d, keep.to(value.device))
    return value
