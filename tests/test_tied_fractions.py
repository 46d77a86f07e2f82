"""Attention that derives its head size from its input's width (``C // self.num_heads``, as
in Swin and timm's relative-position ViTs) runs only while its heads and that width shrink
together: step() finds the groups that break apart, ties them to keep the same fraction, and
prunes them together at the ratio nearest the plan's."""
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai import StructuredPruner, load_pruned, save_pruned
from cleanai.pruner.apply import PruningError


class Attn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(dim), Attn(dim, heads)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.fc2(torch.relu(self.fc1(self.n2(x))))


class Net(nn.Module):
    def __init__(self, dim=48, heads=6):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 5, 16)


def _widths(model):
    return ([b.attn.num_heads for b in model.blocks], model.embed.out_features,
            [b.fc1.out_features for b in model.blocks])


def test_heads_and_width_are_tied_and_pruned_together(tmp_path):
    model, x = _net()
    fresh = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = StructuredPruner(model, x, pruning_ratio=0.3)
        pruner.step()
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "keep the same fraction" in said[0] and "C // self.num_heads" \
        in said[0], said
    # 0.3 of 6 heads is 1.8: the common fraction nearest the plan's (heads 5/6, width 0.7)
    assert _widths(model) == ([5, 5], 40, [68, 68])
    protected = {g.kind: int(g.protected.sum()) for g in pruner.graph.groups if g.size > 10}
    assert protected == {"hidden": 0, "channels": 0}
    tied = [g for g in pruner.graph.groups if g.equal_fractions]
    assert sorted(g.kind for g in tied) == ["heads", "heads", "hidden"]
    assert "keeps the same fraction of its 48 channels as groups" in repr(tied[0])
    y = model(x)
    assert y.shape == (2, 10)
    save_pruned(model, tmp_path)
    torch.testing.assert_close(load_pruned(fresh, tmp_path)(x), y)


def test_ties_hold_through_iterative_steps():
    model, x = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, x, pruning_ratio=0.5, iterative_steps=2)
        pruner.step()
        # step 1 asks 0.25: 6 heads lose 1 only with the width at 40 (5/6)
        assert _widths(model) == ([5, 5], 40, [72, 72])
        pruner.step()
    assert _widths(model) == ([3, 3], 24, [48, 48])
    assert model(x).shape == (2, 10)


def test_a_plan_that_breaks_a_tie_is_refused_with_the_model_untouched():
    model, x = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, x, pruning_ratio=0.3, iterative_steps=2)
        pruner.step()
    hidden = next(g for g in pruner.graph.groups if g.kind == "hidden")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = cleanai.PruningPlan(pruner.graph, {hidden.id: torch.arange(4)}, 2)
    with pytest.raises(PruningError, match="must keep the same fraction"):
        pruner.apply(plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_budget_counts_the_tie_before_it_reads_the_cost():
    from cleanai.utils import count_macs
    model, x = _net()
    dense = count_macs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = StructuredPruner(model, x, target_macs=0.6).step()
    heads, width, _ = _widths(model)
    assert width * 6 == heads[0] * 48 and heads[0] == heads[1] < 6  # shrunk, and together
    row = plan.budget.rows["macs"]
    assert count_macs(model, x) == pytest.approx(row["planned"], rel=1e-6)  # what it says
    assert 0.594 * dense <= row["planned"] <= 0.6 * dense  # within 1%: untied channels fill


def test_untied_channels_fill_what_a_coarse_tie_leaves_of_a_budget():
    from cleanai.utils import count_macs
    torch.manual_seed(0)
    model, x = Net(dim=48, heads=2).eval(), torch.randn(2, 5, 16)
    dense = count_macs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, x, target_macs=0.35).step()
    assert model.blocks[0].attn.num_heads == 1 and model.embed.out_features == 24
    # the tie moves in halves (1 of 2 heads): MLP neurons fill the rest of the budget
    assert 0.3465 * dense <= count_macs(model, x) <= 0.35 * dense
