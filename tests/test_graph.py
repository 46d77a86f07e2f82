"""DependencyGraph on small hand-built models: exact groups, index maps, protection, robustness."""
import dataclasses
import sys
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cleanai

from conftest import (R, assert_maps_follow_dataflow, assert_well_formed, group_with, layout,
                      producers)


def build(model, *inputs, **kw):
    model.eval()
    x = inputs[0] if len(inputs) == 1 else inputs
    g = cleanai.DependencyGraph(model, x, **kw)
    g.model = model  # the graph refers to its model weakly; the tests inspect its layers
    return g


def assert_output_group(graph, name, size):
    g = group_with(graph, f"{name}.out")
    assert layout(g) == {f"{name}.out": R(size)}
    assert g.protected.all() and g.reasons == {"model output": size}


# --- hand-built models ---------------------------------------------------------------------

def test_conv_bn_relu_chain():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 1))
    x = torch.randn(1, 3, 8, 8)
    g = build(model, x)
    assert len(g.groups) == 2
    trunk = group_with(g, "0.out")
    assert layout(trunk) == {"0.out": R(4), "1.same": R(4), "3.in": R(4)}
    assert trunk.size == 4 and not trunk.protected.any() and trunk.reasons == {}
    assert trunk.constraints == [] and producers(g, trunk) == ["0"]
    assert_output_group(g, "3", 5)
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = (nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(3, 6),
                                             nn.Linear(6, 2))

    def forward(self, x):
        y = self.a(x)
        return self.head(y + self.c(torch.relu(self.b(y))))


def test_residual_mlp_couples_both_sides_of_the_add():
    model, x = ResidualMLP().eval(), torch.randn(2, 4)
    g = build(model, x)
    assert len(g.groups) == 3
    res = group_with(g, "a.out")
    assert layout(res) == {"a.out": R(6), "b.in": R(6), "c.out": R(6), "head.in": R(6)}
    assert sorted(producers(g, res)) == ["a", "c"] and not res.protected.any()
    hidden = group_with(g, "b.out")
    assert layout(hidden) == {"b.out": R(3), "c.in": R(3)} and not hidden.protected.any()
    assert_output_group(g, "head", 2)
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=6)


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample, then pool and classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(3, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = F.relu(y + self.down(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_resnet_basic_block_with_downsample():
    model, x = BasicBlock().eval(), torch.randn(1, 3, 8, 8)
    g = build(model, x)
    assert len(g.groups) == 3
    res = group_with(g, "conv2.out")
    assert layout(res) == {"conv2.out": R(6), "bn2.same": R(6), "down.0.out": R(6),
                           "down.1.same": R(6), "fc.in": R(6)}
    assert sorted(producers(g, res)) == ["conv2", "down.0"] and not res.protected.any()
    inner = group_with(g, "conv1.out")
    assert layout(inner) == {"conv1.out": R(4), "bn1.same": R(4), "conv2.in": R(4)}
    assert not inner.protected.any()
    assert_output_group(g, "fc", 2)
    # conv1 and down.0 read the model input: their inputs belong to no group
    assert not any(k in layout(grp) for grp in g.groups for k in ("conv1.in", "down.0.in"))
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=6)


class DenseNetLike(nn.Module):
    """stem(4) -> three dense layers growing the concat by 2, 3, 1 channels -> transition."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.l1, self.l2, self.l3 = nn.Conv2d(4, 2, 1), nn.Conv2d(6, 3, 1), nn.Conv2d(9, 1, 1)
        self.bn = nn.BatchNorm2d(10)
        self.trans = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = torch.cat([x, self.l3(x)], 1)
        return self.trans(F.relu(self.bn(x)))


def test_densenet_growing_concat_maps_each_range():
    model, x = DenseNetLike().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    assert len(g.groups) == 5
    n = None
    assert layout(group_with(g, "stem.out")) == {
        "stem.out": R(4), "l1.in": R(4), "l2.in": R(4) + [n] * 2, "l3.in": R(4) + [n] * 5,
        "bn.same": R(4) + [n] * 6, "trans.in": R(4) + [n] * 6}
    assert layout(group_with(g, "l1.out")) == {
        "l1.out": R(2), "l2.in": [n] * 4 + R(2), "l3.in": [n] * 4 + R(2) + [n] * 3,
        "bn.same": [n] * 4 + R(2) + [n] * 4, "trans.in": [n] * 4 + R(2) + [n] * 4}
    assert layout(group_with(g, "l2.out")) == {
        "l2.out": R(3), "l3.in": [n] * 6 + R(3),
        "bn.same": [n] * 6 + R(3) + [n], "trans.in": [n] * 6 + R(3) + [n]}
    assert layout(group_with(g, "l3.out")) == {
        "l3.out": [0], "bn.same": [n] * 9 + [0], "trans.in": [n] * 9 + [0]}
    assert_output_group(g, "trans", 5)
    assert not any(grp.protected.any() for grp in g.groups if "trans.out" not in layout(grp))
    assert {grp.id for grp in g.group_of("trans")} == {grp.id for grp in g.groups}
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], 1))


def test_cat_of_the_same_tensor_twice():
    model, x = CatTwice().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "b.in": R(4, reps=2)}
    assert grp.size == 4 and not grp.protected.any()
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


class CatBackAndForth(nn.Module):
    """A concat that returns to an earlier group: ``[b, a, b]``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        b = self.b(x)
        return self.c(torch.cat([b, self.a(x), b], 1))


def test_concat_returning_to_an_earlier_group_keeps_positions_in_order():
    model, x = CatBackAndForth().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    ga, gb = group_with(g, "a.out"), group_with(g, "b.out")
    c_a = next(m for m in ga.members if m.name == "c")
    c_b = next(m for m in gb.members if m.name == "c")
    assert (c_a.positions.tolist(), c_a.channels.tolist()) == ([3, 4], [0, 1])
    assert (c_b.positions.tolist(), c_b.channels.tolist()) == ([0, 1, 2, 5, 6, 7], R(3, reps=2))
    assert not c_a.identity and not c_b.identity
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=3)


class ChunkShared(nn.Module):
    """Chunk into 3 and run the same conv on every chunk."""

    def __init__(self):
        super().__init__()
        self.a, self.block, self.out = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.out(torch.cat([self.block(p) for p in self.a(x).chunk(3, 1)], 1))


def test_chunk_into_three_with_a_shared_block():
    model, x = ChunkShared().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    assert len(g.groups) == 3
    assert layout(group_with(g, "a.out")) == {"a.out": R(2, reps=3), "block.in": R(2)}
    assert layout(group_with(g, "block.out")) == {"block.out": R(2), "out.in": R(2, reps=3)}
    assert_output_group(g, "out", 3)
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=2)


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)  # 7x5 -> 5x3: 15 features per channel
        self.fc1, self.fc2 = nn.Linear(45, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1))))


def test_lenet_flatten_maps_feature_j_to_channel_j_div_hw():
    model, x = LeNet().eval(), torch.randn(2, 1, 7, 5)
    g = build(model, x)
    conv = group_with(g, "conv.out")
    assert layout(conv) == {"conv.out": R(3), "fc1.in": [j // 15 for j in range(45)]}
    assert layout(group_with(g, "fc1.out")) == {"fc1.out": R(8), "fc2.in": R(8)}
    assert_output_group(g, "fc2", 2)
    assert "15 per channel" in repr(conv)
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=3)


class SpatialCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], 2))  # along H: channels line up


def test_concat_on_a_spatial_dim_ties_channels_one_to_one():
    model, x = SpatialCat().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    assert len(g.groups) == 2
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "b.out": R(4), "out.in": R(4)}
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


def test_depthwise_conv_is_a_same_member():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    g = build(model, x)
    assert len(g.groups) == 2  # the depthwise conv creates no group of its own
    assert layout(group_with(g, "0.out")) == {"0.out": R(4), "1.same": R(4), "2.same": R(4),
                                              "3.in": R(4)}
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


def test_depthwise_conv_with_multiplier_repeats_each_input_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4),
                          nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    g = build(model, x)
    assert len(g.groups) == 2
    assert layout(group_with(g, "0.out")) == {
        "0.out": R(4), "1.in": R(4), "1.out": [0, 0, 1, 1, 2, 2, 3, 3],
        "2.in": [0, 0, 1, 1, 2, 2, 3, 3]}
    assert producers(g, group_with(g, "0.out")) == ["0"]
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=4)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # 2 in, 3 out per group
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(self.gconv(self.a(x)))


def test_grouped_conv_ties_the_same_position_in_every_block():
    model, x = Grouped().eval(), torch.randn(1, 3, 6, 6)
    g = build(model, x)
    assert len(g.groups) == 3
    ins = group_with(g, "a.out")
    # in_channels / groups = 2 channels; position j of each block of 2 is channel j
    assert ins.size == 2 and layout(ins) == {"a.out": R(2, reps=4), "gconv.in": R(2, reps=4)}
    outs = group_with(g, "gconv.out")
    assert outs.size == 3 and layout(outs) == {"gconv.out": R(3, reps=4),
                                               "head.in": R(3, reps=4)}
    for grp, side in ((ins, "(in)"), (outs, "(out)")):
        assert len(grp.constraints) == 1
        text = grp.constraints[0]
        assert "gconv" in text and "4 blocks" in text and side in text
        assert "tie: " + text in repr(grp)
    assert not ins.protected.any() and not outs.protected.any()
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=3)


def test_single_output_channel_conv_is_not_depthwise():
    # groups == in_channels == 1 and out == in: still an ordinary conv with its own group
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 3, 1))
    x = torch.randn(1, 3, 5, 5)
    g = build(model, x)
    assert len(g.groups) == 3
    assert layout(group_with(g, "0.out")) == {"0.out": [0], "1.in": [0]}
    assert layout(group_with(g, "1.out")) == {"1.out": [0], "2.in": [0]}
    assert all(m.kind != "same" for grp in g.groups for m in grp.members)
    assert_output_group(g, "2", 3)
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g)


class SEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.trunk(x)))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * gate)


def test_squeeze_excitation():
    """The gate multiplies trunk channel i by gate channel i: fc2's output is the trunk's
    channel set (tied), but the squeeze width (fc1 out / fc2 in) is a group of its own."""
    model, x = SEBlock().eval(), torch.randn(1, 3, 6, 6)
    g = build(model, x)
    assert len(g.groups) == 3
    trunk = group_with(g, "trunk.out")
    assert layout(trunk) == {"trunk.out": R(8), "bn.same": R(8), "fc1.in": R(8),
                             "fc2.out": R(8), "head.in": R(8)}
    squeeze = group_with(g, "fc1.out")
    assert layout(squeeze) == {"fc1.out": R(2), "fc2.in": R(2)}
    assert squeeze.id != trunk.id
    assert not trunk.protected.any() and not squeeze.protected.any()
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=8)


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(y)


def test_channel_shuffle_is_mapped_with_tied_halves():
    """The code maps the shuffle (it does not protect it): view(n, 2, 3) ties position j of the
    two halves, and after the transpose consumer position 2j, 2j+1 hold producer j and j+3."""
    model, x = ChannelShuffle().eval(), torch.randn(1, 3, 4, 4)
    g = build(model, x)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": [0, 1, 2, 0, 1, 2], "b.in": [0, 0, 1, 1, 2, 2]}
    assert not grp.protected.any()
    assert_well_formed(g)
    assert_maps_follow_dataflow(model, x, g, channels=3)


# --- inputs, outputs, state ----------------------------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x, y, scale=1.0):
        return self.head(self.a(x) + self.b(y)) * scale


def _summary(g):
    return sorted(sorted(layout(grp).items()) for grp in g.groups)


def test_inputs_as_tensor_tuple_and_dict():
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    by_tuple = build(TwoInputs(), x, y)
    by_dict = cleanai.DependencyGraph(TwoInputs(), {"y": y, "x": x, "scale": 2.0})
    by_fn = cleanai.DependencyGraph(TwoInputs(), (x, y), forward_fn=lambda m, i: m(*i, scale=3.0))
    expected = [[("a.out", R(4)), ("b.out", R(4)), ("head.in", R(4))], [("head.out", R(2))]]
    assert _summary(by_tuple) == _summary(by_dict) == _summary(by_fn) == expected
    single = cleanai.DependencyGraph(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), x)
    assert _summary(single) == [[("0.out", R(4)), ("1.in", R(4))], [("1.out", R(2))]]


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: tuple


Pair = namedtuple("Pair", "logits features")


class MultiOut(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        z = self.a(x)
        h = self.b(z)
        logits = self.head(h)
        return {"tuple": lambda: (logits, h), "dict": lambda: {"logits": logits, "h": h},
                "dataclass": lambda: Output(logits, (h,)), "namedtuple": lambda: Pair(logits, h),
                "tensor": lambda: logits}[self.kind]()


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "dataclass", "namedtuple"])
def test_every_output_tensor_is_protected(kind):
    g = build(MultiOut(kind), torch.randn(2, 3))
    hidden, inner = group_with(g, "b.out"), group_with(g, "a.out")
    assert_output_group(g, "head", 2)
    assert not inner.protected.any()
    if kind == "tensor":
        assert not hidden.protected.any()
    else:  # the hidden state handed to the caller is part of the model's contract
        assert hidden.protected.all() and hidden.reasons == {"model output": 5}


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.bn_cma = nn.BatchNorm2d(4, momentum=None)  # cumulative average
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.drop(self.bn_cma(F.relu(self.bn(self.conv(x))))))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_building_leaves_the_model_exactly_as_it_was(mode):
    torch.manual_seed(0)
    model = Stateful().train(mode == "train")
    model.bn_cma.eval()
    model.conv.weight.requires_grad_(False)
    before = _snapshot(model)
    x = torch.randn(2, 3, 6, 6)
    x_before = x.clone()
    torch.manual_seed(7)
    expected_draw = torch.rand(5)
    torch.manual_seed(7)
    g = cleanai.DependencyGraph(model, x)
    assert torch.equal(torch.rand(5), expected_draw), "the global RNG moved"
    after = _snapshot(model)
    assert after[1] == before[1], "train/eval flags changed"
    assert after[2] == before[2], "requires_grad flags changed"
    assert after[0].keys() == before[0].keys()
    for k, v in before[0].items():  # parameters and buffers (BN running stats, batch count)
        assert torch.equal(after[0][k], v), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad_fn is None
    assert len(g.groups) == 2
    if mode == "train":  # not vacuous: a plain forward of this model does move the stats
        model(x)
        assert not torch.equal(model.bn.running_mean, before[0]["bn.running_mean"])
        assert int(model.bn.num_batches_tracked) == 1


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.bn(x))  # last dim is 4, fc wants 5


def test_failing_forward_raises_trace_error_naming_model_and_cause():
    model = Broken().train()
    stats = model.bn.running_mean.clone()
    with pytest.raises(cleanai.TraceError) as info:
        cleanai.DependencyGraph(model, torch.randn(2, 3, 4, 4))
    msg = str(info.value)
    original = info.value.__cause__
    assert isinstance(original, RuntimeError) and str(original) in msg
    assert "Broken" in msg and "mat1 and mat2" in msg
    assert "(2, 3, 4, 4)" in msg  # the example input's shape
    # and the failed run left nothing behind
    assert torch.equal(model.bn.running_mean, stats) and int(model.bn.num_batches_tracked) == 0
    assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks
                                  for m in model.modules())


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        cleanai.DependencyGraph(lambda x: x, torch.randn(1))


class Deep(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.stem = nn.Linear(3, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
                                    for _ in range(n))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x)


def test_300_block_model_builds_without_recursion():
    # the walk must be iterative: ~1200 autograd nodes deep, the limit lowered well below that
    limit = sys.getrecursionlimit()
    model = Deep(300).eval()
    try:
        sys.setrecursionlimit(400)
        g = cleanai.DependencyGraph(model, torch.randn(2, 3))
    finally:
        sys.setrecursionlimit(limit)
    assert len(g.groups) == 2
    stream = group_with(g, "stem.out")
    assert stream.size == 8 and len(producers(g, stream)) == 301
    assert sum(m.kind == "same" for m in stream.members) == 300
    assert all(layout(stream)[f"blocks.{i}.{j}"] == R(8) for i in (0, 150, 299)
               for j in ("0.in", "0.out", "1.same"))
    assert_output_group(g, "head", 2)


def test_to_dot_lists_every_layer_and_its_edges():
    model = BasicBlock()
    g = build(model, torch.randn(1, 3, 8, 8))
    dot = g.to_dot()
    lines = dot.strip().splitlines()
    assert lines[0].startswith("digraph") and lines[0].endswith("{") and lines[-1] == "}"
    assert dot.count("{") == dot.count("}") == 1
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d,
                                                                     nn.Linear))]
    nodes = {ln.split('"')[1] for ln in lines if "[label=" in ln}
    assert nodes == set(layers)
    edges = {tuple(ln.strip().rstrip(";").replace('"', "").split(" -> ")) for ln in lines
             if "->" in ln}
    assert edges == {("conv1", "bn1"), ("bn1", "conv2"), ("conv2", "bn2"), ("bn2", "fc"),
                     ("down.0", "down.1"), ("down.1", "fc")}
    assert all(a in nodes and b in nodes for a, b in edges)


def test_print_mentions_every_group_and_member():
    g = build(DenseNetLike(), torch.randn(1, 3, 4, 4))
    text = str(g)
    assert text.splitlines()[0].startswith("DependencyGraph(DenseNetLike")
    for grp in g.groups:
        assert f"Group {grp.id}: {grp.size} channels" in text
        for m in grp.members:
            assert f"{m.name}.{m.kind}" in text
    assert "protected 5: model output" in text


def test_group_of_accepts_names_and_modules():
    model = ResidualMLP()
    g = build(model, torch.randn(2, 4))
    assert [grp.id for grp in g.group_of("b")] == [grp.id for grp in g.group_of(model.b)]
    assert {grp.id for grp in g.group_of("b")} == {group_with(g, "b.out").id,
                                                   group_with(g, "b.in").id}
    with pytest.raises(KeyError, match="nope"):
        g.group_of("nope")
    with pytest.raises(KeyError):
        g.group_of(nn.Linear(1, 1))


# --- known bugs ----------------------------------------------------------------------------

class FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.head = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        with torch.no_grad():  # a frozen feature extractor: legal, common
            x = self.stem(x)
        return self.head(self.a(x))


def test_forward_with_a_no_grad_region_builds():
    g = build(FrozenStem(), torch.randn(1, 3, 4, 4))
    assert layout(group_with(g, "a.out")) == {"a.out": R(4), "head.in": R(4)}


def test_building_under_inference_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    with torch.inference_mode():
        g = cleanai.DependencyGraph(model, torch.randn(1, 3, 4, 4))
    assert layout(group_with(g, "0.out")) == {"0.out": R(4), "1.in": R(4)}


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x.sub_(0.5)  # normalise in place: fine in plain eval
        return self.head(self.a(x))


def test_forward_that_modifies_its_input_in_place_builds():
    model = InPlaceInput().eval()
    x = torch.randn(1, 3, 4, 4)
    model(x.clone())  # the model itself is fine
    g = cleanai.DependencyGraph(model, x)
    assert layout(group_with(g, "a.out")) == {"a.out": R(4), "head.in": R(4)}


def test_reshape_ties_are_listed_as_constraints():
    g = build(ChannelShuffle(), torch.randn(1, 3, 4, 4))
    grp = group_with(g, "a.out")
    assert grp.size == 3 and len(grp.constraints) == 1
    assert "tie: " in repr(grp)


def test_union_all_ties_the_same_sets_as_pair_by_pair_unions():
    # the vectorised path (every pair links two separate sets) and the pair-by-pair path
    # must give the same partition and set sizes as one union per pair
    import random

    from cleanai.core.slots import UnionFind

    def partition(uf):
        sets = {}
        for i, r in enumerate(uf.roots().tolist()):
            sets.setdefault(r, []).append(i)
        assert all(uf.size[r] == len(members) for r, members in sets.items())
        return sorted(map(tuple, sets.values()))

    for seed in range(200):
        rnd = random.Random(seed)
        fast, slow, n = UnionFind(), UnionFind(), rnd.randint(1, 40)
        fast.new(n), slow.new(n)
        for _ in range(rnd.randint(1, 10)):
            m = rnd.randint(1, n)
            a = torch.tensor([rnd.randrange(n) for _ in range(m)])
            b = torch.randperm(n)[:m] if rnd.random() < 0.5 else \
                torch.tensor([rnd.randrange(n) for _ in range(m)])
            fast.union_all(a, b)
            for x, y in zip(a.tolist(), b.tolist()):
                slow.union(x, y)
        assert partition(fast) == partition(slow), seed


class _Stream(nn.Module):
    """Two blocks joined to a 16-wide stream by ``join``: a residual written in several ways,
    or a product (a gate)."""

    JOINS = {
        "add": lambda x, y: x + y,
        "stack and sum": lambda x, y: torch.stack([x, y]).sum(0),
        "F.linear bias": None,  # the residual passed as the bias of the block's last layer
        "where": lambda x, y: torch.where(x > 0, x, y),
        "product": lambda x, y: x * y,
    }

    def __init__(self, join):
        super().__init__()
        self.join = join
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        self.fc1 = nn.ModuleList([nn.Linear(16, 32) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(32, 16) for _ in range(2)])

    def forward(self, x):
        x = self.inp(x)
        for fc1, fc2 in zip(self.fc1, self.fc2):
            h = torch.relu(fc1(x))
            if self.join == "F.linear bias":
                x = torch.nn.functional.linear(h, fc2.weight, x)
            else:
                x = self.JOINS[self.join](x, fc2(h))
        return self.head(x)


@pytest.mark.parametrize("join", sorted(_Stream.JOINS))
def test_a_width_shared_by_additions_is_hidden_and_by_products_channels(join):
    graph = cleanai.DependencyGraph(_Stream(join).eval(), torch.randn(3, 8))
    (stream,) = [g for g in graph.groups if g.size == 16]
    assert stream.kind == ("channels" if join == "product" else "hidden")
