"""Resuming a training run that prunes: the order of the optimizer's parameters, saved and
put back, so its state lands on the right parameters (the pruner's own state is
:meth:`StructuredPruner.state_dict`, in :mod:`cleanai.pruner.state`)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn



def optimizer_names(optimizer: torch.optim.Optimizer,
                    model: nn.Module) -> List[List[Optional[str]]]:
    """Per param group, the model's name for each parameter the group holds (``None`` for a
    parameter of another model), in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]


def saved_order(optimizer: torch.optim.Optimizer, model: nn.Module,
                saved: List[List[Optional[str]]]) -> Optional[List[List[nn.Parameter]]]:
    """The optimizer's param groups' parameters in the order they had when saved (``None``
    when they are in it already), so that ``optimizer.load_state_dict`` (which pairs states
    with parameters by position) gives each parameter its own state. A parameter a step added
    (a bias from compensation) sits last in its group after the step, but in module order in
    a rebuilt model. Raises ``ValueError`` when the optimizer holds other parameters."""
    mine = optimizer_names(optimizer, model)
    if mine == saved:
        return None
    if len(mine) != len(saved) or any(sorted(map(str, a)) != sorted(map(str, b))
                                      for a, b in zip(mine, saved)) \
            or any(None in g or len(set(g)) != len(g) for g in saved):
        raise ValueError(f"the optimizer holds other parameters than when this state was "
                         f"saved ({_groups(mine)} here, {_groups(saved)} there): build it over "
                         f"the reloaded model's parameters, with the same param groups")
    if optimizer.state:
        raise ValueError(f"the optimizer holds its parameters in another order than when "
                         f"this state was saved ({_groups(saved)}), and its state is already "
                         f"loaded, so each state may sit on the wrong parameter: call "
                         f"gradual.load_state_dict() before optimizer.load_state_dict()")
    params = dict(model.named_parameters())
    return [[params[n] for n in names] for names in saved]


def _groups(names: List[List[Optional[str]]]) -> str:
    return "; ".join(", ".join(str(n) for n in g) for g in names)
