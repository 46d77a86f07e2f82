"""Layer pruner for mixture-of-experts weights stored as 3-D tensors.

Hugging Face's experts modules (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS... every class
built with ``use_experts_implementation``) hold all experts in two parameters, shaped
``[E, I, H]`` per projection (``[E, H, I]`` when ``is_transposed``):

* ``gate_up_proj`` ``[E, 2I, H]`` (``up_proj`` ``[E, I, H]`` without a gate) reads the hidden
  size ``H``; its ``2I`` rows hold a gate and an up row per intermediate neuron, in the order
  the class's ``_apply_gate`` pairs them (halves for ``chunk(2)``, alternating for GPT-OSS's
  ``[..., ::2]``: found by trying both, never assumed);
* ``down_proj`` ``[E, H, I]`` writes the hidden size back;
* optional biases ``[E, 2I]`` and ``[E, H]``, and an optional norm of each expert's output
  over ``H`` (``post_expert_norm``), sliced with the hidden size.

The hidden size is the layer's input and output channel set (last dim). Each expert's ``I``
neurons are an internal dim of their own, so every expert keeps its own most important
neurons; the experts keep equal counts, because their weights stay one tensor.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import InternalDim, LayerPruner, Tensor
from .slicing import _keep

#: (class, intermediate size) -> "chunk", "interleaved" or None: how ``_apply_gate`` pairs rows
_LAYOUTS: Dict[Tuple[type, int], Optional[str]] = {}


def is_experts_class(cls: type) -> bool:
    """A class made by Hugging Face's ``use_experts_implementation`` (it adds ``_apply_gate``
    and wraps ``forward``)."""
    return (cls.__module__.startswith("transformers.") and hasattr(cls, "_apply_gate")
            and hasattr(cls.forward, "__wrapped__"))


def _pair(layout: str, neurons: Tensor, inter: int) -> Tuple[Tensor, Tensor]:
    """The gate rows and the up rows of ``neurons`` in a ``[2 * inter]`` gate/up dim."""
    if layout == "chunk":
        return neurons, neurons + inter
    return 2 * neurons, 2 * neurons + 1


def _rows(layout: str, neurons: Tensor, inter: int) -> Tensor:
    """The rows of a ``[2I]`` gate/up dim that hold ``neurons``, in the order the layout
    keeps them (so the kept rows form the same layout again)."""
    gate, up = _pair(layout, neurons, inter)
    if layout == "chunk":
        return torch.cat([gate, up])
    return torch.stack([gate, up], 1).reshape(-1)


def gate_layout(m: nn.Module, inter: int) -> Optional[str]:
    """How ``m._apply_gate`` pairs the ``2 * inter`` rows: ``"chunk"`` (gate j and up j are
    rows j and ``inter + j``) or ``"interleaved"`` (rows 2j and 2j + 1), checked by permuting
    the neurons of a random input; None when neither gives the permuted output."""
    key = (type(m), inter)
    if key not in _LAYOUTS:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2 * inter, generator=gen)
        perm = torch.randperm(inter, generator=gen)
        found = None
        try:
            with torch.no_grad():
                y = m._apply_gate(x)
                if inter > 1 and tuple(y.shape) == (3, inter):
                    for layout in ("chunk", "interleaved"):
                        moved = m._apply_gate(x[:, _rows(layout, perm, inter)])
                        if torch.allclose(moved.float(), y[:, perm].float(), atol=1e-6):
                            found = layout
                            break
        except Exception:  # a gate that needs more than its input: not followed
            found = None
        _LAYOUTS[key] = found
    return _LAYOUTS[key]


class ExpertsPruner(LayerPruner):
    """Experts in 3-D tensors (see module doc): the hidden size in and out on the last dim,
    and one internal dim ``"expert{e}"`` per expert over its intermediate neurons."""

    def _up(self, m) -> Tensor:
        return m.gate_up_proj if m.has_gate else m.up_proj

    def _inter(self, m) -> int:
        n = self._up(m).shape[2 if m.is_transposed else 1]
        return n // 2 if m.has_gate else n

    def _neuron_rows(self, m, neurons: Tensor) -> Tensor:
        """The rows (or columns, transposed) of the up projection that hold ``neurons``."""
        if not m.has_gate:
            return neurons
        layout = gate_layout(m, self._inter(m))
        if layout is None:
            raise ValueError(f"{type(m).__name__}: CleanAI cannot tell which gate and up rows "
                             f"of gate_up_proj form a neuron (its _apply_gate pairs them "
                             f"neither as halves nor alternately); prune it with "
                             f"ignored_layers")
        return _rows(layout, neurons, self._inter(m))

    def in_channels(self, m):
        return m.down_proj.shape[1 if not m.is_transposed else 2]

    out_channels = in_channels

    def in_dim(self, m, ndim):
        return ndim - 1

    def _post_norm(self, m) -> List[Tensor]:
        """The per-channel tensors of the norm each expert's output goes through
        (``has_post_expert_norm``: an RMSNorm over the hidden size)."""
        norm = getattr(m, "post_expert_norm", None) if getattr(m, "has_post_expert_norm",
                                                               False) else None
        if norm is None:
            return []
        h = self.in_channels(m)
        tensors = list(norm.parameters()) + list(norm.buffers())
        if not all(t.dim() == 1 and t.shape[0] == h for t in tensors):
            raise ValueError(f"{type(m).__name__}: its post_expert_norm holds tensors that are "
                             f"not one value per channel; prune it with ignored_layers")
        return tensors

    def weights(self, m, side):
        t = 1 if m.is_transposed else 2  # the hidden dim of the up projection
        if side == "in":
            return [(self._up(m), t)]
        out = [(m.down_proj, 3 - t)]
        bias = getattr(m, "down_proj_bias", None) if m.has_bias else None
        return out + ([(bias, 1)] if isinstance(bias, Tensor) else []) + \
            [(p, 0) for p in self._post_norm(m)]

    def multiple(self, m) -> int:
        """``grouped_mm`` (the default experts kernel) needs 16-byte strides: widths that are
        multiples of 8 in half precision, which a float32 model may be cast to later."""
        return 16 // min(2, m.down_proj.element_size())

    def internal_dims(self, m) -> List[Optional[InternalDim]]:
        if m.has_gate and gate_layout(m, self._inter(m)) is None:
            return []
        return [InternalDim(f"expert{e}", self._inter(m)) for e in range(m.num_experts)]

    def equal_counts(self, m) -> List[List[int]]:
        return [list(range(len(self.internal_dims(m))))]

    def internal_weights(self, m, index):
        inter = self._inter(m)
        neurons = torch.arange(inter)
        parts = _pair(gate_layout(m, inter), neurons, inter) if m.has_gate else (neurons,)
        d = 1 if m.is_transposed else 0
        up = self._up(m)[index]  # [(2)I, H], or [H, (2)I] transposed
        out = [(up.index_select(d, rows), d) for rows in parts]
        out.append((m.down_proj[index], 0 if m.is_transposed else 1))
        return out

    def internal_activations(self, m, args, kwargs, output) -> List[Optional[Tensor]]:
        """Per expert, its neurons' outputs on the tokens routed to it, times the routing
        weight ([tokens of the expert, I]); None for an expert no token reached."""
        values = list(args) + list(kwargs.values())
        tensors = [v for v in values if isinstance(v, Tensor)]
        if len(tensors) < 2:
            return []
        x, index = tensors[0], tensors[1]
        weight = tensors[2] if len(tensors) > 2 else None
        x = x.reshape(-1, x.shape[-1])
        index = index.reshape(x.shape[0], -1)
        if weight is not None:
            weight = weight.reshape(x.shape[0], -1)
            if weight.shape[1] != index.shape[1]:  # dense routing weights [tokens, E]
                weight = weight.gather(1, index.clamp(0, weight.shape[1] - 1))
        up, bias = self._up(m), getattr(m, ("gate_up_proj_bias" if m.has_gate
                                             else "up_proj_bias"), None)
        out: List[Optional[Tensor]] = []
        with torch.no_grad():
            for e in range(m.num_experts):
                token, slot = torch.where(index == e)
                if token.numel() == 0:
                    out.append(None)
                    continue
                w = up[e].t() if m.is_transposed else up[e]
                h = F.linear(x[token].to(w.dtype), w,
                             bias[e] if m.has_bias and isinstance(bias, Tensor) else None)
                h = m._apply_gate(h) if m.has_gate else m.act_fn(h)
                if weight is not None:
                    h = h * weight[token, slot, None].to(h.dtype)
                out.append(h)
        return out

    def prune(self, m, in_keep, out_keep, internal: Optional[Dict[int, Tensor]] = None):
        t = m.is_transposed
        up = self._up(m)
        h_up, r_up = (1, 2) if t else (2, 1)  # dims of up: hidden, rows
        h_down, r_down = (2, 1) if t else (1, 2)
        if internal:
            counts = {len(k) for k in internal.values()}
            if len(counts) != 1 or len(internal) != m.num_experts:
                raise ValueError(f"{type(m).__name__}: every expert must keep as many neurons "
                                 f"(its weights are one tensor); got {sorted(counts)}")
            keeps = [internal[e].cpu() for e in range(m.num_experts)]
            # each expert its own rows: one gather along the rows, broadcast over the hidden dim
            rows = torch.stack([self._neuron_rows(m, k) for k in keeps]).to(up.device)
            up.data = torch.take_along_dim(up.data, rows.unsqueeze(h_up), dim=r_up)
            bias = getattr(m, "gate_up_proj_bias" if m.has_gate else "up_proj_bias", None)
            if m.has_bias and isinstance(bias, Tensor):
                bias.data = bias.data.gather(1, rows.to(bias.device))
            cols = torch.stack(keeps).to(m.down_proj.device)
            m.down_proj.data = torch.take_along_dim(m.down_proj.data, cols.unsqueeze(h_down),
                                                    dim=r_down)
            if isinstance(getattr(m, "intermediate_dim", None), int):
                m.intermediate_dim = len(keeps[0])
        if in_keep is not None:
            _keep(up, h_up, in_keep)
        if out_keep is not None:
            norm = self._post_norm(m)  # (read while down_proj still holds the old width)
            _keep(m.down_proj, h_down, out_keep)
            if m.has_bias:
                _keep(getattr(m, "down_proj_bias", None), 1, out_keep)
            for p in norm:  # (the norm then averages over the kept channels)
                _keep(p, 0, out_keep)
            if norm and isinstance(getattr(m.post_expert_norm, "normalized_shape", None), tuple):
                m.post_expert_norm.normalized_shape = (len(out_keep),)
            if isinstance(getattr(m, "hidden_dim", None), int):
                m.hidden_dim = len(out_keep)
        for p in m.parameters(recurse=False):
            p.grad = None
