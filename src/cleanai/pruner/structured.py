"""StructuredPruner: turns importance scores into plans and applies them, step by step."""
from __future__ import annotations

import datetime
import logging
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import nn

from ..core.graph import DependencyGraph, Group, module_signature
from .. import distributed
from ..core.runtime import ForwardFn
from ..importance import Importance, WeightImportance
from ..importance.stats import ActivationStats
from .apply import PruningError, apply_removals, copy_model, slice_model
from .compensate import MODES as COMPENSATION_MODES
from .compensate import CompensationReport, plan_compensation
from .calibration import calibrate_here, follow_step
from .keeps import layer_keeps
from .attributes import attribute_updates, set_attributes, update_config
from .fallback import protect_breaking
from .history import record_step
from .budget import Target, budget_cost_model, parse_targets
from .collective import apply_together, calibrate_together, plan_together
from .outputs import free_outputs
from .plan import PruningPlan
from .planning import RATIO_KINDS, inside, plan_step
from .references import LayerNames, infer_example_inputs
from ..core.parametrized import deepcopy_module

logger = logging.getLogger(__name__)

LayerRef = Union[str, nn.Module]
Schedule = Callable[[int, int, float], float]
GROUP_KINDS = ("heads", "head_dims", "hidden", "channels")


def linear_schedule(step: int, steps: int, ratio: float) -> float:
    """The ratio reached after ``step`` of ``steps`` steps: ``ratio * step / steps``."""
    return ratio * step / steps


class StructuredPruner:
    """Removes whole channels from ``model``, coupled channels together.

    Args:
        model: the model to prune, in place.
        example_inputs: inputs for one forward pass (tensor, tuple or dict). Inferred from the
            first layer when omitted: Conv2d -> ``1 x C x 224 x 224``, Conv1d -> ``1 x C x 256``,
            Linear -> ``1 x in_features``, Embedding -> 16 token ids.
        importance: scores channels (default :class:`~cleanai.importance.WeightImportance`).
        pruning_ratio: fraction of each group's channels to remove, in [0, 1).
        layer_pruning_ratios: ``{layer: ratio}`` overrides; keys are modules or qualified names,
            a container applies to every layer inside it (the most specific key wins).
        ignored_layers: modules or names whose output channels are kept.
        global_pruning: rank normalised scores across all groups instead of within each.
        allocation: an importance whose scores compare channels across groups, e.g.
            :class:`~cleanai.importance.OutputSensitivity`: how many channels each group loses
            comes from one ranking of these scores across the groups of each kind (the
            kind's total stays what the ratios give), and ``importance`` picks which. With a
            budget, the budget's ranking reads it too. Calibrated with ``importance``.
        max_pruning_ratio: no group loses more than this fraction (and never all channels).
        iterative_steps: reach the ratio in this many steps; ratios are relative to the
            original width.
        iterative_schedule: ``schedule(step, steps, ratio) -> ratio after step`` (linear).
        round_to: kept channel counts become multiples of this.
        forward_fn: ``forward_fn(model, example_inputs)`` for models that need a custom call.
        attention: ``"heads"`` removes whole attention heads (``head_dim`` stays);
            ``"head_dims"`` removes the same dims from every head (the head count stays).
        kinds: which kinds of groups may lose channels, any of ``"heads"`` / ``"head_dims"``
            (attention), ``"channels"`` (MLP intermediate neurons, conv channels) and
            ``"hidden"`` (widths shared through residual additions: a transformer's hidden
            size); ``None`` means all. Model outputs are kept, whatever the kind, unless
            ``prune_outputs`` says otherwise.
        check_forward: after slicing, run the model once on ``example_inputs`` and roll the
            step back if it fails (then :meth:`step` protects the groups that break it and
            plans again). ``"auto"`` (default) runs it unless the trace found no code that could
            hold a channel count of its own: every torch call outside the known layers was
            width-free (no ``x.shape``, ``view``, hook or custom layer; see
            ``DependencyGraph.check_reason`` and :mod:`cleanai.core.widths`), as in most CNNs. ``True`` always runs it;
            ``False`` skips it (about half a forward of the pruned model per step saved): a
            layer that keeps a channel count of its own then fails in your next call. A step
            that prunes a layer whose output the code slices (``graph.slices``) is always
            checked: a slice at bounds written in the code would read the wrong channels
            without failing.
        compensate: ``None`` (default), ``"bias"`` or ``"lstsq"``: when a step removes
            channels, the layers that read them take over what those channels contributed,
            computed from :meth:`calibrate`'s statistics (see :mod:`cleanai.pruner.compensate`).
            ``"bias"`` adds the removed channels' mean contribution to each consumer's bias;
            ``"lstsq"`` also refits the consumer's kept input weights to the least-squares
            estimate of the removed channels. A consumer without a bias gets one where its
            type allows (Linear, conv); ``pruner.compensation`` reports each step.
        keep_teacher: keep ``pruner.teacher``, a deep copy of the model as it is now, for
            :func:`cleanai.recover.reconstruct` and :func:`cleanai.recover.distill`.
        target_macs, target_params: a budget instead of a ratio: a fraction of the dense model
            in (0, 1) or an absolute count. The plan ranks the channels of every group not
            named in ``layer_pruning_ratios`` together, by normalised score, and takes as few
            as meet the budget, computed by :class:`cleanai.budget.CostModel` (within one
            channel; see :mod:`cleanai.pruner.budget`); both may be given. ``pruning_ratio`` and ``global_pruning`` are then
            unused; ``ignored_layers``, ``kinds``, ``max_pruning_ratio``, ``round_to`` and the
            iterative schedule still apply. :class:`~cleanai.pruner.budget.BudgetError` says
            why when the budget cannot be met.
        target_latency: a latency budget, a fraction of the dense latency in (0, 1) or a
            ``datetime.timedelta``: plans are found with a lookup table of the layers'
            timings on the model's device (:attr:`latency_table`), and the plan found is timed
            (median of 30 runs at ``example_inputs``) and the table refitted until one fits.
        prune_outputs: the model's outputs keep their width by default (they are its contract
            with its callers). For a backbone whose head will be retrained or replaced
            (a timm ``features_only`` model, a detector's FPN inputs), ``True`` lets every
            output lose channels like any other group; a list of layers (modules or names, a
            container meaning every layer inside it) frees only the outputs they produce.
            A layer named exactly in ``layer_pruning_ratios`` frees its own output too. The
            plan's summary and each :attr:`history` entry (``"outputs"``) say which outputs
            narrowed; :func:`cleanai.save_pruned` / :func:`cleanai.load_pruned` replay them.
        process_group: under ``torch.distributed``, the ranks that prune together (default:
            every rank, when a process group is initialised): calibration statistics are summed
            across them, rank 0 plans, every rank applies the same plan and the models are
            compared (see :mod:`cleanai.distributed`). A ``DistributedDataParallel`` model is
            pruned through its ``module``; wrap it again afterwards
            (:func:`cleanai.distributed.rewrap`).

    Module attributes that store pruned widths (``num_heads``, ``head_dim``, ``split_size``,
    ``intermediate_size``...) and a Hugging Face ``model.config`` are updated with the tensors
    (see :mod:`cleanai.pruner.attributes`).
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None,
                 importance: Optional[Importance] = None, pruning_ratio: float = 0.5,
                 layer_pruning_ratios: Optional[Mapping[LayerRef, float]] = None,
                 ignored_layers: Optional[Iterable[LayerRef]] = None,
                 global_pruning: bool = False, max_pruning_ratio: float = 1.0,
                 iterative_steps: int = 1, iterative_schedule: Optional[Schedule] = None,
                 round_to: Optional[int] = None, forward_fn: Optional[ForwardFn] = None,
                 attention: str = "heads", kinds: Optional[Iterable[str]] = None,
                 check_forward: Union[bool, str] = "auto", compensate: Optional[str] = None,
                 keep_teacher: bool = False, target_macs: Optional[float] = None,
                 target_params: Optional[float] = None,
                 target_latency: Union[float, "datetime.timedelta", None] = None,
                 prune_outputs: Union[bool, Iterable[LayerRef]] = False,
                 process_group: Any = None, allocation: Optional[Importance] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = distributed.unwrap(model)
        _check_ratio("pruning_ratio", pruning_ratio)
        if not 0 < max_pruning_ratio <= 1:
            raise ValueError(f"max_pruning_ratio must be in (0, 1], got {max_pruning_ratio}")
        if not isinstance(iterative_steps, int) or iterative_steps < 1:
            raise ValueError(f"iterative_steps must be a positive int, got {iterative_steps!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
        if compensate not in (None,) + COMPENSATION_MODES:
            raise ValueError(f"compensate must be None, 'bias' or 'lstsq', got {compensate!r}")
        targets = parse_targets(target_macs, target_params, target_latency)
        if importance is not None and not callable(importance):
            raise TypeError("importance must be callable: importance(group, model) -> scores")
        if allocation is not None and not callable(allocation):
            raise TypeError("allocation must be callable: allocation(group, model) -> scores")
        self.kinds = set(GROUP_KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
        if not self.kinds <= set(GROUP_KINDS):
            raise ValueError(f"kinds must be among {GROUP_KINDS}, got {sorted(self.kinds)}")
        names = LayerNames(model) if layer_pruning_ratios or ignored_layers else None
        self.layer_ratios: Dict[str, float] = {}
        for key, ratio in (layer_pruning_ratios or {}).items():
            name = names.resolve(key, "layer_pruning_ratios")
            _check_ratio(f"layer_pruning_ratios[{name!r}]", ratio)
            self.layer_ratios[name] = float(ratio)
        self.ignored = [names.resolve(k, "ignored_layers") for k in (ignored_layers or [])]

        self.model = model
        self.example_inputs = example_inputs if example_inputs is not None else infer_example_inputs(model)
        self.importance = importance if importance is not None else WeightImportance()
        self.pruning_ratio = float(pruning_ratio)
        self.global_pruning = global_pruning
        self.allocation = allocation
        self.max_pruning_ratio = max_pruning_ratio
        self.iterative_steps = iterative_steps
        self.schedule = iterative_schedule or linear_schedule
        self.round_to = round_to
        if not (isinstance(check_forward, bool) or check_forward == "auto"):
            raise ValueError(f"check_forward must be True, False or 'auto', got {check_forward!r}")
        self.check_forward = check_forward
        self.graph = DependencyGraph(model, self.example_inputs, forward_fn, attention)
        #: the groups whose model-output channels may be pruned (``prune_outputs``)
        self.freed_outputs = free_outputs(model, self.graph, prune_outputs, self.layer_ratios)
        self.original_size = {g.id: g.size for g in self.graph.groups}
        if not any(g.prunable and g.size > 1 for g in self.graph.groups):
            from .protection import unchanged_message  # names the largest protected groups
            warnings.warn(unchanged_message(type(model).__name__, self.graph.groups), stacklevel=2)
        self.current_step = 0
        self.history: List[Dict[str, Any]] = []
        self.process_group = process_group
        self.compensate = compensate
        #: the calibration statistics compensation reads (set by :meth:`calibrate`)
        self.input_stats: Optional[ActivationStats] = None
        #: what each step's compensation did, one report per step applied
        self.compensation: List[CompensationReport] = []
        #: the model as it was when the pruner was built (``keep_teacher=True``), else None
        self.teacher: Optional[nn.Module] = deepcopy_module(model) if keep_teacher else None
        #: the budgets (``target_macs`` / ``target_params`` / ``target_latency``)
        self.targets: List[Target] = targets
        #: params and MACs of any plan, when a budget is set (:class:`cleanai.budget.CostModel`)
        self.cost_model = None
        self._dense_latency: Optional[float] = None
        self._latency_table = None
        if targets:
            self.cost_model = budget_cost_model(model, self.graph, targets)

    # --- policy ------------------------------------------------------------------------

    def group_ratio(self, group: Group) -> Optional[float]:
        """The target ratio for ``group``, or ``None`` when it is ignored."""
        if group.kind not in self.kinds:
            return None
        if not self.ignored and not self.layer_ratios:
            return self.pruning_ratio
        layers = [m.name for m in group.members if m.kind in RATIO_KINDS]
        if any(inside(layer, ig) for layer in layers for ig in self.ignored):
            return None
        best, depth = self.pruning_ratio, -1
        for key, ratio in self.layer_ratios.items():
            for layer in layers:
                if inside(layer, key) and (len(key) > depth or (len(key) == depth and ratio > best)):
                    best, depth = ratio, len(key)
        return best

    def plan(self) -> PruningPlan:
        """The plan for the next step; nothing changes until :meth:`apply`.

        Under a process group, rank 0 plans and every rank receives its plan."""
        group = distributed.active_group(self.process_group)
        if group is None:
            return plan_step(self)
        return plan_together(self, group, lambda: plan_step(self))

    # --- actions -----------------------------------------------------------------------

    def calibrate(self, data: Iterable, max_batches: Optional[int] = None,
                  forward_fn: Optional[ForwardFn] = None, progress: bool = False) -> None:
        """Measure what a data-dependent importance needs (activation statistics, gradients)
        and, with ``compensate``, what compensation needs (each consumer's input mean and
        second moment, in :attr:`input_stats`), in one pass where the importance can share it.

        ``data`` is a DataLoader or any iterable of batches: a tensor, a tuple (an
        ``(inputs, targets)`` pair gives ``inputs`` to the model; other tuples are passed
        positionally) or a dict (keywords; positions where its ``attention_mask`` is 0 do not
        count). Statistics are streamed: memory stays O(channels) however many batches run
        (O(channels^2) per consumer for ``compensate="lstsq"``). ``progress=True`` shows a
        tqdm bar when tqdm is installed.
        """
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        group = distributed.active_group(self.process_group)
        if group is None:
            return self._calibrate_here(data, max_batches, forward_fn, progress)
        shard = distributed.rank_and_world(group)
        calibrate_together(self, group, lambda: self._calibrate_here(
            data, max_batches, forward_fn, progress, shard))

    def _calibrate_here(self, data: Iterable, max_batches: Optional[int],
                        forward_fn: Optional[ForwardFn], progress: bool,
                        shard: Tuple[int, int] = (0, 1)) -> None:
        calibrate_here(self, data, max_batches, forward_fn, progress, shard)

    def apply(self, plan: PruningPlan) -> None:
        """Apply ``plan`` to the model, all or nothing, and record it in :attr:`history`.

        Tensors are sliced in place: the model keeps its ``nn.Parameter`` and buffer objects
        (an optimizer's references stay attached; take the step inside
        :class:`cleanai.train.slice_optimizer_state` to cut its per-parameter state too).
        On any failure every tensor, attribute and hook is exactly as it was before.
        Under a process group every rank applies the plan, then the ranks' models are compared.
        """
        group = distributed.active_group(self.process_group)
        if group is None:
            return self._apply_here(plan)
        apply_together(self, group, plan, self._apply_here)

    def _apply_here(self, plan: PruningPlan) -> None:
        if plan.graph is not self.graph:
            raise PruningError("this plan was made for another pruner's graph")
        signature = self.graph.signature
        before = {g.id: g.size for g in self.graph.groups}
        comp = None
        if self.compensate is not None:
            if self.input_stats is None:
                raise RuntimeError(f"compensate={self.compensate!r} needs calibration "
                                   f"statistics: call pruner.calibrate(data) before the step")
            plan.validate()
            keeps = layer_keeps(self.graph, plan.removals)
            comp = plan_compensation(self.model, self.graph, keeps, self.input_stats,
                                     self.compensate)
            comp.write()
        try:
            layers = apply_removals(self.model, self.graph, plan.removals,
                                    check_forward=self.check_forward)
        except BaseException:
            if comp is not None:
                comp.undo()
            raise
        if comp is not None:
            layers += comp.finish(keeps)  # the step's own keeps, from before the renumbering
            self.graph.signature = module_signature(self.model)
            self.compensation.append(comp.report)
        layers += update_config(self.model, self.graph, before)
        follow_step(self, layers)
        self.current_step = max(self.current_step, plan.step)
        entry: Dict[str, Any] = {"step": plan.step, "layers": layers}
        if plan.outputs:  # the model's outputs narrowed, on request (prune_outputs)
            entry["outputs"] = [dict(o) for o in plan.outputs]
        self.history.append(entry)
        record_step(self.model, self.history[-1], signature, self.graph.signature)
        logger.info("pruning step %d/%d: removed %d channels", plan.step, self.iterative_steps,
                    plan.num_removed)

    def state_dict(self) -> Dict[str, Any]:
        """The pruner's progress as plain data (JSON-able): the steps taken, each group's
        original width, a budget's dense MACs and parameters, the dense latency, and the
        settings that decide what the steps reach (checked on load). To stop between two
        steps and go on in another process, save it next to the model
        (:func:`cleanai.save_pruned`); calibration statistics are not in it (calibrate again),
        nor is an ``iterative_schedule`` function (give the same one)."""
        from .state import pruner_state
        return pruner_state(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Go on from :meth:`state_dict`: build this pruner with the saved settings over the
        model :func:`cleanai.load_pruned` rebuilt at its saved widths; the next :meth:`step`
        is the saved run's next, with ratios and budgets still relative to its dense model.

        Raises:
            ValueError: the state comes from other settings or another model, or the model
                is not at the saved widths; nothing changes.
        """
        from .state import check_pruner_state, load_pruner_state
        if not isinstance(state, dict) or not {"config", "groups", "current_step"} <= set(state):
            raise ValueError("load_state_dict needs a dict from StructuredPruner.state_dict()")
        check_pruner_state(self, state)
        load_pruner_state(self, state)

    @property
    def latency_table(self):
        """The :class:`cleanai.budget.LatencyTable` a latency budget plans with, timed on the
        model's device the first time it is read."""
        if self._latency_table is None:
            from ..budget.latency import LatencyTable
            self._latency_table = LatencyTable(self.model, self.cost_model, self.example_inputs,
                                               self.graph.forward_fn)
        return self._latency_table

    def pruned_copy(self, plan: PruningPlan, compensate: bool = True) -> nn.Module:
        """A deep copy of the model with ``plan`` applied (and compensated, with the pruner's
        ``compensate``, calibration statistics and ``compensate=True``); the model, the graph
        and :attr:`history` stay as they are. For measuring a candidate plan."""
        if plan.graph is not self.graph:
            raise PruningError("this plan was made for another pruner's graph")
        plan.validate()
        model = copy_model(self.model)
        keeps = layer_keeps(self.graph, plan.removals)
        comp = None
        if compensate and self.compensate is not None and self.input_stats is not None:
            with warnings.catch_warnings():  # the step itself reports them; a preview is quiet
                warnings.simplefilter("ignore")
                comp = plan_compensation(model, self.graph, keeps, self.input_stats,
                                         self.compensate)
            comp.write()
        slice_model(model, keeps)
        set_attributes(model, attribute_updates(self.model, self.graph, plan.removals, keeps))
        if comp is not None:
            comp.finish(keeps)
        return model

    def step(self) -> PruningPlan:
        """Plan and apply the next step; returns the applied plan.

        If the pruned model no longer runs (code that keeps a channel count CleanAI cannot
        see: ``x.view(-1, 16, 1, 1)`` in a forward, a split by fixed sizes, a layer that checks
        its width), the step is rolled back, the groups whose removal breaks it are found by
        bisection (about ``log2(groups)`` forwards each; see :mod:`cleanai.pruner.fallback`),
        protected with a warning that names the failure and where it happened, and the step
        is planned again: the other groups are pruned as planned.
        """
        fell_back = False
        while True:
            plan = self.plan()
            try:
                self.apply(plan)
            except PruningError as exc:
                if not protect_breaking(self.model, self.graph, plan.removals, exc):
                    raise
                fell_back = True
                continue
            if fell_back and plan.num_removed == 0:
                from .protection import unchanged_message
                warnings.warn(unchanged_message(type(self.model).__name__, self.graph.groups),
                              stacklevel=2)
            return plan

    def prune(self) -> nn.Module:
        """Run every remaining step and return the (same, now smaller) model."""
        while self.current_step < self.iterative_steps:
            self.step()
        return self.model


def _check_ratio(name: str, ratio: Any) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {ratio!r}")
