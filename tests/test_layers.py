"""Every layer family prunes to a consistent, runnable layer; exact where the math allows."""
import pytest
import torch
from torch import nn

from cleanai import StructuredPruner, register_layer_pruner
from cleanai.core.layers import LayerPruner
from cleanai.importance import RandomImportance

from equivalence import check_equivalence


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.PReLU(16),
                                  nn.Conv1d(16, 12, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12 * 10, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class Conv3dNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                         nn.Conv3d(8, 8, 1), nn.ReLU(), nn.Conv3d(8, 2, 1))


class TransposeNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1), nn.BatchNorm2d(12),
                         nn.ReLU(), nn.ConvTranspose2d(12, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.Conv2d(8, 3, 1))


class GroupedNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1, groups=32), nn.ReLU(),  # depthwise x2
                         nn.Conv2d(64, 5, 1))


EXACT = [(Conv1dNet, (2, 4, 10)), (Conv3dNet, (1, 2, 4, 6, 6)), (TransposeNet, (2, 3, 8, 8)),
         (GroupedNet, (2, 3, 8, 8))]


@pytest.mark.parametrize("cls, shape", EXACT, ids=[c.__name__ for c, _ in EXACT])
def test_zero_weight_equivalence_per_layer_family(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    pruner = StructuredPruner(model, x, importance=RandomImportance(seed=0), pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            w_in = m.weight.shape[0 if isinstance(m, nn.ConvTranspose2d) else 1] * \
                (m.groups if not isinstance(m, nn.ConvTranspose2d) else 1)
            assert w_in == m.in_channels and m.in_channels % m.groups == 0
            assert m.out_channels % m.groups == 0


def test_grouped_and_depthwise_attributes():
    model = GroupedNet().eval()
    StructuredPruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=0.5).prune()
    grouped, depthwise = model[2], model[5]
    assert grouped.groups == 4 and grouped.in_channels == 8 and grouped.out_channels == 16
    assert grouped.weight.shape == (16, 2, 3, 3)
    assert depthwise.groups == depthwise.in_channels == 16 and depthwise.out_channels == 32
    assert model[3].num_features == 16 and model[3].running_mean.shape == (16,)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 24)
        self.ln = nn.LayerNorm(24)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 12, 1)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.out = nn.Linear(24 + 12, 4)

    def forward(self, ids, img):
        t = self.ln(torch.relu(self.fc1(self.emb(ids)))).mean(1)
        v = self.inorm(self.conv2(torch.relu(self.gn(self.conv(img))))).mean((2, 3))
        return self.out(torch.cat([t, v], 1))


def test_norms_and_embedding_prune_consistently():
    torch.manual_seed(0)
    model = NormNet()
    inputs = (torch.randint(0, 50, (2, 7)), torch.randn(2, 3, 8, 8))
    StructuredPruner(model, inputs, pruning_ratio=0.5).prune()
    assert model.emb.embedding_dim == 16 and model.emb.weight.shape == (50, 16)
    assert model.fc1.in_features == 16 and model.fc1.out_features == 12
    assert model.ln.normalized_shape == (12,) and model.ln.weight.shape == (12,)
    assert model.gn.num_channels == 8 and model.gn.num_groups == 4 and model.gn.weight.shape == (8,)
    assert model.inorm.num_features == 6 and model.inorm.weight.shape == (6,)
    assert model.out.in_features == 18 and model.out.out_features == 4
    out = model(*inputs)
    out.sum().backward()
    assert out.shape == (2, 4)


class Scale(nn.Module):
    """A custom layer: y = x * s per channel."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


def test_custom_layer_pruner_registration():
    class ScalePruner(LayerPruner):
        def coupling(self, m):
            return "same"

        def in_channels(self, m):
            return m.s.numel()

        out_channels = in_channels

        def prune(self, m, in_keep, out_keep):
            m.s.data = m.s.data[in_keep]

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(8), nn.Conv2d(8, 2, 1))
    register_layer_pruner(Scale, ScalePruner())
    StructuredPruner(model, torch.randn(1, 3, 4, 4), pruning_ratio=0.5).prune()
    assert model[1].s.shape == (4,) and model[2].in_channels == 4
    with pytest.raises(TypeError, match="LayerPruner instance"):
        register_layer_pruner(Scale, object())


class _BatchNormAct(nn.BatchNorm2d):
    """A norm + activation layer with its own forward (the shape timm's BatchNormAct2d has)."""

    def forward(self, x):
        return torch.relu(nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps))


class _GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return torch.relu(nn.functional.group_norm(x, self.num_groups, self.weight, self.bias,
                                                   self.eps))


def test_norm_subclasses_with_their_own_forward_prune():
    # followed through F.batch_norm / F.group_norm: weights, biases and running statistics shrink
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), _BatchNormAct(16), nn.Conv2d(16, 16, 3),
                          _GroupNormAct(4, 16), nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    check_equivalence(model, StructuredPruner(model, x, pruning_ratio=0.5,
                                              layer_pruning_ratios={"2": 0.0}), x)
    bn = model[1]
    assert bn.num_features == bn.weight.shape[0] == bn.running_mean.shape[0] == 8
    StructuredPruner(model, x, pruning_ratio=0.5, layer_pruning_ratios={"0": 0.0}).prune()
    gn = model[3]
    assert gn.weight.shape[0] == model[2].out_channels == 8 and gn.num_channels == 8
    assert model(x).shape == (2, 4, 8, 8)
