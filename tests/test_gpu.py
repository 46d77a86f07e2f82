"""CUDA end to end: trace, calibrate, plan, apply, compensate and reconstruct on the model's
device give what the CPU gives, and calibration never waits for the GPU inside its batch loop.

Marked ``gpu``; skipped where no CUDA device is present (CI has none)."""
import copy
from contextlib import contextmanager

import pytest
import torch

import cleanai
from cleanai.importance import TaylorImportance, WeightActivationImportance
from cleanai.importance.stats import collect
from cleanai.recover import reconstruct

import distributed_worker as cases
from llama_like import LlamaLike

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@contextmanager
def no_host_sync():
    """Any operation that waits for the GPU (``.item()``, ``nonzero``, a copy to the host)
    raises inside."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _prune(device):
    model = cases.make_model().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in cases.make_batches()]
    pruner = cleanai.StructuredPruner(model, torch.randn(1, 3, 8, 8, device=device),
                                      importance=WeightActivationImportance(),
                                      pruning_ratio=0.4, compensate="lstsq")
    pruner.calibrate(batches)
    plan = pruner.step()
    return model, plan, batches


def test_the_pipeline_on_cuda_gives_what_the_cpu_gives():
    cpu_model, cpu_plan, batches = _prune("cpu")
    gpu_model, gpu_plan, _ = _prune("cuda")
    assert {g: i.tolist() for g, i in gpu_plan.removals.items()} == \
        {g: i.tolist() for g, i in cpu_plan.removals.items()}
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(x.cuda()).cpu(), cpu_model(x), rtol=1e-3, atol=1e-4)


def test_calibration_never_waits_for_the_gpu():
    model = LlamaLike(layers=2).cuda().eval()
    ids = [torch.randint(0, 50, (4, 12), device="cuda") for _ in range(3)]
    graph = cleanai.DependencyGraph(model, ids[0])
    with no_host_sync():
        stats = collect(model, graph, ids)
    assert stats.batches == 3 and all(s.device.type == "cuda" for s in stats.sums.values())
    importance = TaylorImportance(loss_fn=lambda m, b: m(b).float().logsumexp(-1).mean())
    with no_host_sync():
        importance.calibrate(model, graph, ids)
    assert all(g.device.type == "cuda" for g in importance.grads.values())


def test_padded_batches_on_cuda_count_only_real_tokens():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).cuda().eval()
    mask = torch.ones(2, 10, dtype=torch.long, device="cuda")
    mask[1, 6:] = 0
    batch = {"input_ids": torch.randint(0, 100, (2, 10), device="cuda"), "attention_mask": mask}
    graph = cleanai.DependencyGraph(model, batch)
    with no_host_sync():
        stats = collect(model, graph, [batch])
    cpu = collect(copy.deepcopy(model).cpu(), cleanai.DependencyGraph(
        copy.deepcopy(model).cpu(), {k: v.cpu() for k, v in batch.items()}),
        [{k: v.cpu() for k, v in batch.items()}])
    for key, sums in cpu.sums.items():
        assert stats.positions(key) == cpu.positions(key)
        torch.testing.assert_close(stats.sums[key].cpu(), sums, rtol=1e-4, atol=1e-4)


def test_reconstruction_on_cuda():
    teacher = cases.make_model().cuda()
    model, _, batches = _prune("cuda")
    report = reconstruct(model, teacher, batches, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    fitted = [u for u in report.units if u["method"] != "skipped"]
    assert fitted and all(u["error_after"] <= u["error_before"] + 1e-6 for u in fitted)
