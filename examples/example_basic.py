"""CleanAI step by step: dependency graph, groups, importance, plan, apply.

    python examples/example_basic.py [--quick]

Each stage is separate and can be inspected before anything changes; only ``apply`` touches
the model. The model below has a residual add and a concat, the two places where pruning one
layer forces changes in others.
"""
import sys

import torch
from torch import nn

import cleanai
from cleanai.importance import WeightImportance


class SmallNet(nn.Module):
    """conv -> two residual-coupled convs -> a concat of two branches -> classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, width // 2, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width + width // 2, classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))           # the add ties stem's and res's channels
        x = torch.cat([self.left(x), self.right(x)], 1)  # the concat maps channel ranges
        return self.head(x)


def main() -> None:
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    model = SmallNet(width=16 if quick else 64).eval()
    x = torch.randn(1, 3, 32, 32)
    y0 = model(x)

    # 1. The dependency graph: one traced forward, never re-walked afterwards.
    graph = cleanai.DependencyGraph(model, x)
    print(repr(graph).splitlines()[0])

    # 2. Groups: channels that must leave together. The add couples stem.0, res.0 and the
    #    BatchNorms; the classifier's outputs are the model's contract and are protected.
    for group in graph.groups:
        print(group)

    # 3. Importance: one score per channel of a group (here the L2 norm of its weights).
    importance = WeightImportance()
    group = graph.group_of("stem.0")[0]
    scores = importance(group, model)
    print(f"\nscores of group {group.id} ({group.size} channels):",
          [round(float(s), 3) for s in scores[:8]], "...")

    # 4. A plan: which channels each group loses. Nothing has changed yet.
    pruner = cleanai.StructuredPruner(model, x, importance=importance, pruning_ratio=0.5)
    plan = pruner.plan()
    print("\n" + plan.summary())
    impact = plan.impact(model)
    print(f"impact: params {impact['params_before']:,} -> {impact['params_after']:,}, "
          f"MACs {impact['macs_before']:,} -> {impact['macs_after']:,}")
    assert torch.equal(model(x), y0), "planning never touches the model"

    # 5. Apply: every coupled tensor is sliced at once; a failure would roll everything back.
    pruner.apply(plan)
    y1 = model(x)
    print(f"\napplied: params now {cleanai.utils.count_params(model):,}, "
          f"output shape {tuple(y1.shape)} (unchanged)")

    # 6. The history replays on a fresh model of the same architecture: the basis of save/load.
    fresh = SmallNet(width=16 if quick else 64).eval()
    cleanai.replay(fresh, pruner.history[0]["layers"])
    fresh.load_state_dict(model.state_dict())
    print("replayed on a fresh model, same outputs:", torch.equal(fresh(x), y1))


if __name__ == "__main__":
    main()
