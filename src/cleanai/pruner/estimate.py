"""The removed channels' linear estimate from the kept ones, for compensation
(:mod:`cleanai.pruner.compensate`): ``x_r ~ T x_K + t`` from the input's first and second
moments.

The estimate is ridge-damped. With the statistics of at least two calibration batches, the
damping is chosen per consumer by two-fold cross-validation over the even- and odd-numbered
batches: each candidate in :data:`DAMPINGS` (and the constant alone, and nothing at all) is fit
on one half and scored on the other by the error it leaves in the consumer's output,
``tr(W_r E[e e^T] W_r^T)`` with ``e`` the estimate's residual; the best is refit on all the
data. Few samples next to many channels would otherwise fit noise that other inputs do not
share.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .compensate import CompensationReport

#: ridge damping of the kept channels' second moment, relative to its mean diagonal, when the
#: statistics hold a single batch (nothing to choose a damping on)
DAMPING = 1e-6
#: the dampings cross-validation chooses from (relative, as :data:`DAMPING`)
DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
_MEAN_ONLY, _NOTHING = float("inf"), -1.0  # two more choices: the constant alone; no estimate


Moments = Tuple[torch.Tensor, torch.Tensor, float]  # (E[x], E[x x^T], samples), float64


def regress(found: Moments, halves: Optional[Tuple[Moments, Moments]], removed: torch.Tensor,
            kept: torch.Tensor, w_r: torch.Tensor, name: str, report: "CompensationReport",
            constant: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(T, t)`` of the removed channels' estimate ``x_r ~ T x_K + t`` (``t = 0`` when
    ``constant`` is False; ``T`` is ``None`` for the constant alone), ridge-damped by the
    choice :func:`_choose` makes on ``halves`` (``w_r``: the consumer's weights that read
    the removed channels, ``[r, ...]``; the damping halved for the whole data, as a damping
    per sample), else by :data:`DAMPING`."""
    choice = _choose(halves, removed, kept, w_r, constant) if halves is not None else None
    if choice is not None:
        if choice not in (_NOTHING, _MEAN_ONLY):
            choice /= 2  # a damping per sample: the whole data (twice a half) wants half
        report.chosen[name] = ("none" if choice == _NOTHING or not constant and choice ==
                               _MEAN_ONLY else "mean only" if choice == _MEAN_ONLY
                               else f"{choice:g}")
        if choice == _NOTHING:
            return None, torch.zeros(len(removed), dtype=torch.float64)
        if choice == _MEAN_ONLY:
            return None, found[0][removed] if constant else torch.zeros(len(removed),
                                                                         dtype=torch.float64)
    mean, second, count = found
    kk, kr, floor = _blocks(mean, second, removed, kept, constant)
    start = 0
    if choice is not None:  # relative to the kept channels' mean variance
        damp = max(choice * float(kk.diagonal().mean()), floor)
    else:  # relative to their mean second moment
        damping = DAMPING
        if count < len(kept) + constant:  # fewer samples than unknowns: not determined
            start = 4
            damping *= 10 ** start
        damp = damping * max(float(second[kept, kept].mean()), 1e-12)
    eye = torch.eye(kk.shape[0], dtype=kk.dtype)
    for attempt in range(start, start + 8):
        chol, info = torch.linalg.cholesky_ex(kk + damp * eye)
        if int(info) == 0:
            break
        damp *= 10
    else:
        raise RuntimeError(f"{name}: the second moment of its input is not positive definite "
                           f"even with damping {damp:g}")
    if attempt > start or (choice is None and attempt):
        report.damped[name] = max(report.damped.get(name, 0.0), float(10 ** attempt))
    coef = torch.cholesky_solve(kr, chol).T.contiguous()  # [r, k]
    if not constant:
        return coef, torch.zeros(len(removed), dtype=torch.float64)
    return coef, mean[removed] - coef @ mean[kept]


def _blocks(mean: torch.Tensor, second: torch.Tensor, removed: torch.Tensor,
            kept: torch.Tensor, constant: bool) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The kept x kept and kept x removed blocks of the input's covariance (``constant``:
    the fit has an undamped constant, which is ridge regression on centred inputs) or of its
    second moment, and the least damping they take: :data:`DAMPING` of the kept channels'
    mean second moment (centring channels whose mean dwarfs their spread leaves rounding
    noise of about that size, which a damping relative to the spread alone would not
    cover)."""
    kk, kr = second[kept][:, kept], second[kept][:, removed]
    floor = DAMPING * max(float(kk.diagonal().mean()), 1e-12)
    if constant:
        kk = kk - mean[kept, None] * mean[None, kept]
        kr = kr - mean[kept, None] * mean[None, removed]
    return kk, kr, floor


def _choose(halves: Tuple[Moments, Moments], removed: torch.Tensor, kept: torch.Tensor,
            w_r: torch.Tensor, constant: bool) -> Optional[float]:
    """The damping in :data:`DAMPINGS`, or ``_MEAN_ONLY`` / ``_NOTHING``, whose estimate fit on
    one half of the batches leaves the least error in the consumer's output on the other
    (summed over both ways round): ``tr(M E[e e^T])``, ``M = W_r W_r^T`` over the consumer's
    outputs (and kernel positions), ``e = x_r - T x_K - t``; ``None`` when no choice gives a
    finite error (the default damping then).

    In the eigenbasis ``V`` of the fit half's kept block (``T = P^T D V^T``, ``P = V^T
    C_Kr``, ``D = diag(1 / (eig + lam))``) every candidate's error is a few products of
    vectors with matrices computed once per half, O(k^2) per candidate."""
    flat = w_r.reshape(len(removed), -1)
    weight = flat @ flat.T  # M, [r, r]
    choices = list(DAMPINGS) + [_MEAN_ONLY, _NOTHING]
    total = torch.zeros(len(choices), dtype=torch.float64)
    for (fit, held) in (halves, halves[::-1]):
        kk, kr, floor = _blocks(fit[0], fit[1], removed, kept, constant)
        values, vectors = torch.linalg.eigh(kk)
        values = values.clamp_min(0)
        scale = float(kk.diagonal().mean())
        p = vectors.T @ kr  # [k, r]
        m, s = held[0], held[1]
        s_kk = vectors.T @ s[kept][:, kept] @ vectors
        s_kr = vectors.T @ s[kept][:, removed]
        cross = ((s_kr @ weight) * p).sum(1)  # tr(M T S_Kr) = cross . d
        quad = (p @ weight @ p.T) * s_kk  # tr(M T S_KK T^T) = d^T quad d
        base = float((weight * s[removed][:, removed]).sum())
        fit_k, held_k = vectors.T @ fit[0][kept], vectors.T @ m[kept]
        for i, choice in enumerate(choices):
            d = torch.zeros_like(values)
            if choice not in (_MEAN_ONLY, _NOTHING):
                d = 1 / (values + max(choice * scale, floor))
            t = torch.zeros(len(removed), dtype=torch.float64)
            if constant and choice != _NOTHING:
                t = fit[0][removed] - p.T @ (d * fit_k)
            u = m[removed] - p.T @ (d * held_k)
            total[i] += (base - 2 * (cross @ d) + d @ quad @ d
                         - 2 * (u @ weight @ t) + t @ weight @ t)
    if not bool(torch.isfinite(total).any()):
        return None
    total = torch.where(torch.isfinite(total), total, torch.full_like(total, float("inf")))
    return choices[int(torch.argmin(total))]
