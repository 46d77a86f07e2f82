"""Helpers shared by the dependency-graph tests (imported as ``from conftest import ...``):
group layouts, structural invariants and a data-flow oracle for index maps."""
import pytest
import torch
from torch import nn

from cleanai.core.layers import LayerPruner, UnsupportedLayer, get_layer_pruner


def R(n, reps=1):
    """[0, 1, ..., n-1] repeated ``reps`` times."""
    return list(range(n)) * reps


def layout(group):
    """``{"layer.kind": [channel at each position, None where another group owns it]}``;
    parameters appear as ``"name[dim]"``."""
    out = {}
    for m in group.members:
        row = [None] * m.length
        for p, c in zip(m.positions.tolist(), m.channels.tolist()):
            row[p] = c
        key = f"{m.name}.{m.kind}" if m.kind != "param" else f"{m.name}[{m.dim}]"
        assert key not in out, f"{key} listed twice in group {group.id}"
        out[key] = row
    return out


def group_with(graph, key):
    """The one group whose layout holds ``key`` ("layer.kind")."""
    hits = [g for g in graph.groups if key in layout(g)]
    assert len(hits) == 1, f"{key} is in {len(hits)} groups"
    return hits[0]


def _channel_dim(module: nn.Module, ndim: int) -> int:
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
        return ndim - 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return ndim - len(module.kernel_size) - 1
    return 1 if ndim > 1 else 0


def _independent(module) -> bool:
    """A layer whose output channels are its own (not depthwise): it creates a group."""
    conv = isinstance(module, nn.modules.conv._ConvNd)
    return not (conv and module.groups == module.in_channels > 1)


def producers(graph, group):
    """Names of the layers whose output channels create ``group``."""
    return [m.name for m in group.members
            if m.kind == "out" and _independent(graph.modules.get(m.name))]


def assert_well_formed(graph) -> None:
    """Invariants every graph must satisfy, stricter than ``graph.check()``."""
    graph.check()
    made = {n for g in graph.groups for n in producers(graph, g)}
    # layers whose output the trace cut into parts (slices of it, splits by stored sizes)
    made -= {s[0] for s in graph.slices} | {s[0] for s in graph.split_attributes}
    owned = {}  # (name, kind) -> positions claimed so far
    for i, g in enumerate(graph.groups):
        assert g.id == i and g.size > 0 and g.protected.dtype == torch.bool
        assert sum(g.reasons.values()) == int(g.protected.sum()), (g.reasons, g.protected)
        # a layer's internal dims (attention heads, hidden units) are their own producers
        assert producers(graph, g) or any(m.kind == "internal" for m in g.members), \
            f"group {g.id} has no producer"
        for m in g.members:
            assert m.kind in ("out", "in", "same", "param", "internal")
            positions = m.positions.tolist()
            assert len(set(positions)) == len(positions), f"{m.name}: repeated position"
            if m.name in made and m.kind == "out":
                assert len(m.positions) == m.length, f"{m.name}.out split across groups"
            key = (m.name, m.kind, m.dim if m.kind == "internal" else None)
            clash = owned.setdefault(key, set()) & set(m.positions.tolist())
            assert not clash, f"{key} positions {sorted(clash)} in two groups"
            owned[key] |= set(m.positions.tolist())
        for name in producers(graph, g):
            covered = {int(c) for m in g.members if m.name == name and m.kind == "out"
                       for c in m.channels}
            assert covered == set(range(g.size)), f"{name} does not cover group {g.id}"


def _reads_channels(module: nn.Module) -> bool:
    """A layer CleanAI prunes whose input has channels (a one-parameter PReLU has none)."""
    pruner = get_layer_pruner(module)
    if not isinstance(pruner, LayerPruner) or isinstance(pruner, UnsupportedLayer):
        return False
    return pruner.in_channels(module) is not None


def assert_maps_follow_dataflow(model, inputs, graph, groups=None, channels=1) -> None:
    """Poison channel c of a group with NaN at every producer (all other producers replay their
    recorded outputs) and check that exactly the member positions mapped to c turn NaN at every
    layer input. NaN passes every op unchanged in kind (no saturating ReLU or sigmoid hides it),
    so this is exact for models without channel-mixing ops between layers (LayerNorm, softmax)."""
    made = {n for g in graph.groups for n in producers(graph, g)}
    modules = dict(model.named_modules())
    tracked = {m.name for g in graph.groups for m in g.members if m.kind in ("in", "same")}
    # every other layer CleanAI knows: poison reaching one means the graph missed a consumer
    untracked = {n for n, mod in modules.items() if n and n not in tracked
                 and _reads_channels(mod) and not any(n.startswith(k + ".") for k in graph.modules)}
    recorded, seen, calls = {}, {}, {}
    poison = {}

    def pre(name):
        def hook(mod, args):
            x = args[0].detach()
            d = _channel_dim(mod, x.dim())
            hit = x.isnan().movedim(d, 0).reshape(x.shape[d], -1).any(1)
            seen.setdefault(name, set()).update(hit.nonzero().flatten().tolist())
        return hook

    def post(name):
        def hook(mod, args, out):
            k = calls[name] = calls.get(name, -1) + 1
            if len(recorded.get(name, ())) <= k:
                recorded.setdefault(name, []).append(out.detach().clone())
                return None
            y = recorded[name][k].clone()
            if name in poison:
                y.index_fill_(_channel_dim(mod, y.dim()), poison[name], float("nan"))
            return y
        return hook

    def run():
        seen.clear()
        calls.clear()
        with torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        return dict(seen)

    handles = [modules[n].register_forward_pre_hook(pre(n)) for n in tracked | untracked]
    handles += [modules[n].register_forward_hook(post(n)) for n in made]
    try:
        assert not any(run().values()), "NaN in the unpoisoned model"
        chosen = graph.groups if groups is None else [graph.groups[i] for i in groups]
        for g in chosen:
            for c in torch.linspace(0, g.size - 1, min(channels, g.size)).round().long().tolist():
                poison.clear()
                poison.update({m.name: m.positions[m.channels == c] for m in g.members
                               if m.kind == "out" and m.name in made})
                changed = run()
                for name in tracked | untracked:
                    want = {int(p) for m in g.members if m.name == name and m.kind in ("in", "same")
                            for p in m.positions[m.channels == c]}
                    got = changed.get(name, set())
                    assert got == want, (f"group {g.id} channel {c}: input of {name} changed at "
                                         f"{sorted(got)}, graph says {sorted(want)}")
    finally:
        for h in handles:
            h.remove()


class Double(torch.autograd.Function):
    """A custom autograd op (``DoubleBackward``): unknown to the tracer by construction."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


PER_ELEMENT = 1e-8  # fake seconds per weight element, for the fake_clock fixture


def model_seconds(model, rest):
    """A fake whole-model latency: a constant plus every weight element of the model's
    Linear and Conv layers."""
    return rest + PER_ELEMENT * sum(m.weight.numel() for m in model.modules()
                                    if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.fixture
def fake_clock(monkeypatch):
    """A deterministic clock for latency budgets: a layer alone takes PER_ELEMENT per weight
    element, the whole model that plus ``rest[0]``. Yields (rest, calls): ``rest`` is
    settable, ``calls`` lists the models each whole-model timing compared (None: alone)."""
    import cleanai.budget.latency as latency_mod
    import cleanai.pruner.budget as budget_mod

    rest, calls = [2e-4], []
    monkeypatch.setattr(latency_mod, "_time_call",
                        lambda module, x, repeats: PER_ELEMENT * module.weight.numel())

    def paired(model, other, inputs, fn, repeats):
        calls.append(other)
        return (model_seconds(model, rest[0]),
                None if other is None else model_seconds(other, rest[0]))

    monkeypatch.setattr(budget_mod, "paired_latency", paired)
    return rest, calls
