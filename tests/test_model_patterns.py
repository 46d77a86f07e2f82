"""Ops met in real models (timm, torchvision, Hugging Face) that the tracer must follow or
protect: in-place activations and adds, sliding and token-mixing layers, custom autograd
activations, unfolds, RoI pooling, weight-standardised convs, outputs that are views."""
import warnings

import pytest
import torch
from torch import nn

import cleanai

from conftest import Double, layout
from equivalence import check_equivalence


class InplaceActs(nn.Module):
    """Darknet-style conv + BN + in-place LeakyReLU / ELU / threshold."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = nn.functional.leaky_relu(self.b1(self.c1(x)), 0.1, inplace=True)
        x = nn.functional.elu(self.b2(self.c2(x)), inplace=True)
        x = nn.functional.threshold(self.c3(x), 0.0, 0.0, inplace=True)
        return self.head(x)


def test_inplace_activations_are_followed_exactly():
    torch.manual_seed(0)
    model = InplaceActs().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    inner = [g for g in pruner.graph.groups if "head.out" not in [f"{m.name}.{m.kind}" for m in g.members]]
    assert len(inner) == 3 and not any(bool(g.protected.any()) for g in inner)
    check_equivalence(model, pruner, x)
    assert model.c1.out_channels == model.c2.out_channels == model.c3.out_channels == 8


class Ghost(nn.Module):
    """GhostNet's module: a conv, a cheap depthwise conv of its output, both concatenated and
    sliced back to ``out_chs`` (here all of them), then a shortcut added in place into that
    slice: autograd records an in-place add on a view of the whole concatenation."""

    def __init__(self, c, out_chs):
        super().__init__()
        self.out_chs = out_chs
        self.primary = nn.Conv2d(c, out_chs // 2, 1)
        self.cheap = nn.Conv2d(out_chs // 2, out_chs // 2, 3, padding=1, groups=out_chs // 2)
        self.shortcut = nn.Conv2d(c, out_chs, 1)

    def forward(self, x):
        x1 = self.primary(x)
        y = torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out_chs]
        y += self.shortcut(x)
        return y


def test_in_place_add_into_a_full_slice_is_followed_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Ghost(8, 16), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any(bool(g.protected.any()) for g in pruner.graph.groups
                   if g.reasons.get("model output") is None)
    check_equivalence(model, pruner, x)
    assert model[1].shortcut.out_channels == 8 and model[1].primary.out_channels == 4


def test_in_place_add_into_part_of_a_tensor_is_protected():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.a(x)
            y[:, :4] += self.b(x)
            return y
    model = nn.Sequential(Partial(), nn.Conv2d(8, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = cleanai.DependencyGraph(model, torch.randn(1, 3, 4, 4))
    g = graph.group_of("0.a")[0]
    assert bool(g.protected.all()) and "fixed range" in next(iter(g.reasons))
    assert layout(g)["1.in"] == list(range(8))  # a's channels 0-3 are read too: a + b there


class ECA(nn.Module):
    """Efficient channel attention: a one-channel Conv1d slides along the pooled channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


def test_conv_sliding_along_channels_lets_them_be_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ECA(), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    g = pruner.graph.group_of("0")[0]
    assert g.size == 16 and not bool(g.protected.any())
    pruner.step()
    assert model[0].out_channels == model[3].in_channels == 8
    assert model[1].conv.weight.shape == (1, 1, 3)  # the sliding conv itself is unchanged
    # the gate of each kept channel is computed from the kept channels alone
    h = model[0](x)
    gate = torch.sigmoid(model[1].conv(h.mean((2, 3)).unsqueeze(1))).view(2, -1, 1, 1)
    torch.testing.assert_close(model[1](h), h * gate)
    model(x).sum().backward()


class MixerBlock(nn.Module):
    """MLP-Mixer without norms: a token-mixing MLP runs over ``x.transpose(1, 2)``, so the
    channels sit on a batch dim of its Linears; then a channel MLP."""

    def __init__(self, tokens, dim):
        super().__init__()
        self.tok1, self.tok2 = nn.Linear(tokens, 12), nn.Linear(12, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):  # [B, tokens, dim]
        x = x + self.tok2(torch.relu(self.tok1(x.transpose(1, 2)))).transpose(1, 2)
        return x + self.ch2(torch.relu(self.ch1(x)))


class TinyMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(MixerBlock(9, 16), MixerBlock(9, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_channels_pass_through_a_linear_that_mixes_tokens_exactly():
    torch.manual_seed(0)
    model = TinyMixer().eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    hidden = pruner.graph.group_of("embed")[0]
    assert hidden.size == 16 and not bool(hidden.protected.any())
    check_equivalence(model, pruner, x)
    assert model.embed.out_channels == 8 and model.blocks[0].ch1.in_features == 8
    assert model.blocks[0].tok1.in_features == 9  # the tokens stay


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ghostnet_050", "darknet17", "dla34", "hrnet_w18_small",
                                  "dpn48b", "selecsls42b",
                                  # these fall back: splits of sizes fixed in their code
                                  "cspresnet50", "res2net50_14w_8s"])
def test_timm_cnn_families_prune_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    for m in model.modules():  # statistics that would show a channel mapped to the wrong one
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x, atol=1e-4)


class CustomActs(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.act.apply(self.a(x)))


def test_known_custom_autograd_activations_are_followed_and_others_protected():
    activations_me = pytest.importorskip("timm.layers.activations_me")
    x = torch.randn(2, 3, 4, 4)
    for act, followed in ((activations_me.SwishAutoFn, True), (activations_me.HardMishAutoFn, True),
                          (Double, False)):
        torch.manual_seed(0)
        model = CustomActs(act).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
        g = pruner.graph.group_of("a")[0]
        if followed:
            assert not bool(g.protected.any())
            check_equivalence(model, pruner, x)
            assert model.a.out_channels == 4
        else:
            assert bool(g.protected.all()) and "DoubleBackward" in next(iter(g.reasons))
            assert any("DoubleBackward" in str(w.message) for w in caught)


class Unfolds(nn.Module):
    """Windows cut with ``Tensor.unfold`` (HaloNet) and ``F.unfold`` (VOLO's outlook)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h.unfold(2, 3, 1).unfold(3, 3, 1).mean((-1, -2))  # [B, 8, H-2, W-2]
        h = torch.relu(self.b(h))
        cols = nn.functional.unfold(h, 2, stride=2)  # [B, 6 * 4, L]
        return self.fc(cols.transpose(1, 2))


def test_unfolded_windows_keep_their_channels_exactly():
    torch.manual_seed(0)
    model = Unfolds().eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any(bool(g.protected.any()) for g in pruner.graph.groups
                   if "model output" not in g.reasons)
    check_equivalence(model, pruner, x)
    assert model.a.out_channels == 4 and model.b.out_channels == 3 and model.fc.in_features == 12


class NchwPositions(nn.Module):
    """PiT / Visformer: a ``[1, C, H, W]`` position embedding added to a conv's output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 8, 3, 3))
        self.mid = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.embed(x) + self.pos)))


def test_position_embedding_spanning_the_channels_is_sliced_with_them():
    """The embedding's ids went to W (its last dim of size > 1); the add ties its dim 1 to the
    conv's channels, so it is cut with them (it used to keep them, PiT 0.8% protected)."""
    torch.manual_seed(0)
    model, x = NchwPositions(), torch.randn(2, 3, 6, 6)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.embed.out_channels == 4 and model.pos.shape == (1, 4, 3, 3)
    assert model.mid.out_channels == 8 and model(x).shape == (2, 4, 3, 3)


def test_weight_standardized_convs_prune_with_their_gains():
    std_conv = pytest.importorskip("timm.layers.std_conv")
    torch.manual_seed(0)
    model = nn.Sequential(std_conv.ScaledStdConv2d(3, 16, 3, padding=1), nn.ReLU(),
                          std_conv.StdConv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not any("ConvolutionBackward0" in str(w.message) for w in caught)
    scores = model[0].gain.detach().flatten().clone()
    pruner.step()
    assert model[0].weight.shape == (8, 3, 3, 3) and model[0].gain.shape == (8, 1, 1, 1)
    assert model[2].weight.shape == (8, 8, 3, 3) and model[4].in_channels == 8
    assert set(model[0].gain.flatten().tolist()) <= set(scores.tolist())
    y = model(x)
    assert y.shape == (2, 4, 8, 8) and bool(torch.isfinite(y).all())


def test_roi_align_keeps_channels_exactly():
    ops = pytest.importorskip("torchvision.ops")

    class RoiHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 2 * 2, 5)

        def forward(self, x):
            boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 2.0, 2.0, 7.0, 7.0]])
            f = torch.relu(self.backbone(x))
            return self.fc(torch.cat([ops.roi_align(f, boxes, 2),
                                      ops.roi_pool(f, boxes, 2)]).flatten(1))

    torch.manual_seed(0)
    model, x = RoiHead().eval(), torch.randn(2, 3, 8, 8)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not bool(pruner.graph.group_of("backbone")[0].protected.any())
    check_equivalence(model, pruner, x)
    assert model.backbone.out_channels == 4 and model.fc.in_features == 16


class GatherIntoZeros(nn.Module):
    """MultiScaleRoIAlign's assembly: rows written into a zero tensor made with the channel
    count read at run time (``out[idx] = rows``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.a(x))
        out = torch.zeros(3, f.shape[1], *f.shape[2:])
        out[torch.tensor([0, 2])] = f
        return self.b(out)


def test_rows_written_into_a_run_time_tensor_keep_their_channels_exactly():
    torch.manual_seed(0)
    model, x = GatherIntoZeros().eval(), torch.randn(2, 3, 4, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not bool(pruner.graph.group_of("a")[0].protected.any())
    check_equivalence(model, pruner, x)
    assert model.a.out_channels == 4


def test_norm_whose_output_is_a_view_then_changed_in_place_is_pruned():
    """``InstanceNorm2d`` returns a view; ``ReLU(inplace=True)`` after it gives that view a new
    autograd node: the norm must still be found, and sliced with its conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.InstanceNorm2d(8, affine=True),
                          nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert "1.same" in [f"{m.name}.{m.kind}" for m in pruner.graph.group_of("0")[0].members]
    check_equivalence(model, pruner, x)
    assert model[1].num_features == model[1].weight.shape[0] == 4


def test_linear_on_tokens_then_in_place_relu_is_pruned_exactly():
    """A Linear on ``[B, N, C]`` returns a view too: ``ReLU(inplace=True)`` after it must not
    hide the layer (its neurons were kept before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5, 4)
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not bool(pruner.graph.group_of("0")[0].protected.any())
    check_equivalence(model, pruner, x)
    assert model[0].out_features == model[2].in_features == 4


class CachedBias(nn.Module):
    """LeViT's attention bias: a table indexed by a long buffer, cached in eval mode and
    recomputed in train mode; after an eval forward the trace only sees the table in train."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.table = nn.Parameter(torch.randn(c, 3))
        self.register_buffer("idx", torch.tensor([0, 2, 1, 1]), persistent=False)
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x):
        if self.training or "bias" not in self.cache:
            bias = self.table[:, self.idx]
            if self.training:
                return self.conv(x) + bias.view(1, -1, 2, 2)
            self.cache["bias"] = bias
        return self.conv(x) + self.cache["bias"].view(1, -1, 2, 2)


def test_index_buffer_read_by_a_train_mode_trace_is_left_unwritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), CachedBias(8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 2, 2)
    with torch.no_grad():
        model(x)  # fills the cache: the eval forward reads no table
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.step()
    assert model[0].out_channels == model[1].conv.in_channels == 4
    assert model(x).shape == (1, 2, 2, 2)
