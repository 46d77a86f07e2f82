"""What a known layer adds to the trace beyond its first input and output: its internal dims
(attention heads, hidden units behind a projection) and the channels of its other tensor inputs
and outputs (attention keys and values, recurrent states), as its
:class:`~cleanai.core.layers.LayerPruner` declares them."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .layers import UnsupportedLayer
from .parametrized import unsliceable
from .slots import Slots


def layer_extras(ctx, call, outs: List[Optional[Slots]],
                 extra_in: List[Optional[Slots]], module_in: Dict[str, torch.Tensor],
                 module_out: Dict[str, torch.Tensor],
                 internal: Dict[str, List[Optional[torch.Tensor]]]) -> List[Optional[Slots]]:
    """Tie ``call``'s extra inputs and outputs (``outs``: the slots of its outputs, the first one
    already set) and create its internal dims' ids on its first call (into ``internal``).

    ``ctx`` is the tracer (fresh ids, union-find, protection), ``extra_in`` the slots of the
    tensor inputs after the first; returns ``outs`` with the extra outputs' slots filled in.
    """
    m, pr, name = call.module, call.pruner, call.name
    if isinstance(pr, UnsupportedLayer):
        for s in extra_in:
            ctx.protect(s, f"input of {type(m).__name__} {name}, which CleanAI cannot prune yet")
        return outs
    declared = pr.internal_dims(m)
    if not declared and not call.extras and len(call.outputs) <= 1:
        return outs  # the common case (a conv, a linear): nothing beyond one input and output
    attention = ctx.attention  # which attention units become removable
    dims = [None if d is None or (d.kind in ("heads", "head_dims") and d.kind != attention)
            else d for d in declared]
    if name not in internal:
        internal[name] = []
        for d in dims:
            if d is None:
                internal[name].append(None)
                continue
            base = ctx.fresh(d.channels)
            internal[name].append(base.repeat_interleave(d.per_channel) if d.interleaved
                                  else base.repeat(d.per_channel))
            each = f" ({d.per_channel} positions each)" if d.per_channel > 1 else ""
            ctx.note(base, f"{type(m).__name__} {name}: its internal {d.name!r}{each}")
            ctx.kinds.append((int(base[0]), d.kind))
        computed = unsliceable(m)  # a spectral-normed out_proj: the heads stay too
        if computed is not None:
            for ids in internal[name]:
                ctx.protect(ids, computed)
        for tie in pr.equal_counts(m):
            parts = [internal[name][i] for i in tie if internal[name][i] is not None]
            if len(parts) > 1:
                ctx.tie_counts((name, "internal", tuple(tie)), parts,
                               f"{type(m).__name__} {name}: its internal dims stored in one "
                               f"tensor")
    sets = {"in": module_in.get(name), "out": module_out.get(name)}
    for d, ids in zip(dims, internal[name]):
        if d is not None:
            sets[d.name] = ids

    def ids_for(spec, shape) -> Optional[torch.Tensor]:
        if spec is None or spec[0] >= len(shape) or sets.get(spec[1]) is None:
            return None
        ids, n = sets[spec[1]], shape[spec[0]]
        return ids if len(ids) == n else ids[:n] if n and len(ids) % n == 0 else None

    shapes = [shape for _, shape in call.extras]
    for i, (spec, s, (key, shape)) in enumerate(zip(pr.extra_inputs(m, shapes), extra_in,
                                                   call.extras)):
        ids = ids_for(spec, shape)
        if ids is not None and s is not None and s.dim == spec[0] and len(s.ids) == len(ids):
            ctx.uf.union_all(s.ids, ids)
        elif spec is not None or key != call.input_key:
            ctx.protect(s, f"input {i + 2} of {name} does not carry channels CleanAI follows")
            ctx.protect(ids, f"input {i + 2} of {name} does not follow its channels")
    out_shapes = [shape for _, shape in call.outputs[1:]]
    for i, spec in enumerate(pr.extra_outputs(m, out_shapes)):
        ids = ids_for(spec, out_shapes[i])
        if ids is not None:
            outs[i + 1] = Slots(spec[0], ids)
    return outs
