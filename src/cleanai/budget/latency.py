"""A latency lookup table: what each layer's forward costs at a grid of its widths, measured
on the model's device, and a fit that turns the layers' sum into the whole model's latency.

Built once per pruner (the first time a latency budget is planned):

- **Per layer.** Every layer whose input or output channels a group slices, and whose forward
  takes one tensor (Linear, Conv, LSTM, ...), is copied, pruned with its own
  :class:`~cleanai.LayerPruner` to 25%, 50%, 75% and 100% of its input and of its output
  channels (a 4 x 4 grid; one axis for a depthwise conv or a norm), and timed alone on a random
  input of the shape it saw in the example forward: warm-up, then the median of a few runs.
  Between grid points the table is read bilinearly, so a layer whose time is proportional to
  ``in * out`` (a dense product) is read exactly.
- **The whole model.** The layers' sum ``L(plan)`` leaves out what runs between them
  (activations, norms, attention products, the framework's overhead), and a layer timed alone
  runs faster or slower than inside the model. The model's latency is predicted as
  ``alpha + beta * L(plan)``, on the line through the whole-model timings nearest the target:
  the model as it is, then each candidate plan the budget times (:meth:`LatencyTable.observe`).

A plan's latency is then known without building or running it (:meth:`LatencyTable.predict`);
the budget only times the plan it picks, to check it and to refit.
"""
from __future__ import annotations

import bisect
import logging
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.layers import get_layer_pruner
from ..core.parametrized import deepcopy_module, slicing_originals
from ..core.runtime import find_submodule, preserved_state, run_forward
from .cost import CostModel

__all__ = ["LatencyTable"]

_Input = Tuple[Tuple[int, ...], torch.dtype, torch.device]  # a recorded layer input
FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # widths timed per layer side, as fractions of the current
logger = logging.getLogger(__name__)


class _Layer:
    """One timed layer: its grid of seconds over (input width, output width) and the cost
    model's indices of those two layer dims (``None`` when the side is not sliced)."""

    def __init__(self, name: str, in_key: Optional[int], out_key: Optional[int],
                 in_axis: List[float], out_axis: List[float], seconds: List[List[float]]) -> None:
        self.name = name
        self.in_key, self.out_key = in_key, out_key
        self.in_axis, self.out_axis = in_axis, out_axis  # kept fractions of the base width
        self.seconds = seconds  # seconds[i][j]: in_axis[i] x out_axis[j]

    def at(self, f_in: float, f_out: float) -> float:
        """Seconds at kept fractions ``f_in``, ``f_out``, read bilinearly (extrapolated
        linearly below the smallest width timed, never below 0)."""
        i, a = _segment(self.in_axis, f_in)
        j, b = _segment(self.out_axis, f_out)
        s = self.seconds
        i1, j1 = min(i + 1, len(s) - 1), min(j + 1, len(s[0]) - 1)
        top = s[i][j] + (s[i][j1] - s[i][j]) * b
        bottom = s[i1][j] + (s[i1][j1] - s[i1][j]) * b
        return max(0.0, top + (bottom - top) * a)


def _segment(axis: List[float], f: float) -> Tuple[int, float]:
    """The grid segment holding ``f`` and its position in it (may fall outside [0, 1] when
    ``f`` lies beyond the axis)."""
    if len(axis) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(axis, f) - 1, 0), len(axis) - 2)
    return i, (f - axis[i]) / (axis[i + 1] - axis[i])


class LatencyTable:
    """Predicted seconds of one forward of ``model`` (at ``example_inputs``) after any plan.

    Args:
        model: the model at its current widths; ``cost_model`` must describe it (a pruner's
            ``pruner.cost_model``), and follows later steps as the graph does.
        cost_model: gives each layer dim's kept width under a plan.
        example_inputs, forward_fn: the forward whose layer inputs are recorded (shapes only).
        repeats: timed runs per grid point (their median counts), after two warm-up runs.

    ``predict(removals)`` is the model's predicted latency after ``removals`` (group id ->
    channel indices, as a :class:`~cleanai.PruningPlan` holds them); ``observe(removals,
    seconds)`` adds a whole-model timing and refits. ``layers`` maps each timed layer's name
    to its grid: ``{"in": fractions, "out": fractions, "seconds": rows}``; ``build_seconds``
    is what timing them took.
    """

    def __init__(self, model: nn.Module, cost_model: CostModel, example_inputs: Any = None,
                 forward_fn: Any = None, *, repeats: int = 5) -> None:
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self.cost_model = cost_model
        graph = cost_model.graph
        inputs = graph.example_inputs if example_inputs is None else example_inputs
        fn = graph.forward_fn if forward_fn is None else forward_fn
        self.base = cost_model.lengths()  # widths the grid's fractions refer to
        self._points: List[Tuple[float, float]] = []  # (layer sum, measured whole model)
        self.alpha, self.beta = 0.0, 1.0
        start = time.perf_counter()
        self._layers = self._time_layers(model, _layer_inputs(model, cost_model, inputs, fn),
                                         repeats)
        self.build_seconds = time.perf_counter() - start
        logger.info("latency table: %d layers timed in %.1f s", len(self._layers),
                    self.build_seconds)

    # --- building ----------------------------------------------------------------------

    def _time_layers(self, model: nn.Module, seen: Dict[str, List[_Input]],
                     repeats: int) -> List[_Layer]:
        cm = self.cost_model
        # layer dims some group may narrow; the others are timed at their width only
        free = {cm.key_index.get((m.name, "out" if m.kind == "same" else m.kind, m.dim))
                for g in cm.graph.groups if g.prunable > 0 for m in g.members}
        out = []
        for name, inputs in seen.items():
            module = find_submodule(model, name)
            pruner = get_layer_pruner(module, inherited=True)
            in_key = cm.key_index.get((name, "in", -1))
            out_key = cm.key_index.get((name, "out", -1))
            in_key, out_key = (k if k in free else None for k in (in_key, out_key))
            same = pruner.coupling(module) == "same"
            if same:
                in_key = None
            sides = []
            for key, blocks in ((in_key, pruner.in_blocks(module)), (out_key,
                                                                     pruner.blocks(module))):
                length = int(self.base[key]) if key is not None else 0
                sides.append(_keeps(length, blocks) if key is not None else [(1.0, None)])
            def timed(i: int, j: int) -> float:
                k_in, k_out = sides[0][i][1], sides[1][j][1]
                clone = _pruned(module, pruner, k_in, k_out, same)
                return sum(_time_call(clone, _sliced(x, pruner.in_dim(module, len(x[0])),
                                                     k_out if same else k_in), repeats)
                           for x in inputs)

            try:
                grid = [[timed(i, j) for j in range(len(sides[1]))]
                        for i in range(len(sides[0]))]
                _retime_outliers(grid, timed)
            except Exception as e:  # a layer that does not run alone: left to the fit
                logger.info("latency table: %s not timed alone (%s)", name, e)
                continue
            out.append(_Layer(name, in_key, out_key, [f for f, _ in sides[0]],
                              [f for f, _ in sides[1]], grid))
        return out

    # --- reading -----------------------------------------------------------------------

    @property
    def layers(self) -> Dict[str, Dict[str, Any]]:
        return {lay.name: {"in": list(lay.in_axis), "out": list(lay.out_axis),
                           "seconds": [list(r) for r in lay.seconds]} for lay in self._layers}

    @property
    def timings(self) -> List[Tuple[float, float]]:
        """Every whole-model timing observed: (the layers' summed seconds, measured seconds)."""
        return list(self._points)

    def layer_seconds(self, removals: Optional[Dict[int, torch.Tensor]] = None) -> float:
        """The timed layers' summed seconds after ``removals``."""
        kept = self.cost_model.kept(removals or {})
        frac = kept / self.base.clamp(min=1)
        return sum(lay.at(float(frac[lay.in_key]) if lay.in_key is not None else 1.0,
                          float(frac[lay.out_key]) if lay.out_key is not None else 1.0)
                   for lay in self._layers)

    def predict(self, removals: Optional[Dict[int, torch.Tensor]] = None) -> float:
        """Predicted seconds of the model's forward after ``removals``."""
        return self.alpha + self.beta * self.layer_seconds(removals)

    def observe(self, removals: Optional[Dict[int, torch.Tensor]], seconds: float,
                near: Optional[float] = None) -> None:
        """Add a whole-model timing (the model after ``removals`` took ``seconds``) and refit
        ``alpha + beta * layers`` where it matters: on the line through the two timings that
        bracket ``near`` seconds (default: this timing), or the two closest to it. With one
        timing, or a slope the noise made useless, the model's time is taken as proportional
        to the layers' (``alpha = 0``) through the closest timing."""
        self._points.append((self.layer_seconds(removals), float(seconds)))
        self.fit(float(seconds) if near is None else near)

    def fit(self, near: float) -> None:
        """Refit ``alpha`` and ``beta`` to the timings around ``near`` seconds
        (see :meth:`observe`)."""
        if not self._points:
            return
        below = [p for p in self._points if p[1] <= near]
        above = [p for p in self._points if p[1] > near]
        if below and above:
            pair = [max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])]
        else:
            pair = sorted(self._points, key=lambda p: abs(p[1] - near))[:2]
        (x1, y1), (x2, y2) = pair[0], pair[-1]
        if len(pair) == 2 and x1 != x2 and (y2 - y1) / (x2 - x1) > 0:
            self.beta = (y2 - y1) / (x2 - x1)
            self.alpha = y1 - self.beta * x1
        else:
            self.alpha, self.beta = 0.0, y1 / max(x1, 1e-12)

    def __repr__(self) -> str:
        return (f"LatencyTable({len(self._layers)} layers timed, latency = {self.alpha:.3g} s "
                f"+ {self.beta:.3g} x layers; {len(self._points)} whole-model timings)")


def _layer_inputs(model: nn.Module, cm: CostModel, inputs: Any,
                  fn: Any) -> Dict[str, List[_Input]]:
    """The positional input of every call of each layer the cost model slices, recorded as
    its shape, dtype and device (only single-tensor calls; others are left to the fit)."""
    names = {name for name, kind, _ in cm.keys if kind in ("in", "out")}
    seen: Dict[str, List[_Input]] = {}
    bad = set()
    handles = []

    def hook(name):
        def record(module, args, kwargs):
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                x = args[0]
                seen.setdefault(name, []).append((tuple(x.shape), x.dtype, x.device))
            else:
                bad.add(name)
        return record

    for name in names:
        module = find_submodule(model, name)
        if isinstance(module, nn.Module) and get_layer_pruner(module, inherited=True):
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with preserved_state(model, same_modes=True), torch.no_grad():
            run_forward(model, inputs, fn)
    finally:
        for h in handles:
            h.remove()
    return {n: xs for n, xs in seen.items() if n not in bad}


def _keeps(length: int, blocks: int) -> List[Tuple[float, Optional[torch.Tensor]]]:
    """(kept fraction, kept positions) per grid width of a side of ``length`` channels in
    ``blocks`` equal blocks; the full width keeps everything (``None``)."""
    out: List[Tuple[float, Optional[torch.Tensor]]] = []
    blocks = max(1, blocks)
    per = length // blocks if length % blocks == 0 else 0
    for f in FRACTIONS:
        if f == 1.0 or per == 0:
            if not out or out[-1][0] != 1.0:
                out.append((1.0, None))
            continue
        k = max(1, round(per * f))
        if k >= per or (out and k * blocks / length <= out[-1][0]):
            continue
        keep = (torch.arange(blocks).unsqueeze(1) * per + torch.arange(k)).reshape(-1)
        out.append((k * blocks / length, keep))
    return out


def _pruned(module: nn.Module, pruner: Any, k_in: Optional[torch.Tensor],
            k_out: Optional[torch.Tensor], same: bool) -> nn.Module:
    clone = deepcopy_module(module).eval()
    if k_in is not None or k_out is not None:
        with slicing_originals(clone):
            pruner.prune(clone, k_out if same else k_in, k_out)
    return clone


def _sliced(spec: _Input, dim: int, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """A random input of ``spec`` (shape, dtype, device) with only ``keep`` of its channels
    (along ``dim``)."""
    shape, dtype, device = spec
    x = torch.randn(shape, dtype=dtype, device=device) if dtype.is_floating_point \
        else torch.zeros(shape, dtype=dtype, device=device)
    if keep is None:
        return x
    return x.index_select(dim, keep.to(x.device))


def _retime_outliers(grid: List[List[float]], timed: Any) -> None:
    """Time again, and keep the faster of the two, every grid point well above what its
    narrower neighbours predict (a busy moment on the machine makes a layer look slower,
    never faster). The prediction is linear along an axis, and the parallelogram rule
    ``t[i-1][j] + t[i][j-1] - t[i-1][j-1]`` inside the grid."""
    for i, row in enumerate(grid):
        for j, t in enumerate(row):
            if i and j:
                guess = grid[i - 1][j] + row[j - 1] - grid[i - 1][j - 1]
            elif i >= 2:
                guess = 2 * grid[i - 1][j] - grid[i - 2][j]
            elif j >= 2:
                guess = 2 * row[j - 1] - row[j - 2]
            else:
                continue
            if t > 1.5 * max(guess, grid[max(i - 1, 0)][max(j - 1, 0)]):
                row[j] = min(t, timed(i, j))


def _time_call(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``module(x)`` under no_grad, after two warm-up calls."""
    cuda = x.device.type == "cuda"
    times: List[float] = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            module(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)

