"""What each rank of tests/test_distributed.py runs: the same pruning scenarios as one process
would, on its own shard of the batches; every result is saved for the test to compare."""
import datetime
import os
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cleanai
from cleanai import distributed
from cleanai.importance import (ActivationImportance, OBSImportance, OutputSensitivity,
                                TaylorImportance, WeightActivationImportance, WeightImportance)
from cleanai.train import slice_optimizer_state


class Net(nn.Module):
    """conv-BN-ReLU, a residual conv block, a flatten into an MLP head: ``[N, 3, 8, 8]``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 3, stride=4, padding=1)
        self.fc1 = nn.Linear(16 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_batches(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g))
            for _ in range(n)]


SCENARIOS = {
    "weight": dict(importance=WeightImportance),
    "activation": dict(importance=ActivationImportance),
    "hybrid": dict(importance=WeightActivationImportance),
    "taylor": dict(importance=TaylorImportance),
    "lstsq": dict(importance=OBSImportance, compensate="lstsq"),
}


def prune(model, data, importance, compensate=None, process_group=None):
    """Calibrate (when the importance needs data or compensation does), prune 40%, and return
    what the test compares."""
    pruner = cleanai.StructuredPruner(model, torch.randn(1, 3, 8, 8), importance=importance(),
                                      pruning_ratio=0.4, compensate=compensate,
                                      process_group=process_group)
    if data is not None and (pruner.importance.requires_data or compensate):
        pruner.calibrate(data)
    out = {"stats": stats_of(pruner), "grads": grads_of(pruner)}
    plan = pruner.step()
    out["removals"] = {g: idx.tolist() for g, idx in plan.removals.items()}
    out["state"] = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    return out, pruner


def stats_of(pruner):
    stats = [s for s in (pruner.input_stats, getattr(pruner.importance, "stats", None),
                         getattr(getattr(pruner.importance, "activation", None), "stats", None))
             if s is not None]
    if not stats:
        return None
    s = stats[0]
    return {"count": dict(s.count), "sums": {k: v.clone() for k, v in s.sums.items()},
            "grams": {k: v.clone() for k, v in s.grams.items()}, "batches": s.batches,
            "halves": {k: s.held_out(k) for k in s.grams}}


def grads_of(pruner):
    grads = getattr(pruner.importance, "grads", None)
    if grads is None:
        return None
    return {n: grads[id(p)].clone() for n, p in pruner.model.named_parameters() if id(p) in grads}


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    try:
        batches = make_batches()
        for name, kw in SCENARIOS.items():
            results[name], _ = prune(make_model(), list(distributed.shard(batches)), **kw)
            ddp = nn.parallel.DistributedDataParallel(make_model())
            results[f"ddp {name}"], _ = prune(ddp, list(distributed.shard(batches)), **kw)

        # an allocation's output sensitivities are summed across the ranks
        pruner = cleanai.StructuredPruner(make_model(), torch.randn(1, 3, 8, 8),
                                          allocation=OutputSensitivity(), pruning_ratio=0.4)
        pruner.calibrate(list(distributed.shard(batches)))
        results["allocation"] = {g: s.clone() for g, s in pruner.allocation.scores.items()}
        pruner.step()
        results["allocation state"] = {k: v.clone() for k, v in pruner.model.state_dict().items()}

        # another process group than the default: the same ranks, a new group
        group = dist.new_group([0, 1])
        results["group"], _ = prune(make_model(), batches[rank::world],
                                    WeightActivationImportance, process_group=group)

        # DDP: the pruner prunes ddp.module; training goes on in a new wrapper
        ddp = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for x, y in batches[rank::world][:2]:
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        ddp.eval()
        pruner = cleanai.StructuredPruner(ddp, torch.randn(1, 3, 8, 8), pruning_ratio=0.4,
                                          importance=WeightActivationImportance(),
                                          compensate="bias")
        pruner.calibrate(distributed.shard(batches))
        with slice_optimizer_state(opt, pruner.model):
            pruner.step()
        ddp = distributed.rewrap(ddp)
        ddp.train()
        losses = []
        for x, y in batches[rank::world]:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        results["ddp"] = {"pruner_sees_module": pruner.model is ddp.module,
                          "params": cleanai.utils.count_params(ddp.module),
                          "state": {k: v.clone() for k, v in ddp.module.state_dict().items()},
                          "losses": losses}

        # a slot missing on one rank sums as zeros of the parameter's dtype (bf16 here)
        like = torch.ones(3, dtype=torch.bfloat16)
        mine = [like * (rank + 1) if rank == 0 else None, like * (rank + 1)]
        results["summed"] = distributed.all_reduce_tensors(mine, [like, like], dist.group.WORLD)
        # ranks that fail with different kinds of error do not take different paths
        try:
            distributed.agree(ValueError("a") if rank == 0 else KeyError("b"), dist.group.WORLD,
                              "a step")
        except distributed.DistributedError as exc:
            results["mixed"] = str(exc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            local = nn.parallel.DistributedDataParallel(make_model(), broadcast_buffers=False)
        results["rewrapped_sync"] = distributed.rewrap(local).forward_sync_buffers

        # bad input: rank 1 has no data; then rank 1's model differs
        try:
            prune(make_model(), batches[:3] if rank == 0 else [], ActivationImportance)
        except distributed.DistributedError as exc:
            results["no_data"] = str(exc)
        model = make_model()
        if rank == 1:
            with torch.no_grad():
                model.fc1.weight[0, 0] += 1e-3
        try:
            prune(model, batches[rank::world], ActivationImportance)
        except distributed.DistributedError as exc:
            results["differ"] = str(exc)
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        try:
            dist.barrier()  # no rank leaves while another still talks to it
        finally:
            dist.destroy_process_group()
