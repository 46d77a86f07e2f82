"""Pruning a DistributedDataParallel model on two CPU processes (gloo), then training on.

    python examples/example_distributed.py           # Fashion-MNIST when installed, ~1 minute
    python examples/example_distributed.py --quick   # scikit-learn's digits, a few seconds
    torchrun --nproc-per-node 2 examples/example_distributed.py --quick   # the same, launched

Every rank trains the same DDP model on its own shard of the data. Then each rank calibrates on
its own shard only; CleanAI sums the statistics across ranks, rank 0 plans, every rank applies
the same plan (the models are compared after the step), the optimizer's momentum is cut with
the model, DDP is wrapped again, and training goes on. Rank 0 prints the accuracy on held-out
images before pruning, right after it, and after one more epoch.
"""
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cleanai
from cleanai import distributed
from cleanai.cli.data import labelled_images
from cleanai.importance import WeightActivationImportance
from cleanai.train import slice_optimizer_state
from cleanai.utils import count_params

QUICK = "--quick" in sys.argv
WORLD = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        nn.Linear(128, 10))


def batches(x, y, size, seed):
    """This rank's batches of one epoch: a shuffled order shared by the ranks, every
    ``WORLD``-th batch kept (what a ``DistributedSampler`` does)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    chunks = [(x[i], y[i]) for i in order.split(size)]
    return list(distributed.shard(chunks))


def train_epoch(ddp, opt, x, y, seed):
    ddp.train()
    for xb, yb in batches(x, y, 64, seed):
        opt.zero_grad()
        F.cross_entropy(ddp(xb), yb).backward()
        opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() * 100


def load():
    """The images, read once (by the launching process when it spawns the ranks)."""
    return labelled_images("sklearn-digits" if QUICK else "fashion-mnist", 12000, 2000)[:4]


def main(rank: int, world: int, port: int, data) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = data
    ddp = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        train_epoch(ddp, opt, train_x, train_y, seed=epoch)
    dense_acc, dense_params = accuracy(ddp.module, test_x, test_y), count_params(ddp.module)

    ddp.eval()
    pruner = cleanai.StructuredPruner(ddp, torch.randn(1, *train_x.shape[1:]), pruning_ratio=0.5,
                                      importance=WeightActivationImportance(),
                                      compensate="bias")
    pruner.calibrate(batches(train_x, train_y, 128, seed=99), max_batches=8)
    with slice_optimizer_state(opt, pruner.model):
        pruner.step()
    ddp = distributed.rewrap(ddp)  # DDP's gradient buckets follow the new shapes
    pruned_acc = accuracy(ddp.module, test_x, test_y)
    train_epoch(ddp, opt, train_x, train_y, seed=2)
    tuned_acc = accuracy(ddp.module, test_x, test_y)
    distributed.check_same_model(ddp.module, dist.group.WORLD, "after training")
    if rank == 0:
        print(f"{world} ranks (gloo); each calibrated on its own shard")
        print(f"dense      params {dense_params:,}  accuracy {dense_acc:.1f}%")
        print(f"pruned     params {count_params(ddp.module):,}  accuracy {pruned_acc:.1f}%")
        print(f"+1 epoch   params {count_params(ddp.module):,}  accuracy {tuned_acc:.1f}%")
        print("every rank holds the same model: True")
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        main(dist.get_rank(), dist.get_world_size(), 0, load())
    else:
        torch.multiprocessing.spawn(main, args=(WORLD, free_port(), load()), nprocs=WORLD)
