"""The production path on real data: ResNet-18 on Fashion-MNIST (or scikit-learn's digits).

    python examples/example_resnet.py            # about 4 minutes on two CPU cores
    python examples/example_resnet.py --quick    # about 10 seconds: tiny subsets, for CI

1. train a baseline briefly (no pretrained weights are downloaded);
2. calibrate the hybrid importance (weights + activations) on real images;
3. prune iteratively, recovering without labels at each step: the layers that read removed
   channels are refit in closed form (``compensate="lstsq"``), then every residual block is
   reconstructed against the dense model (``cleanai.recover.reconstruct``);
4. distill the pruned model from the dense one for a short while (no labels), then fine-tune;
5. save the pruned model without pickled code, load it back, check it is identical;
6. print accuracy, parameters and latency before and after.
"""
import sys
import tempfile

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cleanai
from cleanai.cli.data import FASHION_MNIST_DIR, fashion_mnist
from cleanai.importance import WeightActivationImportance
from cleanai.utils import count_params, load_pruned, measure_latency, save_pruned


def load_data(n_train: int, n_test: int):
    """(train_x, train_y, test_x, test_y, name): 1 x 28 x 28 images, standardised."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        # idx files of the Debian package dataset-fashion-mnist
        (train_x, train_y), (test_x, test_y) = fashion_mnist("train"), fashion_mnist("t10k")
        train_x, train_y = train_x[:n_train].div(255), train_y[:n_train]
        test_x, test_y = test_x[:n_test].div(255), test_y[:n_test]
        name = "Fashion-MNIST"
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = F.interpolate(torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1), size=28)
        y = torch.tensor(d.target)
        split = min(n_train, len(x) - 300)
        train_x, train_y, test_x, test_y = x[:split], y[:split], x[split:split + n_test], y[split:split + n_test]
        name = "sklearn digits"
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y, name


def build_model() -> nn.Module:
    """ResNet-18 for 1 x 28 x 28 images and 10 classes."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=2, padding=1, bias=False)
    return model


def batches(x, y, size, shuffle=False):
    order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def train(model, data, epochs=1, lr=1e-3, max_batches=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(data()):
            if max_batches is not None and i >= max_batches:
                break
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    correct = total = 0
    for x, y in data:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def main() -> None:
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    n_train, n_test, epochs, steps, tune = (256, 256, 1, 2, 2) if quick else (20000, 5000, 2, 3, 100)
    train_x, train_y, test_x, test_y, name = load_data(n_train, n_test)
    train_data = lambda: batches(train_x, train_y, 64, shuffle=True)  # noqa: E731
    test_data = batches(test_x, test_y, 256)
    print(f"data: {name}, {len(train_x)} training and {len(test_x)} test images"
          + (" (--quick: the baseline is barely trained; the numbers only show the flow)" if quick else ""))

    model = build_model().eval()
    train(model, train_data, epochs)
    x1 = test_x[:1]
    x32 = test_x[:32]
    before = {"accuracy": accuracy(model, test_data), "params": count_params(model),
              "latency ms (batch 32)": measure_latency(model, x32) * 1e3}
    print(f"baseline accuracy {before['accuracy']:.3f}")

    pruner = cleanai.StructuredPruner(
        model, x1, importance=WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5),
        pruning_ratio=0.5, iterative_steps=steps, compensate="lstsq", keep_teacher=True)
    calib = lambda: train_data()[:2 if quick else 8]  # noqa: E731  (unlabeled use only)
    for step in range(1, steps + 1):
        pruner.calibrate(calib())  # activations and input statistics of the current model
        pruner.step()  # slices, and refits the consumers of removed channels
        acc_comp = accuracy(model, test_data)
        cleanai.recover.reconstruct(model, pruner.teacher, calib(), granularity="block",
                                    steps=10 if quick else 200, progress=False)
        print(f"step {step}/{steps}: params {count_params(model):,}, accuracy after "
              f"compensation {acc_comp:.3f}, after reconstruction {accuracy(model, test_data):.3f}")

    report = cleanai.recover.distill(model, pruner.teacher, [x for x, _ in train_data()],
                                     steps=4 if quick else 300, lr=1e-3, progress=False)
    print(f"after distillation from the dense model ({report.steps} steps, no labels): "
          f"accuracy {accuracy(model, test_data):.3f}")
    train(model, train_data, epochs=1, lr=3e-4, max_batches=tune)
    print(f"after a short labelled fine-tuning: accuracy {accuracy(model, test_data):.3f}")

    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, folder)
        loaded = load_pruned(build_model().eval(), folder)
        same = torch.equal(loaded(x32), model(x32))
    print(f"saved and loaded back without pickled code: identical outputs = {same}")

    after = {"accuracy": accuracy(model, test_data), "params": count_params(model),
             "latency ms (batch 32)": measure_latency(model, x32) * 1e3}
    print(f"\n{'':24s}{'before':>12s}{'after':>12s}")
    for key in before:
        fmt = ",.3f" if isinstance(before[key], float) else ","
        print(f"{key:24s}{before[key]:12{fmt}}{after[key]:12{fmt}}")


if __name__ == "__main__":
    main()
