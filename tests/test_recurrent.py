"""nn.RNN, nn.LSTM, nn.GRU and their cells: hidden units prune with every gate aligned."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import cleanai
from cleanai import StructuredPruner
from cleanai.importance import WeightActivationImportance
from cleanai.pruner.apply import layer_keeps
from cleanai.utils import count_params

from equivalence import check_equivalence


class Classifier(nn.Module):
    """Linear -> recurrent layer -> Linear on the last step (``out[:, -1]``) or the last
    layer's final state (``h[-1]``)."""

    def __init__(self, rnn=nn.LSTM, hidden=12, layers=2, bidirectional=True, batch_first=True,
                 read="out", proj_size=0):
        super().__init__()
        kw = {"proj_size": proj_size} if proj_size else {}
        self.embed = nn.Linear(5, 8)
        self.rnn = rnn(8, hidden, layers, batch_first=batch_first, bidirectional=bidirectional, **kw)
        width = proj_size or hidden
        self.fc = nn.Linear(width * (2 if bidirectional and read == "out" else 1), 3)
        self.read = read

    def forward(self, x):
        out, state = self.rnn(self.embed(x))
        if self.read == "h":
            h = state[0] if isinstance(state, tuple) else state
            return self.fc(h[-1])
        return self.fc(out[:, -1] if self.rnn.batch_first else out[-1])


def _x(model, batch=2, steps=6):
    torch.manual_seed(1)
    return torch.randn(batch, steps, 5) if model.rnn.batch_first else torch.randn(steps, batch, 5)


def _flat_weights_current(rnn):
    return all(a is getattr(rnn, n) for a, n in zip(rnn._flat_weights, rnn._flat_weights_names))


@pytest.mark.parametrize("batch_first", [True, False])
def test_bidirectional_lstm_classifier(batch_first):
    torch.manual_seed(0)
    model = Classifier(batch_first=batch_first)
    x = _x(model)
    before = count_params(model)
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    rnn = model.rnn
    assert (rnn.input_size, rnn.hidden_size) == (4, 6) and model.fc.in_features == 12
    shapes = {k: tuple(v.shape) for k, v in rnn.state_dict().items()}
    for sfx in ("", "_reverse"):
        assert shapes[f"weight_ih_l0{sfx}"] == (24, 4)  # 4 gates x 6 units, 4 inputs
        assert shapes[f"weight_ih_l1{sfx}"] == (24, 12)  # reads [forward, backward] of layer 0
        assert shapes[f"weight_hh_l1{sfx}"] == (24, 6)
        assert shapes[f"bias_hh_l1{sfx}"] == (24,)
    assert _flat_weights_current(rnn)
    assert count_params(model) < before / 2
    y = model(x)
    assert y.shape == (2, 3)
    y.sum().backward()


def test_gru_classifier_reading_the_final_state():
    torch.manual_seed(0)
    model = Classifier(rnn=nn.GRU, bidirectional=False, read="h")
    x = _x(model)
    graph = cleanai.DependencyGraph(model, x)
    hidden = [g for g in graph.groups if any(m.name == "rnn" and m.kind == "out" for m in g.members)]
    assert len(hidden) == 1 and {m.name for m in hidden[0].members} == {"rnn", "fc"}
    before = count_params(model)
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    assert model.rnn.hidden_size == 6 and model.fc.in_features == 6
    assert model.rnn.weight_hh_l1.shape == (18, 6) and model.rnn.weight_ih_l1.shape == (18, 6)
    assert count_params(model) < before / 2
    assert model(x).shape == (2, 3)


def _silence(model, plan):
    """Zero every weight that reads the units ``plan`` removes from ``model.rnn`` (its output
    units and, behind a projection, its hidden units), so removing them changes nothing."""
    rnn, keeps = model.rnn, layer_keeps(plan.graph, plan.removals)
    d = 2 if rnn.bidirectional else 1
    width = rnn.proj_size or rnn.hidden_size
    gone = torch.ones(d * width, dtype=torch.bool)
    gone[keeps.get(("rnn", "out", -1), torch.arange(d * width))] = False
    units = torch.nonzero(gone[:width]).flatten()
    assert torch.equal(gone[width:] if d == 2 else gone[:width], gone[:width])  # directions agree
    hidden = torch.ones(rnn.hidden_size, dtype=torch.bool)
    hidden[keeps.get(("rnn", "internal", 0), torch.arange(rnn.hidden_size))] = False
    with torch.no_grad():
        model.fc.weight[:, gone] = 0
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse")[:d]:
                getattr(rnn, f"weight_hh_l{layer}{sfx}")[:, units] = 0
                if layer > 0:
                    getattr(rnn, f"weight_ih_l{layer}{sfx}")[:, gone] = 0
                if rnn.proj_size:
                    getattr(rnn, f"weight_hr_l{layer}{sfx}")[:, hidden] = 0
    return int(gone.sum()) + int(hidden.sum())


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "lstm-proj"])
def test_removing_silent_units_is_exact(kind):
    torch.manual_seed(0)
    rnn = {"lstm": nn.LSTM, "lstm-proj": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    model = Classifier(rnn=rnn, proj_size=6 if kind == "lstm-proj" else 0).eval()
    x = _x(model)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=[model.embed])
    plan = pruner.plan()
    # 6 units in each direction, or 3 projected units in each direction and 6 hidden units
    assert _silence(model, plan) == 12
    with torch.no_grad():
        before = model(x)
    pruner.apply(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_zero_weight_equivalence_of_the_input_features():
    torch.manual_seed(0)
    model = Classifier()
    x = _x(model)
    check_equivalence(model, StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=[model.rnn]), x)
    assert model.rnn.input_size == 4 and model.rnn.weight_ih_l0_reverse.shape == (48, 4)


def test_lstm_projection_prunes_hidden_and_projected_units():
    torch.manual_seed(0)
    model = Classifier(hidden=12, proj_size=6)
    x = _x(model)
    graph = cleanai.DependencyGraph(model, x)
    internal = [g for g in graph.groups if any(m.kind == "internal" for m in g.members)]
    assert len(internal) == 1 and internal[0].size == 12  # the hidden units behind weight_hr
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    rnn = model.rnn
    assert (rnn.hidden_size, rnn.proj_size) == (6, 3) and model.fc.in_features == 6
    assert rnn.weight_hr_l1_reverse.shape == (3, 6) and rnn.weight_hh_l0.shape == (24, 3)
    assert rnn.weight_ih_l1.shape == (24, 6) and _flat_weights_current(rnn)
    out, (h, c) = rnn(torch.randn(2, 4, rnn.input_size))
    assert out.shape == (2, 4, 6) and h.shape == (4, 2, 3) and c.shape == (4, 2, 6)


def test_hybrid_global_iterative_round_to_and_replay():
    torch.manual_seed(0)
    model = Classifier(hidden=16, proj_size=8)
    fresh = copy.deepcopy(model)
    x = _x(model)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, global_pruning=True, iterative_steps=2,
                              round_to=2, importance=WeightActivationImportance())
    data = [_x(model, batch=4) for _ in range(2)]
    for _ in range(2):
        pruner.calibrate(data)
        pruner.step()
    rnn = model.rnn
    assert rnn.hidden_size % 2 == 0 and rnn.proj_size % 2 == 0
    assert rnn.hidden_size < 16 and rnn.proj_size < 8
    assert model(x).shape == (2, 3)
    for entry in pruner.history:
        cleanai.replay(fresh, entry["layers"])
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_lstm_cell_loop():
    class CellNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.cell, self.fc = nn.Linear(5, 8), nn.LSTMCell(8, 12), nn.Linear(12, 3)

        def forward(self, x):
            state = None
            for t in range(x.shape[1]):
                state = self.cell(self.embed(x[:, t]), state)
            return self.fc(state[0])

    torch.manual_seed(0)
    model, x = CellNet(), torch.randn(2, 6, 5)
    StructuredPruner(model, x, pruning_ratio=0.5).prune()
    cell = model.cell
    assert (cell.input_size, cell.hidden_size) == (4, 6) and cell.weight_hh.shape == (24, 6)
    assert model(x).shape == (2, 3)


def test_constant_initial_state_protects_the_hidden_units():
    class WithState(Classifier):
        def forward(self, x):
            h0 = torch.zeros(4, x.shape[0], 12)
            out, _ = self.rnn(self.embed(x), (h0, torch.zeros_like(h0)))
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    model = WithState()
    x = _x(model)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    hidden = [g for g in pruner.graph.groups if any(m.name == "rnn" and m.kind == "out" for m in g.members)]
    assert hidden[0].protected.all() and any("input 2 of rnn" in r for r in hidden[0].reasons)
    pruner.prune()
    assert model.rnn.hidden_size == 12 and model.rnn.input_size == 4
    assert model(x).shape == (2, 3)


def test_packed_sequences_are_kept_with_a_reason():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn, self.fc = nn.Linear(5, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 3)

        def forward(self, x, lengths):
            packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            return self.fc(out.mean(1))

    torch.manual_seed(0)
    model, inputs = Packed(), (torch.randn(3, 6, 5), torch.tensor([6, 3, 4]))
    with pytest.warns(UserWarning, match="IndexSelectBackward0"):
        graph = cleanai.DependencyGraph(model, inputs)
    groups = [g for g in graph.groups if any(m.name == "rnn" for m in g.members)]
    assert groups and all(g.protected.all() and g.reasons for g in groups)
