"""How close a pruned model stays to the dense one on real inputs: output cosine similarity and,
for classifiers, top-1 agreement. No labels needed."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..core.runtime import ForwardFn, iter_tensors, map_tensors, run_forward


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: the output itself, its ``.logits``, its
    ``.last_hidden_state`` or the first tensor it holds (a tuple, a ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    first = next(iter_tensors(output), None)
    if first is None:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no tensor; pass "
                         f"output_fn to pick what to compare")
    return first


@torch.no_grad()
def fidelity(model: nn.Module, reference: nn.Module, data: Iterable,
             max_batches: Optional[int] = 8, forward_fn: Optional[ForwardFn] = None,
             output_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> Dict[str, float]:
    """Compare ``model`` with ``reference`` (e.g. the dense model kept before pruning) on
    ``data`` batches (as :meth:`StructuredPruner.calibrate` takes them), both in eval mode.

    Returns ``{"cosine": mean cosine similarity of the outputs over their last dim,
    "agreement": fraction of equal argmax (2-D outputs, classifiers), "batches": n}``;
    ``agreement`` is absent for other outputs. Train/eval flags are restored."""
    from ..importance.stats import iterate_batches, model_inputs

    pick = output_fn or output_tensor
    modes = [(m, m.training) for m in list(model.modules()) + list(reference.modules())]
    cos_sum, rows, same, batches = 0.0, 0, 0, 0
    try:
        model.eval()
        reference.eval()
        for batch in iterate_batches(data, max_batches, progress=False):
            inputs = model_inputs(batch)
            a = pick(run_forward(model, _on(model, inputs), forward_fn)).float()
            b = pick(run_forward(reference, _on(reference, inputs), forward_fn)).float().to(a.device)
            if a.shape != b.shape:
                raise ValueError(f"fidelity: the outputs differ in shape ({tuple(a.shape)} vs "
                                 f"{tuple(b.shape)} for the reference)")
            flat_a, flat_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos_sum += float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=-1).sum())
            rows += flat_a.shape[0]
            if a.dim() == 2:
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
            batches += 1
    finally:
        for m, mode in modes:
            m.training = mode
    if not batches:
        raise ValueError("fidelity: the data yielded no batches")
    out = {"cosine": cos_sum / rows, "batches": float(batches)}
    if a.dim() == 2:
        out["agreement"] = same / rows
    return out


def _on(model: nn.Module, inputs: Any) -> Any:
    p = next(model.parameters(), None)
    return inputs if p is None else map_tensors(inputs, lambda t: t.to(p.device))
