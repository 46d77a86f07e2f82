"""The closed-form half of layer reconstruction: a Linear's or conv's input as regression
rows, its weights in the layout of the solve, the ridge least-squares solve itself, and the
choice of its damping on held-out batches."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.widths import global_hooks
from .common import RecoveryError


_SOLVABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def closed_form_dim(m: nn.Module) -> Optional[int]:
    """Unknowns per output channel of the ridge solve, or ``None`` when not solvable here:
    only a Linear or conv that computes exactly what PyTorch's does with the ``weight`` it
    holds. A subclass with a ``forward`` of its own (a weight-standardised conv), a forward
    hook or instance ``forward``, a parametrized or weight-normed weight (rebuilt from other
    tensors on every call, so a written solve would be lost) is not the plain product the
    solve assumes; Adam trains those through their real call."""
    base = next((b for b in _SOLVABLE if isinstance(m, b)), None)
    if base is None or type(m).forward is not base.forward or \
            getattr(type(m), "_conv_forward", None) is not getattr(base, "_conv_forward", None):
        return None
    if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ or \
            global_hooks() or parametrize.is_parametrized(m) or \
            not isinstance(m._parameters.get("weight"), nn.Parameter):
        return None
    if isinstance(m, nn.Linear):
        return m.in_features + (m.bias is not None)
    return m.in_channels // m.groups * math.prod(m.kernel_size) + (m.bias is not None)


def regression_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as regression rows ``(rows, groups, d)``: a Linear's features, or a
    conv's unfolded patches (channel-major, then kernel positions, as in ``weight``)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    nd = len(m.kernel_size)
    if x.dim() == nd + 1:  # unbatched
        x = x.unsqueeze(0)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = nn.functional.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    for i in range(nd):
        k, dl = m.kernel_size[i], m.dilation[i]
        x = x.unfold(2 + i, (k - 1) * dl + 1, m.stride[i])
        if dl > 1:
            x = x[..., ::dl]
    n, c = x.shape[:2]  # x: (n, c, *out_spatial, *kernel)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(-1, m.groups, c // m.groups * math.prod(m.kernel_size))


def solve_layout(m: nn.Module) -> torch.Tensor:
    """``[W; b]`` as ``(groups, d(+1), out/groups)`` float64, the layout of the solve."""
    g = getattr(m, "groups", 1)
    w = m.weight.detach().double().reshape(g, m.weight.shape[0] // g, -1).transpose(1, 2)
    if m.bias is not None:
        w = torch.cat([w, m.bias.detach().double().reshape(g, 1, -1)], 1)
    return w


def ridge_solve(gram: torch.Tensor, xty: torch.Tensor, damping: float, name: str,
                w0: torch.Tensor) -> torch.Tensor:
    """Solve ``(G + lam I) W = X^T Y + lam W0`` per group by Cholesky: least squares pulled
    towards the present weights ``w0`` (not towards zero), lam = damping * mean(diag G),
    raised x10 (with a warning) until the factorisation succeeds. Groups whose input was all
    zero keep ``w0``: the data says nothing about them."""
    diag = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    empty = diag <= 0
    lam = torch.where(empty, torch.ones_like(diag), damping * diag)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(20):
        chol, info = torch.linalg.cholesky_ex(gram + lam[:, None, None] * eye)
        if not bool((info != 0).any()):
            w = torch.cholesky_solve(xty + lam[:, None, None] * w0, chol)
            return torch.where(empty[:, None, None], w0, w)
        lam = torch.where(lam > 0, lam * 10, diag * 1e-10)
        warnings.warn(f"reconstruct: the input Gram matrix of {name} is singular; damping "
                      f"raised to {float(lam.max() / diag.clamp_min(1e-300).max()):.1e} x "
                      f"mean(diag)", RuntimeWarning, stacklevel=3)
    raise RecoveryError(f"reconstruct: cannot solve the least squares of {name} (its input "
                        f"Gram matrix stays singular); try a larger damping")


#: the dampings :func:`choose_damping` tries, relative to the mean diagonal of ``X^T X``
DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def squared_error(w: torch.Tensor, gram: torch.Tensor, xty: torch.Tensor,
                  yy: torch.Tensor) -> torch.Tensor:
    """``||X W - Y||^2`` from the sums ``X^T X``, ``X^T Y`` and ``||Y||^2`` (all groups)."""
    return (w * (gram @ w)).sum() - 2 * (w * xty).sum() + yy


def choose_damping(grams: Sequence[torch.Tensor], xtys: Sequence[torch.Tensor],
                   yys: Sequence[torch.Tensor], w0: torch.Tensor) -> Optional[float]:
    """Two-fold cross-validation of :func:`ridge_solve` over two disjoint halves of the data
    (``grams[h]``, ``xtys[h]``, ``yys[h]``: the sums of half ``h``): the damping in
    :data:`DAMPINGS` whose solve on one half leaves the least squared error on the other
    (both ways round), halved for the whole data (a damping per sample: twice the samples
    want half of it); ``None`` when the present weights ``w0`` do better on the halves than
    any refit."""
    total = [0.0] * len(DAMPINGS)
    for fit, held in ((0, 1), (1, 0)):
        values, vectors = torch.linalg.eigh(grams[fit])  # per group: [g, d], [g, d, d]
        values = values.clamp_min(0)
        scale = values.mean(-1)
        empty = scale <= 0
        for i, damping in enumerate(DAMPINGS):
            lam = (damping * scale).clamp_min(1e-300)
            rhs = vectors.transpose(1, 2) @ (xtys[fit] + lam[:, None, None] * w0)
            w = vectors @ (rhs / (values + lam[:, None])[..., None])
            w = torch.where(empty[:, None, None], w0, w)
            total[i] += float(squared_error(w, grams[held], xtys[held], yys[held]))
    total = [t if math.isfinite(t) else math.inf for t in total]
    best = min(range(len(total)), key=total.__getitem__)
    unchanged = sum(float(squared_error(w0, g, c, y)) for g, c, y in zip(grams, xtys, yys))
    return None if not unchanged > total[best] else DAMPINGS[best] / 2
