"""The zero-weight equivalence check: a channel whose every consumer ignores it can be removed
without changing the model's output. Checks every index map (concat, split, flatten, residual)."""
import torch
from torch import nn

from cleanai.core.layers import get_layer_pruner
from cleanai.pruner.apply import PruningError, layer_keeps
from cleanai.pruner.fallback import protect_breaking


@torch.no_grad()
def zero_consumers(model: nn.Module, plan) -> None:
    """Zero the input weights of every consumer for the channels ``plan`` removes."""
    for (name, kind, dim), keep in layer_keeps(plan.graph, plan.removals).items():
        if kind == "internal":  # a layer's own units (attention heads): silence them entirely
            module = model.get_submodule(name)
            for tensor, d in get_layer_pruner(module).internal_weights(module, dim):
                removed = torch.ones(tensor.shape[d], dtype=torch.bool)
                removed[keep] = False
                tensor.index_fill_(d, torch.nonzero(removed).flatten(), 0.0)
            continue
        if kind == "param":  # a layer that runs its own forward (F.linear on its weight)
            owner, _, pname = name.rpartition(".")
            module = model.get_submodule(owner)
            pruner = get_layer_pruner(module, inherited=True)
            tensor = getattr(module, pname)
            # a bare parameter's dim a product contracts (``x @ W`` reads through ``W[0]``)
            reads = f"{name}[{dim}]" in plan.graph.parameter_reads
            if reads or (pruner is not None and any(t is tensor and d == dim
                                                    for t, d in pruner.weights(module, "in"))):
                removed = torch.ones(tensor.shape[dim], dtype=torch.bool)
                removed[keep] = False
                tensor.index_fill_(dim, torch.nonzero(removed).flatten(), 0.0)
            continue
        if kind != "in":
            continue
        module = model.get_submodule(name)
        pruner = get_layer_pruner(module, inherited=True)
        if pruner.coupling(module) == "same":
            continue  # a depthwise conv: its output channel is removed too
        removed = torch.ones(pruner.in_channels(module), dtype=torch.bool)
        removed[keep] = False
        groups = getattr(module, "groups", 1)
        for tensor, d in pruner.weights(module, "in"):
            if groups > 1 and tensor.shape[d] != len(removed):  # [out, in/groups, ...]
                per_in = tensor.shape[d]
                rows = tensor.shape[1 - d] // groups
                for p in torch.nonzero(removed).flatten().tolist():
                    b, local = divmod(p, per_in)
                    tensor.narrow(1 - d, b * rows, rows).select(d, local).zero_()
            else:
                tensor.index_fill_(d, torch.nonzero(removed).flatten(), 0.0)


def check_equivalence(model: nn.Module, pruner, x, atol: float = 1e-5) -> None:
    """Plan with ``pruner``, zero the consumers, record the output, prune, compare.

    A plan the pruned model cannot run (a block that keeps a width of its own) goes through
    the same fallback as ``pruner.step()``: the weights are put back, the groups that break
    it protected, and the step planned again."""
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    while True:
        plan = pruner.plan()
        assert plan.num_removed > 0
        zero_consumers(model, plan)
        with torch.no_grad():
            before = model(x)
        try:
            pruner.apply(plan)
            break
        except PruningError as exc:
            model.load_state_dict(weights)
            if not protect_breaking(model, pruner.graph, plan.removals, exc):
                raise
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=atol, rtol=1e-4)


def apply_unchanged(model: nn.Module, pruner, inputs: dict, plan) -> None:
    """Zero the consumers of what ``plan`` removes and apply it: a Hugging Face model's
    logits on ``inputs`` (keywords) must not move."""
    zero_consumers(model, plan)
    with torch.no_grad():
        before = model(**inputs).logits
    pruner.apply(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=1e-4)
