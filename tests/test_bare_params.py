"""Parameters the model uses directly (a layer scale, a position embedding, a layer's weight
passed to ``F.linear``) stay recognised as weights however they are reshaped on the way."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai import StructuredPruner
from conftest import layout
from equivalence import check_equivalence


class NchwLayerScale(nn.Module):
    """ConvNeXt's layer scale on an NCHW map: ``gamma[:, None, None]``."""

    def __init__(self):
        super().__init__()
        self.stem, self.up, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = y + self.gamma[:, None, None] * self.down(F.relu(self.up(y)))
        return self.head(y)


class ViewedPositions(nn.Module):
    """A per-channel embedding added through a view: ``pos.view(1, -1, 1, 1)``."""

    def __init__(self):
        super().__init__()
        self.stem, self.pos, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.rand(8)), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.pos.view(1, -1, 1, 1) + self.stem(x)))


class HeadDimScale(nn.Module):
    """A scale over head_dim applied where whole heads are the units: the scale is kept, the
    heads stay removable."""

    def __init__(self, heads=4, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.o = nn.Linear(16, heads * head_dim), nn.Linear(heads * head_dim, 16)
        self.scale = nn.Parameter(torch.rand(head_dim))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim) * self.scale.view(1, 1, 1, -1)
        return self.o(F.relu(q).reshape(b, t, -1))


class ReshapedLayerWeight(nn.Module):
    """A layer used through its weight, reshaped or transposed first."""

    def __init__(self):
        super().__init__()
        self.a, self.fc, self.tied, self.b = nn.Linear(6, 8), nn.Linear(8, 10), nn.Linear(10, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(F.linear(h, self.fc.weight.view(self.fc.out_features, -1), self.fc.bias))
        h = F.relu(h @ self.tied.weight.t().contiguous() + self.tied.bias)
        return self.b(h)


def _prune(model, x, ratio=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown op, no "did not run"
        pruner = StructuredPruner(model, x, pruning_ratio=ratio)
    return pruner


@pytest.mark.parametrize("cls, x, param, dim", [
    (NchwLayerScale, torch.randn(2, 3, 6, 6), "gamma", 0),
    (ViewedPositions, torch.randn(2, 3, 6, 6), "pos", 0),
])
def test_reshaped_parameter_is_sliced_with_its_channels(cls, x, param, dim):
    torch.manual_seed(0)
    model = cls()
    pruner = _prune(model, x)
    group = next(g for g in pruner.graph.groups if any(m.name == param for m in g.members))
    assert not group.protected.any()
    member = next(m for m in group.members if m.name == param)
    assert member.kind == "param" and member.dim == dim
    check_equivalence(model, pruner, x)
    assert getattr(model, param).shape[dim] == model.stem.out_channels == 4


def test_head_dim_scale_keeps_the_heads_removable():
    torch.manual_seed(0)
    model, x = HeadDimScale(), torch.randn(2, 5, 16)
    pruner = _prune(model, x)
    heads = next(g for g in pruner.graph.groups if any(m.name == "q" and m.kind == "out" for m in g.members))
    assert heads.size == 4 and not heads.protected.any()
    check_equivalence(model, pruner, x)
    assert model.q.out_features == 16 and model.scale.shape == (8,)
    model.heads = 2
    assert model(x).shape == (2, 5, 16)


def test_layer_weight_used_reshaped_is_pruned_as_the_layer():
    torch.manual_seed(0)
    model, x = ReshapedLayerWeight(), torch.randn(4, 6)
    pruner = _prune(model, x)
    for name in ("fc", "tied"):
        out = next(g for g in pruner.graph.groups if any(m.name == name and m.kind == "out" for m in g.members))
        assert not out.protected.any()
    check_equivalence(model, pruner, x)
    assert model.fc.weight.shape == (5, 4) and model.tied.weight.shape == (6, 5)
    assert model(x).shape == (4, 3)


class BareMatrices(nn.Module):
    """Projections held as bare parameters: ``h @ W`` ([in, out]) and ``F.linear(h, V, bv)``
    ([out, in])."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(8, 12), nn.Linear(10, 4)
        self.W = nn.Parameter(torch.randn(12, 16) / 4)
        self.V, self.bv = nn.Parameter(torch.randn(10, 16) / 4), nn.Parameter(torch.randn(10))

    def forward(self, x):
        h = torch.sigmoid(F.relu(self.a(x)) @ self.W)  # sigmoid(0) != 0: consumers must ignore
        return self.o(F.relu(F.linear(h, self.V, self.bv)))


class BmmExperts(nn.Module):
    """Experts held as 3-D parameters and run with ``bmm`` on every token (Llama 4's text
    MoE): ``[E, H, 2I]`` gate/up and ``[E, I, H]`` down, the hidden size read from an
    attribute."""

    def __init__(self, experts=3, hidden=12, inter=6):
        super().__init__()
        self.num_experts, self.hidden_size = experts, hidden
        self.inp, self.out = nn.Linear(8, hidden), nn.Linear(hidden, 4)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inter) / 4)
        self.down_proj = nn.Parameter(torch.randn(experts, inter, hidden) / 4)

    def forward(self, x):
        h = self.inp(x)
        routed = h.repeat(self.num_experts, 1).view(self.num_experts, -1, self.hidden_size)
        gate, up = torch.bmm(routed, self.gate_up_proj).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj)
        h = h + y.view(self.num_experts, -1, self.hidden_size).sum(0)  # a residual stream
        return self.out(h)


def test_bare_matrices_prune_as_layers_on_both_dims():
    torch.manual_seed(0)
    model, x = BareMatrices(), torch.randn(5, 8)
    pruner = _prune(model, x)
    groups = {frozenset(layout(g)): g for g in pruner.graph.groups}
    assert frozenset({"a.out", "W[0]"}) in groups  # W reads a's channels...
    assert frozenset({"W[1]", "V[1]"}) in groups  # ...and makes channels V reads
    assert frozenset({"V[0]", "bv[0]", "o.in"}) in groups
    assert not any(g.protected.any() for g in pruner.graph.groups if "o.out" not in layout(g))
    check_equivalence(model, pruner, x)
    assert model.W.shape == (6, 8) and model.V.shape == (5, 8) and model.bv.shape == (5,)


def test_bmm_experts_prune_the_hidden_size_and_their_neurons():
    torch.manual_seed(0)
    model, x = BmmExperts(), torch.randn(5, 8)
    pruner = _prune(model, x)
    check_equivalence(model, pruner, x)
    assert model.gate_up_proj.shape == (3, 6, 6) and model.down_proj.shape == (3, 3, 6)
    assert model.hidden_size == 6 and model(x).shape == (5, 4)


class OtherUses(nn.Module):
    """``W`` read by a product and, besides, by something that is not ``W`` itself going into
    one: the dim such a product would make prunable must keep its size."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.a, self.o = nn.Linear(3, 8), nn.Linear(6, 2)
        self.W = nn.Parameter(torch.randn(8, 6) / 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.use == "flipped":  # rows reversed: row i is not W's row i
            return self.o(h @ self.W.flip(0))
        if self.use == "mixed":  # a softmax over W's rows mixes them
            return self.o(h @ self.W.softmax(0))
        y = h @ self.W  # W as a Linear from 8 to 6 ...
        return self.o(y) + (self.W.t() @ h.t()).sum(0)[:, None]  # ... and read the other way


@pytest.mark.parametrize("use", ["flipped", "mixed", "left_too"])
def test_a_bare_parameter_read_otherwise_keeps_its_other_dim(use):
    torch.manual_seed(0)
    model, x = OtherUses(use), torch.randn(6, 3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing to prune"
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
        held = [g for g in pruner.graph.groups if "W[1]" in layout(g) or "W[0]" in layout(g)]
        assert all(g.protected.all() for g in held), [layout(g) for g in held]
        pruner.step()
    assert model.W.shape == (8, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
