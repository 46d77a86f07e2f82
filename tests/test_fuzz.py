"""Property-based fuzzing: random architectures (residual adds, concat, chunk/split, grouped and
depthwise convs, SE gates, a module used twice, flatten into a Linear, nested containers), random
ratios, global or per layer. Every pruned model must run, keep its output shape, match the
zero-weight equivalence and come from a deterministic plan.

The default run tries 200 architectures; ``CLEANAI_FUZZ_EXAMPLES=2000 pytest -m slow
tests/test_fuzz.py`` runs the long version. Architectures hypothesis once broke the library on
are kept below as named regression tests.
"""
import copy
import os
from typing import List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cleanai import PruningError, PruningPlan, StructuredPruner
from cleanai.importance import RandomImportance, WeightActivationImportance, WeightImportance
from cleanai.utils import count_params

from equivalence import zero_consumers

Spec = List[Tuple]
X_SHAPE = (2, 3, 8, 8)


def _conv(cin, cout, k=3, groups=1):
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)


class Conv(nn.Module):
    """conv (optionally grouped), then BatchNorm and ReLU when asked."""

    def __init__(self, c, cout, k, groups, bn):
        super().__init__()
        layers = [_conv(c, cout, k, groups)] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self, c, bn, depth):
        super().__init__()
        self.body = nn.Sequential(*[Conv(c, c, 3, 1, bn) for _ in range(depth)])

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """``cat([a(x), b(x)])``, or ``cat([x, a(x)])`` (DenseNet style) when ``dense``."""

    def __init__(self, c, ca, cb, dense):
        super().__init__()
        self.dense = dense
        self.a = _conv(c, ca)
        self.b = None if dense else _conv(c, cb, 1)

    def forward(self, x):
        return torch.cat([x, self.a(x)] if self.dense else [self.a(x), self.b(x)], 1)


class Chunk(nn.Module):
    """Two halves of the channels: convolved and concatenated, added, or gated (GLU)."""

    def __init__(self, c, how):
        super().__init__()
        self.how = how
        self.convs = nn.ModuleList([_conv(c // 2, c // 2)] if how == "add" else
                                   [_conv(c // 2, c // 2, 1)] if how == "glu" else
                                   [_conv(c // 2, c // 2), _conv(c // 2, c // 2, 1)])

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        if self.how == "cat":
            return torch.cat([self.convs[0](a), self.convs[1](b)], 1)
        if self.how == "add":
            return self.convs[0](a) + b
        return a * torch.sigmoid(self.convs[0](b))


class Split(nn.Module):
    """``torch.split`` into ``x.shape[1] * num // den`` and the remaining channels; the first
    part is convolved. Sizes come from the input's shape, as in ``chunk``: CleanAI prunes equal
    parts alike and protects the channels of an unequal split."""

    def __init__(self, c, num, den):
        super().__init__()
        self.num, self.den = num, den
        self.conv = _conv(self.first(c), self.first(c))

    def first(self, c):
        return min(c - 1, max(1, c * self.num // self.den))

    def forward(self, x):
        k = self.first(x.shape[1])
        a, b = torch.split(x, [k, x.shape[1] - k], dim=1)
        return torch.cat([b, torch.relu(self.conv(a))], 1)


class Depthwise(nn.Module):
    def __init__(self, c, mult, bn):
        super().__init__()
        self.conv = _conv(c, c * mult, 3, groups=c)
        self.bn = nn.BatchNorm2d(c * mult) if bn else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SE(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(pool(x)))))`` broadcast over H, W."""

    def __init__(self, c, r):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, r)
        self.fc2 = nn.Linear(r, c)

    def forward(self, x):
        s = self.pool(x).flatten(1)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * g.view(x.shape[0], x.shape[1], 1, 1)


class Shared(nn.Module):
    """One conv used twice."""

    def __init__(self, c):
        super().__init__()
        self.conv = _conv(c, c)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class FuzzNet(nn.Module):
    """stem -> ModuleList of Stages (each a Sequential of blocks) -> head."""

    def __init__(self, stem, stages, head, flatten):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.flatten = flatten
        self.head = head

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        x = x.flatten(1) if self.flatten else x.mean((2, 3))
        return self.head(x)


def build(spec: Spec, head: str, seed: int = 0) -> FuzzNet:
    """A model from a block list; each block adapts to the channels it receives."""
    torch.manual_seed(seed)
    c, h = 6, X_SHAPE[2]
    stem = Conv(3, c, 3, 1, True)
    stages, blocks = [], []
    mixing = False
    for kind, a, b in spec:
        if kind == "conv":
            cout = 2 * a
            groups = 2 if b and c % 2 == 0 else 1
            blk, c = Conv(c, cout, 3 if b != 2 else 1, groups, bn=b != 1), cout
        elif kind == "residual":
            blk = Residual(c, bn=bool(b), depth=1 + a % 2)
        elif kind == "concat":
            blk = Concat(c, a, b + 1, dense=b == 0)
            c = c + a if b == 0 else a + b + 1
        elif kind == "chunk":
            if c % 2:
                blocks.append(Conv(c, c + 1, 1, 1, False))
                c += 1
            blk = Chunk(c, ("cat", "add", "glu")[b % 3])
            c = c if b % 3 == 0 else c // 2
        elif kind == "split":
            if c < 2:
                blocks.append(Conv(c, 4, 1, 1, False))
                c = 4
            blk = Split(c, *((1, 2), (1, 3), (2, 3))[a % 3])
        elif kind == "depthwise":
            blk = Depthwise(c, 1 + a % 2, bn=bool(b))
            c *= 1 + a % 2
        elif kind == "se":
            blk = SE(c, max(1, a))
        elif kind == "shared":
            blk = Shared(c)
        elif kind == "pool":
            if h < 2:
                continue
            blk, h = (nn.MaxPool2d(2) if a % 2 else nn.AvgPool2d(2)), h // 2
        elif kind == "groupnorm":  # mixes channels within each group: no equivalence check
            if c % 2:
                continue
            blk, mixing = nn.Sequential(nn.GroupNorm(2, c), nn.ReLU()), True
        elif kind == "stage":
            if blocks:
                stages.append(Stage(blocks))
                blocks = []
            continue
        else:
            raise ValueError(kind)
        blocks.append(blk)
    stages.append(Stage(blocks or [nn.Identity()]))
    flatten = head == "flatten"
    if flatten and h > 2:
        stages[-1].blocks.append(nn.AdaptiveAvgPool2d(2))
        h = 2
    fc = nn.Linear(c * h * h if flatten else c, 5)
    model = FuzzNet(stem, stages, fc, flatten).eval()
    model.mixing = mixing
    return model


_small = st.integers(1, 6)
block = st.one_of(
    st.tuples(st.just("conv"), st.integers(2, 6), st.integers(0, 2)),
    st.tuples(st.just("residual"), _small, st.integers(0, 1)),
    st.tuples(st.just("concat"), st.integers(2, 6), st.integers(0, 5)),
    st.tuples(st.just("chunk"), _small, st.integers(0, 2)),
    st.tuples(st.just("split"), _small, st.just(0)),
    st.tuples(st.just("depthwise"), _small, st.integers(0, 1)),
    st.tuples(st.just("se"), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("shared"), st.just(0), st.just(0)),
    st.tuples(st.just("pool"), _small, st.just(0)),
    st.tuples(st.just("stage"), st.just(0), st.just(0)),
    st.tuples(st.just("groupnorm"), st.just(0), st.just(0)),
)
architectures = st.tuples(st.lists(block, min_size=1, max_size=7), st.sampled_from(["gap", "flatten"]))


IMPORTANCES = {"random": RandomImportance, "weight": lambda seed: WeightImportance(),
               "hybrid": lambda seed: WeightActivationImportance()}


def _pruner(model, x, seed, ratio, global_pruning, layer_ratios, importance):
    pruner = StructuredPruner(model, x, importance=IMPORTANCES[importance](seed),
                              pruning_ratio=ratio, global_pruning=global_pruning,
                              layer_pruning_ratios=layer_ratios)
    pruner.calibrate([x, x.flip(0)])
    return pruner


def check_architecture(spec: Spec, head: str, seed: int, ratio: float, global_pruning: bool,
                       per_layer: List[float], importance: str = "random") -> int:
    """Every property the fuzzer checks, for one architecture and one policy; returns how many
    channels the plan removed."""
    model = build(spec, head)
    x = torch.randn(*X_SHAPE, generator=torch.Generator().manual_seed(seed))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    layer_ratios = {convs[i % len(convs)]: r for i, r in enumerate(per_layer)}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected_shape = model(x).shape

    pruner = _pruner(model, x, seed, ratio, global_pruning, layer_ratios, importance)
    pruner.graph.check()
    plan = pruner.plan()
    # deterministic: the same model, inputs, policy and seed give the same plan
    again = _pruner(twin, x, seed, ratio, global_pruning, layer_ratios, importance).plan()
    assert plan.removals.keys() == again.removals.keys()
    assert all(torch.equal(plan.removals[g], again.removals[g]) for g in plan.removals)

    # zero-weight equivalence, unless a GroupNorm mixes the zeroed channels with kept ones
    zero_consumers(model, plan)
    with torch.no_grad():
        before = model(x)
    params = count_params(model)
    pruner.apply(plan)
    pruner.graph.check()
    with torch.no_grad():
        after = model(x)
    assert after.shape == expected_shape
    if not model.mixing:
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    if plan.num_removed:
        assert count_params(model) < params
    model.train()
    model(torch.cat([x, x])).sum().backward()  # still trainable
    return plan.num_removed


FUZZ_EXAMPLES = int(os.environ.get("CLEANAI_FUZZ_EXAMPLES", "2000"))
_fuzz_settings = dict(deadline=None, derandomize=True, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_policy = dict(seed=st.integers(0, 2 ** 16), ratio=st.floats(0.2, 0.9),
               global_pruning=st.booleans(),
               per_layer=st.lists(st.floats(0.0, 0.9), max_size=3),
               importance=st.sampled_from(sorted(IMPORTANCES)))


@settings(max_examples=200, **_fuzz_settings)
@given(arch=architectures, **_policy)
def test_fuzzed_architectures(arch, seed, ratio, global_pruning, per_layer, importance):
    # an empty plan proves little (equivalence holds trivially): such examples do not count
    assume(check_architecture(*arch, seed, ratio, global_pruning, per_layer, importance) > 0)


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, **{**_fuzz_settings, "derandomize": False})
@given(arch=architectures, **_policy)
def test_fuzzed_architectures_long(arch, seed, ratio, global_pruning, per_layer, importance):
    assume(check_architecture(*arch, seed, ratio, global_pruning, per_layer, importance) > 0)


# --- architectures the fuzzer once broke the library on -------------------------------------


def test_regression_equal_split_of_a_pruned_stem():
    """``torch.split`` into two equal parts: both parts lose the same positions."""
    check_architecture([("split", 0, 0)], "gap", seed=0, ratio=0.5, global_pruning=False,
                       per_layer=[])


def test_regression_shared_layer_after_a_partly_protected_concat():
    """A layer used twice ties a concat's parts to its own outputs: its group holds another
    producer's channels on only some positions (once graph.check() rejected that)."""
    check_architecture([("split", 1, 0), ("shared", 0, 0)], "gap", seed=0, ratio=0.5,
                       global_pruning=False, per_layer=[])


def test_regression_grouped_conv_after_a_dense_concat():
    """A grouped conv ties a DenseNet-style concat's parts: the stem holds some channels of its
    group at two positions, others at one (once graph.check() rejected that)."""
    check_architecture([("concat", 2, 0), ("conv", 2, 1)], "gap", seed=0, ratio=0.5,
                       global_pruning=False, per_layer=[])


def test_regression_a_producer_is_never_emptied():
    """The split conv produces 2 of its group's 6 channels, the other 4 are protected: a 50%
    ratio must not take both of them (a conv with no output channels)."""
    model = build([("split", 1, 0), ("shared", 0, 0)], "gap")
    x = torch.randn(*X_SHAPE)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    group = pruner.graph.group_of("stages.0.blocks.0.conv")[-1]
    held = next(m.channels for m in group.members if m.name == "stages.0.blocks.0.conv")
    with pytest.raises(PruningError, match="removes every channel of stages.0.blocks.0.conv"):
        pruner.apply(PruningPlan(pruner.graph, {group.id: held}))  # a hand-made plan
    pruner.prune()
    assert model.stages[0].blocks[0].conv.out_channels == 1
    assert model(x).shape == (2, 5)


class FixedSplit(nn.Module):
    """Splits off a fixed 3 channels (two halves of the traced input): pruning both halves alike
    hands the conv the wrong width."""

    def __init__(self):
        super().__init__()
        self.conv = _conv(3, 3)

    def forward(self, x):
        a, b = torch.split(x, [3, x.shape[1] - 3], dim=1)
        return torch.cat([b, torch.relu(self.conv(a))], 1)


def test_regression_split_with_fixed_sizes_protects_what_feeds_the_failing_layer():
    """The tracer cannot tell ``split(x, [3, C - 3])`` at C = 6 from ``chunk(2)``; the validation
    forward fails in the conv after it, and step() protects only the group whose removal breaks
    it (once it protected every Conv2d of the model)."""
    torch.manual_seed(0)
    model = FuzzNet(Conv(3, 6, 3, 1, True), [Stage([FixedSplit(), Conv(6, 8, 3, 1, True)])],
                    nn.Linear(8, 5), flatten=False).eval()
    x = torch.randn(*X_SHAPE)
    with pytest.warns(UserWarning, match=r"when group 0 \(3 channels: stem.body.0 .*\) loses "
                                         r"channels: RuntimeError in stages.0.blocks.0.conv"):
        StructuredPruner(model, x, pruning_ratio=0.5).prune()
    assert model.stem.body[0].out_channels == 6  # protected: the split's sizes are fixed
    assert model.stages[0].blocks[1].body[0].out_channels == 4  # pruned
    assert model(x).shape == (2, 5)
