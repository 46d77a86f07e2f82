"""Layer pruner for nn.MultiheadAttention: its embedding channels, its heads, its head dims.

The embedding size (``embed_dim``, the query's last dim) is the layer's input channel set and
``out_proj``'s rows its output channels; both usually join the residual stream. Heads and the
dims inside heads are :class:`~cleanai.core.layers.InternalDim` s over the ``num_heads *
head_dim`` rows of the q/k/v projections (and ``out_proj``'s columns), a group of their own:
``"heads"`` (whole heads go, the default) or ``"head_dims"`` (the same dims leave every head),
as the graph's ``attention`` setting says (``StructuredPruner(..., attention="head_dims")``).

The stock forward needs ``num_heads * head_dim == embed_dim``; a layer pruned apart from that
becomes a :class:`PrunedMultiheadAttention` (same parameters and state-dict keys). Pruning
head dims folds the old ``1/sqrt(head_dim)`` score scale into the query rows, so the kept dims
attend exactly as before.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ChannelSpec, InternalDim, LayerPruner, Tensor, _keep, register_layer_pruner


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` (or output width)
    differs from ``embed_dim``. It computes the same attention as the stock forward (masks,
    ``bias_k``/``bias_v``, ``add_zero_attn``, dropout, ``batch_first``, unbatched inputs).

    ``_qkv_same_embed_dim`` is False here, so container fast paths (``nn.TransformerEncoderLayer``)
    that assume the stock layout step aside; the fused ``in_proj_weight`` is kept when present.
    """

    #: its layer pruner is the one registered for this class
    cleanai_layer_type = nn.MultiheadAttention

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        return attend(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                      average_attn_weights, is_causal)


def attend(m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
           key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
           attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
           is_causal: bool = False, project: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """``m``'s attention for any inner width; ``project=False`` stops before ``out_proj`` and
    returns the heads' concatenated outputs (``[.., num_heads * head_dim]``)."""
    batched = query.dim() == 3
    if not batched:  # [L, E] -> [L, 1, E]
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length, n = query.shape[:2]
    h, d = m.num_heads, m.head_dim
    inner = h * d
    if m.in_proj_weight is not None:
        wq, wk, wv = m.in_proj_weight.split(inner)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.split(inner)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    attn_mask = _float_mask(attn_mask, q.dtype)
    key_padding_mask = _float_mask(key_padding_mask, q.dtype)
    if is_causal and attn_mask is None:
        attn_mask = torch.full((length, k.shape[0]), float("-inf"), dtype=q.dtype,
                               device=q.device).triu(1)
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.expand(1, n, inner)])
        v = torch.cat([v, m.bias_v.expand(1, n, inner)])
        attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
    q = q.reshape(length, n * h, d).transpose(0, 1)  # [N * h, L, d]
    k = k.reshape(k.shape[0], n * h, d).transpose(0, 1)
    v = v.reshape(v.shape[0], n * h, d).transpose(0, 1)
    if m.add_zero_attn:
        zeros = k.new_zeros(n * h, 1, d)
        k, v = torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
        attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
    src = k.shape[1]
    mask = attn_mask.reshape(-1, length, src) if attn_mask is not None else None
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(n, 1, 1, src).expand(n, h, 1, src).reshape(n * h, 1, src)
        mask = kpm if mask is None else mask + kpm
    p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = torch.bmm(q * (1.0 / math.sqrt(d)), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        weights = attn.view(n, h, length, src)
        weights = weights.mean(1) if average_attn_weights else weights
        if p > 0:
            attn = F.dropout(attn, p=p)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(length, n, inner)
    else:
        if mask is not None:
            mask = mask.view(n, h, -1, src) if mask.shape[0] == n * h else mask.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.view(n, h, length, d), k.view(n, h, src, d), v.view(n, h, src, d),
            attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(length, n, inner)
    if project:
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    if not batched:
        return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
    if m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True = masked out) as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _pad(mask: Optional[Tensor]) -> Optional[Tensor]:
    return F.pad(mask, (0, 1)) if mask is not None else None


class MultiheadAttentionPruner(LayerPruner):
    """nn.MultiheadAttention: ``embed_dim`` in and ``out_proj.out_features`` out (last dim), plus
    internal dims ``"heads"`` (id 0) or ``"head_dims"`` (id 1), as the graph's ``attention``
    setting asks, and the key and value channels (ids 2, 3) when their projections do not read
    the embedding."""

    def in_channels(self, m):
        return m.embed_dim

    def out_channels(self, m):
        return m.out_proj.out_features

    def in_dim(self, m, ndim):
        return ndim - 1

    def internal_dims(self, m) -> List[Optional[InternalDim]]:
        h, d = m.num_heads, m.head_dim
        return [InternalDim("heads", h, d, True, kind="heads"),
                InternalDim("head_dims", d, h, False, kind="head_dims"),
                None if self._reads_embedding(m, "kdim") else InternalDim("key", m.kdim),
                None if self._reads_embedding(m, "vdim") else InternalDim("value", m.vdim)]

    def internal_weights(self, m, index):
        if index >= 2:  # the key (value) projection's columns
            return [((m.k_proj_weight, m.v_proj_weight)[index - 2], 1)]
        inner = m.num_heads * m.head_dim
        out: List[Tuple[Tensor, int]] = [(m.out_proj.weight, 1)]
        if m.in_proj_weight is not None:
            out.append((m.in_proj_weight.view(3, inner, -1), 1))
        else:
            out += [(w, 0) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
        if m.in_proj_bias is not None:
            out.append((m.in_proj_bias.view(3, inner), 1))
        out += [(b, 2) for b in (m.bias_k, m.bias_v) if b is not None]
        return out

    def internal_activations(self, m, args, kwargs, output):
        """The heads' outputs (what ``out_proj`` reads), and the key and value inputs."""
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        call = dict(zip(names, args), **kwargs)
        call["need_weights"] = False
        with torch.no_grad():
            heads, _ = attend(m, project=False, **call)
        return [heads, heads, call.get("key"), call.get("value")]

    def _reads_embedding(self, m, which: str) -> bool:
        """Whether the key (value) projection's columns are the embedding channels."""
        return m.in_proj_weight is not None or getattr(m, which) == m.embed_dim

    def weights(self, m, side):
        if side == "out":
            return [(m.out_proj.weight, 0)] + ([(m.out_proj.bias, 0)] if m.out_proj.bias is not None else [])
        if m.in_proj_weight is not None:
            return [(m.in_proj_weight, 1)]
        out = [(m.q_proj_weight, 1)]
        if self._reads_embedding(m, "kdim"):
            out.append((m.k_proj_weight, 1))
        if self._reads_embedding(m, "vdim"):
            out.append((m.v_proj_weight, 1))
        return out

    def extra_inputs(self, m, shapes: Sequence[Tuple[int, ...]]) -> List[ChannelSpec]:
        """Key and value carry the embedding channels when their projection reads them, their
        own (internal dims ``"key"``, ``"value"``) otherwise."""
        specs: List[ChannelSpec] = []
        for i, shape in enumerate(shapes):
            if i >= 2 or not shape:
                specs.append(None)
                continue
            which = ("kdim", "vdim")[i]
            own = "in" if self._reads_embedding(m, which) else ("key", "value")[i]
            specs.append((len(shape) - 1, own))
        return specs

    def prune(self, m, in_keep, out_keep, internal: Optional[Dict[int, Tensor]] = None):
        h, d, e = m.num_heads, m.head_dim, m.embed_dim
        inner = h * d
        fused = m.in_proj_weight is not None
        internal = dict(internal or {})
        for index, attr, weight in ((2, "kdim", "k_proj_weight"), (3, "vdim", "v_proj_weight")):
            if index in internal:
                _keep(getattr(m, weight), 1, internal[index])
                setattr(m, attr, len(internal.pop(index)))
        if internal:
            kept = torch.arange(inner)
            for idx in internal.values():
                kept = kept[torch.isin(kept, idx.cpu())]
            heads, dims = torch.unique(kept // d), torch.unique(kept % d)
            if not torch.equal(kept, (heads.unsqueeze(1) * d + dims).reshape(-1)):
                raise ValueError("MultiheadAttention: the kept rows must be the same dims in every "
                                 "kept head")
            rows = torch.cat([kept + s * inner for s in range(3)])
            if fused:
                _keep(m.in_proj_weight, 0, rows)
            else:
                for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                    _keep(w, 0, kept)
            _keep(m.in_proj_bias, 0, rows)
            _keep(m.bias_k, 2, kept)
            _keep(m.bias_v, 2, kept)
            _keep(m.out_proj.weight, 1, kept)
            m.out_proj.in_features = len(kept)
            m.num_heads, m.head_dim = len(heads), len(dims)
            if len(dims) != d:
                # attention scales scores by 1/sqrt(head_dim): fold the old scale into the
                # query rows, so the kept dims score exactly as before
                scale = math.sqrt(len(dims) / d)
                q_weight = m.in_proj_weight if fused else m.q_proj_weight
                q_weight.data[:len(kept)] *= scale
                if m.in_proj_bias is not None:
                    m.in_proj_bias.data[:len(kept)] *= scale
        if in_keep is not None:
            if fused:
                _keep(m.in_proj_weight, 1, in_keep)
                m.kdim = m.vdim = len(in_keep)
            else:
                _keep(m.q_proj_weight, 1, in_keep)
                if m.kdim == e:
                    _keep(m.k_proj_weight, 1, in_keep)
                    m.kdim = len(in_keep)
                if m.vdim == e:
                    _keep(m.v_proj_weight, 1, in_keep)
                    m.vdim = len(in_keep)
            m.embed_dim = len(in_keep)
        if out_keep is not None:
            _keep(m.out_proj.weight, 0, out_keep)
            _keep(m.out_proj.bias, 0, out_keep)
            m.out_proj.out_features = len(out_keep)
        _sync_class(m)


def _sync_class(m: nn.MultiheadAttention) -> None:
    """Stock class while the stock forward fits the shapes, :class:`PrunedMultiheadAttention`
    otherwise (a user subclass is left alone: its forward is its own business)."""
    if type(m) not in (nn.MultiheadAttention, PrunedMultiheadAttention):
        return
    stock = m.num_heads * m.head_dim == m.embed_dim == m.out_proj.out_features
    m.__class__ = nn.MultiheadAttention if stock else PrunedMultiheadAttention
    m._qkv_same_embed_dim = stock and m.in_proj_weight is not None


def synced_containers(model: nn.Module) -> List[nn.Module]:
    """The containers whose attributes :func:`sync_container_attributes` may change."""
    return [m for m in model.modules() if isinstance(m, nn.Transformer) or (
        type(m).__name__ in ("VisionTransformer", "EncoderBlock")
        and (type(m).__module__ or "").startswith("torchvision."))]


def sync_container_attributes(model: nn.Module,
                              containers: Optional[List[nn.Module]] = None) -> None:
    """Update widths that known containers keep beside their layers and check in forward:
    ``nn.Transformer.d_model``, torchvision's ``VisionTransformer.hidden_dim`` (its patch
    reshape) and ``EncoderBlock.num_heads``. ``containers``: :func:`synced_containers`, when
    the caller has them."""
    for m in synced_containers(model) if containers is None else containers:
        if isinstance(m, nn.Transformer):
            first = next((layer.self_attn for layer in m.encoder.layers), None)
            if first is not None:
                m.d_model = first.embed_dim
        if isinstance(getattr(m, "conv_proj", None), nn.Conv2d):
            m.hidden_dim = m.conv_proj.out_channels
        if isinstance(getattr(m, "self_attention", None), nn.MultiheadAttention):
            m.num_heads = m.self_attention.num_heads


register_layer_pruner(nn.MultiheadAttention, MultiheadAttentionPruner())
