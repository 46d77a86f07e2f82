"""Quick start: prune a torchvision ResNet-18 by 35% and print what changed.

    python examples/quick_start.py
"""
import torch
import torchvision

import cleanai
from cleanai.utils import count_macs, count_params, measure_latency

model = torchvision.models.resnet18(weights=None).eval()   # random weights: nothing is downloaded
x = torch.randn(1, 3, 224, 224)
before = {"params": count_params(model), "MACs": count_macs(model, x),
          "latency ms": measure_latency(model, x) * 1e3}

pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.35)  # the classifier's 1000 outputs stay
pruner.prune()                                                   # slices the tensors in place

after = {"params": count_params(model), "MACs": count_macs(model, x),
         "latency ms": measure_latency(model, x) * 1e3}
print(f"{'':12s}{'before':>16s}{'after':>16s}{'change':>10s}")
for key in before:
    fmt = ",.1f" if isinstance(before[key], float) else ","
    change = after[key] / before[key] - 1
    print(f"{key:12s}{before[key]:16{fmt}}{after[key]:16{fmt}}{change:10.1%}")
print("output shape:", tuple(model(x).shape))
