"""Widths real models keep in their own code or share (CSPNet's fixed splits, MobileViTv2's
``embed_dim``, MetaFormer's stored view shapes, T5's tied embeddings, a detector's detached
proposals): the pruner follows them, or protects only what it must."""
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai.utils import count_params

from equivalence import check_equivalence


class CrossStage(nn.Module):
    """CSPNet's stage: the expanded map is split by a size the code computes from an integer
    attribute (``x.split(self.expand // 2)``), which pruning cannot update."""

    def __init__(self, c, expand):
        super().__init__()
        self.expand = expand
        self.conv_exp = nn.Conv2d(c, expand, 1)
        self.block = nn.Conv2d(expand // 2, expand // 2, 3, padding=1)
        self.conv_transition = nn.Conv2d(expand, c, 1)

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(self.expand // 2, dim=1)
        return self.conv_transition(torch.cat([xs, torch.relu(self.block(xb))], dim=1))


class ChunkStage(CrossStage):
    """The same stage written with ``chunk(2)``: the halves follow the pruned width."""

    def forward(self, x):
        xs, xb = self.conv_exp(x).chunk(2, dim=1)
        return self.conv_transition(torch.cat([xs, torch.relu(self.block(xb))], dim=1))


def _csp(stage):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), stage(16, 32), stage(16, 32),
                         nn.Conv2d(16, 5, 1))


def test_split_by_fixed_size_protects_only_the_split_channels():
    torch.manual_seed(0)
    model = _csp(CrossStage).eval()
    x = torch.randn(1, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    split = [g for g in pruner.graph.groups if g.fixed_splits]
    assert sorted(w for g in split for w in g.fixed_splits) == ["2", "3"]
    with pytest.warns(UserWarning, match="splits into parts of fixed sizes"):
        pruner.step()
    assert model(x).shape == (1, 5, 8, 8)
    for stage in (model[2], model[3]):
        assert stage.conv_exp.out_channels == 32  # the split's channels are kept ...
        assert stage.block.out_channels == 8  # ... everything else is pruned
    assert model[0].out_channels == 8
    assert all("sizes fixed in its code" in next(iter(g.reasons)) for g in split)


def test_chunk_halves_are_pruned_without_fallback():
    torch.manual_seed(0)
    model = _csp(ChunkStage).eval()
    x = torch.randn(1, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any(g.fixed_splits for g in pruner.graph.groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        pruner.step()
    assert model[2].conv_exp.out_channels == 16 and model(x).shape == (1, 5, 8, 8)


class WidthKeeper(nn.Module):
    """MobileViTv2's linear attention: ``qkv.split([1, self.embed_dim, self.embed_dim])``;
    its qkv output is protected (unequal split), so ``embed_dim`` must not change."""

    def __init__(self, d):
        super().__init__()
        self.embed_dim = d
        self.qkv = nn.Conv2d(d, 1 + 2 * d, 1)
        self.out = nn.Conv2d(d, d, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        return self.out(torch.softmax(q, dim=-1) * k + v)


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 1)

    def forward(self, x):
        h = self.a(x)
        return h + self.b(torch.relu(h))


def test_width_attribute_of_a_block_beside_the_group_is_left_alone():
    """A residual width elsewhere in the model equals ``embed_dim`` by chance; pruning it must
    not rewrite the attention block's ``embed_dim``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), WidthKeeper(8), Residual(8), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 4, 4)
    n0 = count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    assert model(x).shape == (1, 4, 4, 4)
    # its split by ``[1, embed_dim, embed_dim]`` prunes keys and values and sets embed_dim
    # from them (tests/test_split_attributes.py), never from the residual's width
    assert model[1].embed_dim == (model[1].qkv.out_channels - 1) // 2 == model[1].out.in_channels
    assert model[2].a.out_channels == 4 and count_params(model) < n0


class WidthNorm(nn.Module):
    """An RMS norm that keeps its width: its own parameter is a member of the hidden group."""

    def __init__(self, d):
        super().__init__()
        self.hidden_size = d
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class NormBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = WidthNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_width_attribute_of_a_module_owning_a_group_parameter_follows():
    """The scope of the hidden group is the whole model; a norm inside a block owns a member
    parameter, so its ``hidden_size`` is the group's width, not a chance equal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), NormBlock(8), NormBlock(8), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds="hidden").step()
    assert model[0].out_features == 4 and model(x).shape == (2, 3)
    assert model[1].norm.hidden_size == model[2].norm.hidden_size == 4


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["cspresnet50", "darknet17", "mobilevitv2_050", "nf_resnet26",
                                  "poolformer_s12", "gmlp_ti16_224"])
def test_timm_models_with_these_patterns_prune(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 64} if name.startswith("gmlp") else {}  # token mixing fixes the size
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    n0 = count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    assert count_params(model) < 0.7 * n0
    y = model(x)
    assert y.shape == (1, 1000)
    y.sum().backward()
    model.train()
    model(torch.cat([x, x]))


class TiedEncoderDecoder(nn.Module):
    """T5's layout: encoder and decoder embeddings tied to one matrix; the encoder's states
    are an output (kept), the decoder's width could be pruned if the matrix were not shared."""

    def __init__(self):
        super().__init__()
        self.enc_emb, self.dec_emb = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.dec_emb.weight = self.enc_emb.weight
        self.enc, self.dec = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids, dec_ids):
        states = self.enc_emb(ids)
        states = states + self.enc(states)
        h = self.dec_emb(dec_ids)
        h = h + self.dec(torch.relu(h))
        return self.head(h), states


def test_layers_sharing_a_weight_share_its_channels():
    torch.manual_seed(0)
    model = TiedEncoderDecoder()
    x = (torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 3)))
    graph = cleanai.DependencyGraph(model, x)
    g = graph.group_of("dec_emb")[0]
    assert "enc_emb.out" in [f"{m.name}.{m.kind}" for m in g.members]
    assert bool(g.protected.all())  # the encoder's states are an output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    logits, states = model(*x)
    assert logits.shape == (2, 3, 20) and states.shape == (2, 5, 8)
    assert model.dec_emb.weight is model.enc_emb.weight


class Scale(nn.Module):
    """MetaFormer's layer scale: keeps the shape it views its parameter with."""

    def __init__(self, dim):
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale.view(self.shape)


def test_stored_view_shape_of_a_parameter_follows_and_replays(tmp_path):
    import json
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 1), Scale(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    model, x = make(), torch.randn(2, 3, 4, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model[1].shape == (8, 1, 1) and model[1].scale.shape == (8,)
    assert json.loads(json.dumps(pruner.history)) == pruner.history  # plain JSON
    fresh = make()
    cleanai.replay(fresh, json.loads(json.dumps(pruner.history[-1]["layers"])))
    assert fresh[1].shape == (8, 1, 1)
    torch.testing.assert_close(fresh(x), model(x))
    cleanai.save_pruned(pruner, tmp_path / "m")  # the shape is a list in the JSON file
    loaded = cleanai.load_pruned(make, tmp_path / "m")
    assert loaded[1].shape == (8, 1, 1)
    torch.testing.assert_close(loaded(x), model(x))


def _out_group(pruner, layer):
    return next(g for g in pruner.graph.groups
                if any(m.name == layer and m.kind == "out" for m in g.members))


class DetachedBranch(nn.Module):
    """A detector's region proposals: a head on shared features whose result is detached
    before it steers the output (here a gate), so no output depends on it through autograd."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 8, 1)
        self.proposals = nn.Conv2d(8, 2, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.feat(x))
        keep = (self.proposals(f).detach().sigmoid() > 0.5).float()[:, :1]
        return self.head(torch.relu(self.mid(f)) * keep)


def test_a_detached_branch_prunes_its_inputs_and_keeps_the_width_read_after_it():
    """The proposals conv reads ``feat`` like any layer (its input columns follow); its own
    output, read by ``detach()`` outside autograd, keeps its width."""
    torch.manual_seed(0)
    model, x = DetachedBranch().eval(), torch.randn(2, 3, 4, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not _out_group(pruner, "feat").protected.any()
    g = _out_group(pruner, "proposals")
    assert bool(g.protected.all()) and "detached branch" in next(iter(g.reasons))
    check_equivalence(model, pruner, x)
    assert model.feat.out_channels == model.proposals.in_channels == 4
    assert model.proposals.out_channels == 2 and model.mid.out_channels == 4


class DiscardedPooler(nn.Module):
    """A pooled output computed and dropped (CLIP's vision pooler under an image-classification
    head): its norm reads the hidden width and must be sliced with it."""

    def __init__(self):
        super().__init__()
        self.embed, self.post_norm = nn.Linear(3, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        self.post_norm(h[:, 0])  # computed, never used
        return self.head(h.mean(1))


class Result:
    """A plain object the trace cannot look into."""

    def __init__(self, logits, aux):
        self.logits, self.aux = logits, aux


KEPT_RESULTS = {  # a branch result that reaches no output through autograd but is used or held
    "read_in_a_list": lambda s, h: s.head(h) * torch.cat([s.side(h), s.side(h)], -1)
    .detach().norm(dim=-1, keepdim=True),
    "read_by_keyword": lambda s, h: s.head(h) * torch.sum(input=s.side(h), dim=-1,
                                                           keepdim=True).detach(),
    "stored_on_the_model": lambda s, h: (setattr(s, "features", s.side(h)), s.head(h))[1],
}


class SideBranch(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.inp, self.side, self.head = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.how == "returned_in_an_object":
            return Result(self.head(h), self.side(h))
        return KEPT_RESULTS[self.how](self, h)


@pytest.mark.parametrize("how", sorted(KEPT_RESULTS) + ["returned_in_an_object"])
def test_a_branch_result_used_or_held_outside_autograd_keeps_its_width(how):
    torch.manual_seed(0)
    model, x = SideBranch(how).eval(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    assert model.side.out_features == 16
    if how == "returned_in_an_object":  # no output the trace sees: nothing is cut
        assert model.head.out_features == 8 and model.inp.out_features == 32
    else:  # the width the branch reads is pruned with it
        assert model.inp.out_features == model.side.in_features == 16


def test_a_discarded_branch_follows_the_width_it_reads():
    torch.manual_seed(0)
    model, x = DiscardedPooler().eval(), torch.randn(2, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no unknown op
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
        assert not _out_group(pruner, "embed").protected.any()
        check_equivalence(model, pruner, x)
    assert model.post_norm.normalized_shape == (4,) and model.head.in_features == 4


class ScaledConcat(nn.Module):
    """A layer scale over the concatenation of two convs: two groups share its one dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.scale = Scale(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.scale(torch.cat([self.a(x), self.b(x)], 1))))


def test_stored_shape_over_several_groups_counts_every_removal():
    torch.manual_seed(0)
    model, x = ScaledConcat().eval(), torch.randn(2, 3, 4, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.scale.shape == (8, 1, 1) and model.a.out_channels == model.b.out_channels == 4


class FixedWidth(nn.Module):
    """Views its conv's output with a width kept under a name CleanAI does not know; only
    ``strict`` instances do, so siblings of one class may differ."""

    def __init__(self, c, strict):
        super().__init__()
        self.conv, self.width, self.strict = nn.Conv2d(c, c, 1), c, strict

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y.view(y.shape[0], self.width, *y.shape[2:]) if self.strict else y


@pytest.mark.parametrize("first_strict", [False, True])
def test_exactly_the_groups_a_failing_layer_breaks_are_protected(first_strict):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), FixedWidth(8, first_strict), nn.Conv2d(8, 8, 1),
                          FixedWidth(8, True), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cleanai.StructuredPruner(model, x, pruning_ratio=0.5).step()
    said = [str(w.message) for w in caught]
    assert model(x).shape == (1, 2, 4, 4)
    # a strict layer's own output keeps its width; its input and every other group are pruned
    assert model[3].conv.out_channels == 8 and model[2].out_channels == 4
    assert model[0].out_channels == 4
    assert model[1].conv.out_channels == (8 if first_strict else 4)
    assert len(said) == 1  # one failure site, one warning
    if first_strict:  # both strict layers fail on the same line: one warning names both
        assert said[0].startswith("Sequential no longer runs when groups 1 (8 channels: 1.conv "
                                  "and 1 more layer), 3 (8 channels: 3.conv and 1 more layer) "
                                  "lose channels: RuntimeError in 1 (FixedWidth) at ")
    else:
        assert said[0].startswith("Sequential no longer runs when group 3 (8 channels: 3.conv "
                                  "and 1 more layer) loses channels: RuntimeError in 3 "
                                  "(FixedWidth) at test_model_widths.py:")
