"""A layer's output split by a list of sizes its module stores (``torch.split(self.in_proj(x),
self.in_split, -1)``): each part loses channels of its own and the stored list follows.
Sizes written in the code itself still protect (tests/test_graph_ops.py)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import cleanai
from equivalence import check_equivalence


class StoredSplit(nn.Module):
    """One fused projection read as three parts of unequal width."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 14)
        self.sizes = [6, 4, 4]
        self.a, self.b, self.c = nn.Linear(6, 3), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        p, q, r = torch.split(self.inp(x), self.sizes, dim=-1)
        return self.a(p.relu()) + self.b(q) * self.c(r)


def test_each_part_is_a_group_and_the_stored_sizes_follow():
    torch.manual_seed(0)
    model, x = StoredSplit().eval(), torch.randn(5, 8)
    graph = cleanai.DependencyGraph(model, x)
    parts = sorted(g.size for g in graph.groups if any(m.name == "inp" for m in g.members))
    assert parts == [4, 4, 6]  # three groups, none protected
    assert not any(g.protected.any() for g in graph.groups if g.size in (4, 6))
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.sizes == [3, 2, 2] and model.inp.out_features == 7
    assert (model.a.in_features, model.b.in_features, model.c.in_features) == (3, 2, 2)


def test_history_replays_the_stored_sizes(tmp_path):
    torch.manual_seed(0)
    model, x = StoredSplit().eval(), torch.randn(5, 8)
    fresh = copy.deepcopy(model)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    cleanai.save_pruned(model, tmp_path)
    loaded = cleanai.load_pruned(fresh, tmp_path)
    assert loaded.sizes == [3, 2, 2] and isinstance(loaded.sizes, list)
    torch.testing.assert_close(loaded(x), model(x))


def _pwee():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, img_size=64,
                             depth=2).eval()


def test_timm_parallel_block_prunes_its_mlp_part_and_updates_in_split(tmp_path):
    # ParallelScalingBlock: in_proj -> split(self.in_split) into [mlp, q, k, v]; its attention
    # output is reshaped to the block's input width C, so heads and hidden size prune only
    # together: the fallback ties them (3 of 4 heads of 64, and 3/4 of the width)
    model, x = _pwee(), torch.randn(1, 3, 64, 64)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        shape = model(x).shape
    n0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.3)
        pruner.step()
    said = [str(w.message) for w in caught]
    assert any("reshape(B, N, C)" in w for w in said), said
    for block in model.blocks:
        assert block.in_split == [896, 192, 192, 192]
        assert block.in_proj.out_features == 896 + 576 == block.in_proj.bias.shape[0]
        assert block.in_proj.in_features == 192 == block.attn_out_proj.out_features
        assert block.mlp_out_proj.in_features == 896
    y = model(x)
    y.sum().backward()
    assert y.shape == shape and sum(p.numel() for p in model.parameters()) < n0
    cleanai.save_pruned(model, tmp_path)
    loaded = cleanai.load_pruned(fresh, tmp_path)
    assert loaded.blocks[1].in_split == [896, 192, 192, 192]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_timm_parallel_block_heads_and_hidden_prune_together_at_one_half():
    model, x = _pwee(), torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing falls back
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    block = model.blocks[0]
    assert block.in_split == [640, 128, 128, 128] and block.num_heads == 2
    assert model(x).shape == (1, 1000)


class LiteralSplit(nn.Module):
    """Sizes written in the code: they cannot follow a slice, so the parts stay."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 10), nn.Linear(6, 2)

    def forward(self, x):
        p, q = self.inp(x).split([4, 6], dim=-1)
        return self.out(q) + p.sum(-1, keepdim=True)


def test_a_model_left_unchanged_is_told_which_groups_are_protected_and_why():
    model = LiteralSplit().eval()
    with pytest.warns(UserWarning) as caught:
        pruner = cleanai.StructuredPruner(model, torch.randn(3, 8), pruning_ratio=0.5)
    said = " ".join(str(w.message) for w in caught)
    assert "no channels CleanAI can prune" in said
    assert "largest protected groups: group 0 (10 channels: inp" in said
    assert "10 SplitWithSizesBackward0 into unequal sizes [4, 6]" in said
    pruner.step()
    assert model.inp.out_features == 10
