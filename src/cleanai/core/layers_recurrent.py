"""Layer pruners for recurrent layers: nn.RNN, nn.LSTM, nn.GRU and their cells.

``nn.LSTM`` keeps one ``hidden_size`` (and one ``proj_size``) for every layer and direction, so
hidden unit j is one channel across all of them: removing it removes row j of every gate block
(LSTM 4, GRU 3, RNN 1) of ``weight_ih``/``weight_hh``/biases, column j of ``weight_hh`` and the
columns ``[j, H + j]`` (forward, backward) of the next layer's ``weight_ih``. Without a
projection these units are the layer's output channels (``[fwd, bwd]``: two tied blocks); with
``proj_size`` the projected units are the output channels and the hidden units are an
:class:`~cleanai.core.layers.InternalDim` named ``"hidden"``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import ChannelSpec, InternalDim, LayerPruner, Tensor, _keep, _local, register_layer_pruner

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _gate_rows(keep: Tensor, gates: int, size: int) -> Tensor:
    """Rows of a ``[gates * size, ...]`` weight that keep units ``keep`` in every gate block
    (also the columns of an input whose directions are concatenated blocks)."""
    return (torch.arange(gates).unsqueeze(1) * size + keep.cpu()).reshape(-1)


class RNNPruner(LayerPruner):
    """nn.RNN, nn.LSTM, nn.GRU: ``input_size`` in, ``D * (proj_size or hidden_size)`` out on the
    last dim (D = 2 when bidirectional). Also packed sequences (their ``data`` tensor)."""

    def _sizes(self, m) -> Tuple[int, int, int, int, int]:
        """gates, directions, layers, hidden size, recurrent (output) size per direction."""
        d = 2 if m.bidirectional else 1
        proj = getattr(m, "proj_size", 0)
        return _GATES[m.mode], d, m.num_layers, m.hidden_size, proj or m.hidden_size

    def _names(self, m):
        d = 2 if m.bidirectional else 1
        for layer in range(m.num_layers):
            for sfx in ("", "_reverse")[:d]:
                yield layer, sfx

    def in_channels(self, m):
        return m.input_size

    def out_channels(self, m):
        _, d, _, _, r = self._sizes(m)
        return d * r

    def in_dim(self, m, ndim):
        return ndim - 1

    def blocks(self, m):
        return 2 if m.bidirectional else 1

    def in_blocks(self, m):
        return 1

    def internal_dims(self, m) -> List[Optional[InternalDim]]:
        return [InternalDim("hidden", m.hidden_size)] if getattr(m, "proj_size", 0) else []

    def _hidden_rows(self, m) -> List[Tuple[Tensor, int]]:
        """Gate rows (viewed as ``[gates, H, ...]``, dim 1) and ``weight_hr`` columns."""
        g, _, _, h, _ = self._sizes(m)
        out = []
        for layer, sfx in self._names(m):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                t = getattr(m, f"{kind}_l{layer}{sfx}", None)
                if t is not None:
                    out.append((t.view(g, h, *t.shape[1:]), 1))
            hr = getattr(m, f"weight_hr_l{layer}{sfx}", None)
            if hr is not None:
                out.append((hr, 1))
        return out

    def _recurrent_cols(self, m) -> List[Tuple[Tensor, int]]:
        """Where the layer's output units are read: ``weight_hh`` columns, the next layer's
        ``weight_ih`` columns and, with a projection, ``weight_hr`` rows."""
        out = []
        for layer, sfx in self._names(m):
            out.append((getattr(m, f"weight_hh_l{layer}{sfx}"), 1))
            if layer > 0:
                out.append((getattr(m, f"weight_ih_l{layer}{sfx}"), 1))
            hr = getattr(m, f"weight_hr_l{layer}{sfx}", None)
            if hr is not None:
                out.append((hr, 0))
        return out

    def weights(self, m, side):
        if side == "in":
            return [(getattr(m, f"weight_ih_l0{sfx}"), 1) for layer, sfx in self._names(m) if layer == 0]
        if getattr(m, "proj_size", 0):
            return self._recurrent_cols(m)
        return self._hidden_rows(m) + self._recurrent_cols(m)

    def internal_weights(self, m, index):
        return self._hidden_rows(m)

    def _state_specs(self, m, shapes) -> List[ChannelSpec]:
        """``(h, c)`` carry the output units; ``c`` carries the hidden units behind a projection.
        1-D tensors are a packed sequence's sizes and indices."""
        specs: List[ChannelSpec] = []
        states = 0
        for shape in shapes:
            if len(shape) < 2:
                specs.append(None)
                continue
            which = "hidden" if states == 1 and getattr(m, "proj_size", 0) else "out"
            specs.append((len(shape) - 1, which))
            states += 1
        return specs

    def extra_inputs(self, m, shapes: Sequence[Tuple[int, ...]]) -> List[ChannelSpec]:
        return self._state_specs(m, shapes)

    def extra_outputs(self, m, shapes: Sequence[Tuple[int, ...]]) -> List[ChannelSpec]:
        return self._state_specs(m, shapes)

    def prune(self, m, in_keep, out_keep, internal: Optional[Dict[int, Tensor]] = None):
        g, d, _, h, r = self._sizes(m)
        proj = getattr(m, "proj_size", 0)
        rec = _local(out_keep, d, d * r) if out_keep is not None else None  # output units
        hid = rec if not proj else (internal or {}).get(0)  # hidden units
        for layer, sfx in self._names(m):
            w_ih, w_hh = getattr(m, f"weight_ih_l{layer}{sfx}"), getattr(m, f"weight_hh_l{layer}{sfx}")
            if layer == 0 and in_keep is not None:
                _keep(w_ih, 1, in_keep)
            if layer > 0 and rec is not None:
                _keep(w_ih, 1, _gate_rows(rec, d, r))
            if rec is not None:
                _keep(w_hh, 1, rec)
            if hid is not None:
                rows = _gate_rows(hid, g, h)
                for t in (w_ih, w_hh, getattr(m, f"bias_ih_l{layer}{sfx}", None),
                          getattr(m, f"bias_hh_l{layer}{sfx}", None)):
                    _keep(t, 0, rows)
            if proj:
                hr = getattr(m, f"weight_hr_l{layer}{sfx}")
                if hid is not None:
                    _keep(hr, 1, hid)
                if rec is not None:
                    _keep(hr, 0, rec)
        if in_keep is not None:
            m.input_size = len(in_keep)
        if hid is not None:
            m.hidden_size = len(hid)
        if proj and rec is not None:
            m.proj_size = len(rec)
        # the parameters are the same objects, sliced in place: refresh the flat list cuDNN uses
        m._flat_weights = [getattr(m, n) for n in m._flat_weights_names]
        m.flatten_parameters()


class RNNCellPruner(LayerPruner):
    """nn.RNNCell, nn.LSTMCell, nn.GRUCell: ``input_size`` in, ``hidden_size`` out (last dim);
    the state ``hx`` (and ``cx``) carries the output units, so a loop over time stays coupled."""

    def _gates(self, m) -> int:
        return 4 if isinstance(m, nn.LSTMCell) else 3 if isinstance(m, nn.GRUCell) else 1

    def in_channels(self, m):
        return m.input_size

    def out_channels(self, m):
        return m.hidden_size

    def in_dim(self, m, ndim):
        return ndim - 1

    def weights(self, m, side):
        if side == "in":
            return [(m.weight_ih, 1)]
        g, h = self._gates(m), m.hidden_size
        rows = [(t.view(g, h, *t.shape[1:]), 1) for t in (m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
                if t is not None]
        return rows + [(m.weight_hh, 1)]

    def extra_inputs(self, m, shapes):
        return [(len(s) - 1, "out") if len(s) else None for s in shapes]

    extra_outputs = extra_inputs

    def prune(self, m, in_keep, out_keep):
        if in_keep is not None:
            _keep(m.weight_ih, 1, in_keep)
            m.input_size = len(in_keep)
        if out_keep is not None:
            rows = _gate_rows(out_keep, self._gates(m), m.hidden_size)
            for t in (m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh):
                _keep(t, 0, rows)
            _keep(m.weight_hh, 1, out_keep)
            m.hidden_size = len(out_keep)


for _t in (nn.RNN, nn.LSTM, nn.GRU):
    register_layer_pruner(_t, RNNPruner())
for _t in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    register_layer_pruner(_t, RNNCellPruner())
