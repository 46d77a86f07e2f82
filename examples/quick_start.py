"""Quick start: prune a torchvision ResNet-18 by 35% and print what changed.

    python examples/quick_start.py          # 224 x 224 inputs
    python examples/quick_start.py --quick  # 64 x 64 inputs, for a fast check
"""
import sys

import torch
import torchvision

import cleanai

size = 64 if "--quick" in sys.argv else 224
model = torchvision.models.resnet18(weights=None).eval()  # random weights: nothing is downloaded
x = torch.randn(1, 3, size, size)

before = cleanai.utils.snapshot(model, x)                 # counts and latency, no copy of the model
pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.35)  # the classifier's 1000 outputs stay
pruner.prune()                                            # slices the tensors in place

print(cleanai.utils.report(before, model, x))
print("output shape:", tuple(model(x).shape))
