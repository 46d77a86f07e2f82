"""count_macs of recurrent layers, which run as fused kernels the flop counter cannot see."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from cleanai.utils import count_macs
from cleanai.utils.report import snapshot


def by_hand(gates, input_size, hidden, layers=1, bidirectional=False, proj=0):
    """Per step: each layer and direction multiplies x by W_ih [gates*H, in], h by
    W_hh [gates*H, H_out] and, with a projection, the new h by W_hr [P, H]."""
    dirs = 2 if bidirectional else 1
    out = proj or hidden
    total = 0
    for layer in range(layers):
        n_in = input_size if layer == 0 else out * dirs
        total += dirs * (gates * hidden * (n_in + out) + hidden * proj)
    return total


@pytest.mark.parametrize("make, gates, kw", [
    (nn.LSTM, 4, {}),
    (nn.LSTM, 4, {"num_layers": 2, "bidirectional": True, "proj_size": 7}),
    (nn.GRU, 3, {"num_layers": 2}),
    (nn.RNN, 1, {"bidirectional": True, "nonlinearity": "relu"}),
])
def test_recurrent_layer_macs_match_a_hand_count(make, gates, kw):
    seq, batch = 5, 3
    layer = make(10, 20, batch_first=True, **kw)
    expected = seq * batch * by_hand(gates, 10, 20, kw.get("num_layers", 1),
                                     kw.get("bidirectional", False), kw.get("proj_size", 0))
    assert count_macs(layer, torch.randn(batch, seq, 10)) == expected
    # an unbatched sequence is one sequence
    assert count_macs(layer, torch.randn(seq, 10)) == expected // batch


def test_packed_sequence_counts_real_steps_and_layers_around_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(10, 20), nn.Linear(20, 4)

        def forward(self, x, lengths):
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
            return self.head(h[-1])

    lengths = torch.tensor([5, 2, 3])
    macs = count_macs(Net(), (torch.randn(5, 3, 10), lengths))
    assert macs == 10 * by_hand(4, 10, 20) + 3 * 20 * 4


def test_cells_and_snapshot_agree():
    cell = nn.LSTMCell(10, 20)
    assert count_macs(cell, torch.randn(3, 10)) == 3 * 4 * 20 * (10 + 20)
    lstm = nn.LSTM(10, 20, proj_size=5)  # not fused on CPU: the counter sees its products
    expected = 3 * by_hand(4, 10, 20, proj=5)
    assert count_macs(lstm, torch.randn(3, 10)) == expected
    assert count_macs(lstm, torch.randn(3, 10), forward_fn=lambda m, x: m(input=x)) == expected
    model = nn.Sequential(nn.Linear(6, 10), nn.GRU(10, 20, batch_first=True))
    x = torch.randn(2, 4, 6)
    snap = snapshot(model, x, forward_fn=lambda m, x: m(x)[0], latency=False)
    gru = 2 * 4 * by_hand(3, 10, 20)
    assert snap.layers["1"].macs == gru
    assert snap.macs == count_macs(model, x, forward_fn=lambda m, x: m(x)[0]) == gru + 2 * 4 * 60
