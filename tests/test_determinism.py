"""Determinism: the same model, inputs, data order and seed give the identical plan and the
identical pruned weights, for every importance and for global pruning, also in a fresh process
with another hash seed."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cleanai import StructuredPruner
from cleanai.importance import (RandomImportance, TaylorImportance, WeightActivationImportance,
                                WeightImportance)


class Net(nn.Module):
    """Concat, chunk, a residual add, depthwise conv and a flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.mix = nn.Conv2d(12, 24, 1)
        self.res = nn.Conv2d(24, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.cat([self.a(x), self.b(x)], 1)))
        p, q = y.chunk(2, dim=1)
        y = self.mix(p * torch.sigmoid(q)) + self.res(y)
        return self.fc(self.pool(y).flatten(1))


def data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g))
            for _ in range(n)]


IMPORTANCES = {
    "weight": lambda: WeightImportance(),
    "hybrid": lambda: WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5),
    "random": lambda: RandomImportance(seed=7),
    "taylor": lambda: TaylorImportance(),
}


def run(kind: str, global_pruning: bool, steps: int = 2):
    """Prune a freshly built model; returns (plans as lists, state dict)."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    pruner = StructuredPruner(model, x, importance=IMPORTANCES[kind](), pruning_ratio=0.5,
                              global_pruning=global_pruning, iterative_steps=steps)
    plans = []
    for _ in range(steps):
        pruner.calibrate(data())
        plan = pruner.plan()
        plans.append({g: idx.tolist() for g, idx in sorted(plan.removals.items())})
        pruner.apply(plan)
    return plans, model.state_dict()


def digest(kind: str, global_pruning: bool) -> str:
    plans, state = run(kind, global_pruning)
    h = hashlib.sha256(repr(plans).encode())
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("global_pruning", [False, True])
@pytest.mark.parametrize("kind", sorted(IMPORTANCES))
def test_same_inputs_same_plan_same_weights(kind, global_pruning):
    plans1, state1 = run(kind, global_pruning)
    plans2, state2 = run(kind, global_pruning)
    assert plans1 == plans2
    assert any(plans1[0].values())
    assert state1.keys() == state2.keys()
    for k in state1:
        assert torch.equal(state1[k], state2[k]), k


def test_random_importance_differs_with_the_seed():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    plans = [StructuredPruner(model, x, importance=RandomImportance(seed=s), pruning_ratio=0.5)
             .plan().removals for s in (1, 2)]
    assert any(not torch.equal(plans[0][g], plans[1][g]) for g in plans[0])


class WidthMLP(nn.Module):
    """An MLP block that keeps its width under several names the pruner rewrites."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 4)
        self.intermediate_size = self.ffn_dim = self.d_ff = self.mlp_dim = self.n_inner = 16

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def attribute_updates() -> str:
    """The attribute entries one step records, in their order."""
    model = nn.Sequential(nn.Linear(4, 4), WidthMLP()).eval()
    pruner = StructuredPruner(model, torch.randn(2, 4), pruning_ratio=0.5, kinds="channels")
    pruner.step()
    return ",".join(f"{e['attr']}={e['value']}" for e in pruner.history[-1]["layers"]
                    if e["kind"] == "attr")


def test_a_fresh_process_with_another_hash_seed_gives_the_same_result():
    code = ("import sys; sys.path[:0] = ['src', 'tests']; import test_determinism as t; "
            "print(t.digest('hybrid', True)); print(t.digest('weight', False)); "
            "print(t.attribute_updates())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [digest("hybrid", True), digest("weight", False), attribute_updates()]
    assert attribute_updates().count("=8") == 5
