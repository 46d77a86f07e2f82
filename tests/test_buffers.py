"""Buffers an element-wise op applies along the channels (a sinusoidal position table added to
the embeddings, a fixed per-channel gain) are sliced with those channels, as a bare parameter
is; a buffer read any other way keeps the channels it meets."""
import math

import pytest
import torch
from torch import nn

import cleanai
from equivalence import check_equivalence


def sinusoids(n, d):
    pos = torch.arange(n).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return table


class WithTables(nn.Module):
    def __init__(self, read_elsewhere=False):
        super().__init__()
        self.read_elsewhere = read_elsewhere
        self.emb = nn.Embedding(50, 16)
        self.register_buffer("pe", sinusoids(64, 16))
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 16), persistent=False)
        self.fc, self.out = nn.Linear(16, 12), nn.Linear(12, 5)

    def forward(self, ids):
        h = (self.emb(ids) + self.pe[:ids.shape[1]]) * self.gain
        if self.read_elsewhere:
            h = h / self.pe.abs().sum()  # a value of the whole table: slicing it would move it
        return self.out(torch.relu(self.fc(h)))


def hidden(graph):
    return next(g for g in graph.groups if any(m.name == "emb" for m in g.members))


def test_buffers_along_the_channels_are_sliced_with_them(tmp_path):
    torch.manual_seed(0)
    model, x = WithTables(), torch.randint(0, 50, (2, 7))
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    g = hidden(pruner.graph)
    assert not g.protected.any()
    assert {(m.name, m.kind, m.dim) for m in g.members} >= {("pe", "param", 1),
                                                           ("gain", "param", 0)}
    check_equivalence(model, pruner, x)
    assert model.pe.shape == (64, 8) and model.gain.shape == (8,) and model.fc.in_features == 8
    cleanai.save_pruned(model, tmp_path)
    again = cleanai.load_pruned(WithTables(), tmp_path)
    assert torch.equal(again.pe, model.pe) and torch.equal(again.gain, model.gain)
    torch.testing.assert_close(again(x), model(x))


def test_a_buffer_read_otherwise_keeps_its_channels():
    torch.manual_seed(0)
    model, x = WithTables(read_elsewhere=True), torch.randint(0, 50, (2, 7))
    g = hidden(cleanai.DependencyGraph(model, x))
    assert g.protected.all()
    assert not any(m.name == "pe" for m in g.members)


@pytest.mark.parametrize("train", [False, True])
def test_the_pytorch_tutorial_transformer_prunes_its_model_width(train):
    # nn.TransformerEncoder behind a PositionalEncoding buffer of shape [max_len, 1, d_model]
    class PositionalEncoding(nn.Module):
        def __init__(self, d, n=64):
            super().__init__()
            self.register_buffer("pe", sinusoids(n, d).unsqueeze(1))

        def forward(self, x):
            return x + self.pe[:x.size(0)]

    class TutorialModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(50, 32), PositionalEncoding(32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(32, 50)

        def forward(self, src):
            return self.out(self.enc(self.pos(self.emb(src) * math.sqrt(32))))

    torch.manual_seed(0)
    model, x = TutorialModel().train(train), torch.randint(0, 50, (10, 2))
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert not hidden(pruner.graph).protected.any()
    pruner.step()
    assert model.pos.pe.shape == (64, 1, 16) and model.emb.embedding_dim == 16
    assert model(x).shape == (10, 2, 50)


OTHER_USES = {  # each adds a use of ``gain`` that slicing it along the channels would change
    "scalar product": lambda s, h: (s.alpha * s.gain).sum(),
    "a copy": lambda s, h: s.gain.to(torch.float64).sum().float(),
    "in a list": lambda s, h: torch.cat([s.gain, s.gain]).sum(),
    "along another dim": lambda s, h: (h.sum(-1, keepdim=True) * s.gain[:4]).sum(),
    "its size": lambda s, h: float(s.gain.shape[0]),
}


class GainUsedTwice(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.use = use
        self.fc = nn.Linear(6, 16)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc(x) * self.gain
        return self.out(h) + self.use(self, h)


@pytest.mark.parametrize("use", sorted(OTHER_USES))
def test_a_buffer_used_otherwise_is_never_sliced(use):
    torch.manual_seed(0)
    model, x = GainUsedTwice(OTHER_USES[use]), torch.randn(3, 6)
    dense = model(x).detach()
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5, kinds=["channels"]).step()
    assert model.gain.shape == (16,) and model.fc.out_features == 16
    torch.testing.assert_close(model(x), dense)
