"""Pruning on two ranks (gloo, CPU) equals pruning in one process on all their data: the same
statistics, the same plan, the same pruned model; DDP models prune and train on; a rank with
no data and ranks whose models differ fail on every rank, naming the rank."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import cleanai
import distributed_worker as worker
from cleanai.importance import OutputSensitivity

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results from one spawned run of :func:`distributed_worker.run`."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(worker.run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=180):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("wrapped", ["", "ddp "])
@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_two_ranks_equal_one_process_on_all_data(ranks, name, wrapped):
    kw = worker.SCENARIOS[name]
    single, _ = worker.prune(worker.make_model(), worker.make_batches(), **kw)
    for res in ranks:
        got = res[wrapped + name]
        if single["stats"] is not None:
            want = single["stats"]
            assert got["stats"]["batches"] == want["batches"] == 6
            assert got["stats"]["count"] == want["count"]
            for key in want["sums"]:
                assert _rel(got["stats"]["sums"][key], want["sums"][key]) <= 1e-6, key
            assert set(got["stats"]["grams"]) == set(want["grams"])
            for key in want["grams"]:
                assert _rel(got["stats"]["grams"][key], want["grams"][key]) <= 1e-6, key
            # the halves compensation chooses its damping on: the same batches as one process
            for key, halves in want["halves"].items():
                assert halves is not None and got["stats"]["halves"][key] is not None, key
                for have, expect in zip(got["stats"]["halves"][key], halves):
                    assert have[2] == expect[2], key
                    assert _rel(have[1], expect[1]) <= 1e-5, key
        if single["grads"] is not None:
            assert set(got["grads"]) == set(single["grads"])
            for key in single["grads"]:
                assert _rel(got["grads"][key], single["grads"][key]) <= 1e-6, key
        assert got["removals"] == single["removals"]
        assert got["state"].keys() == single["state"].keys()
        for key, value in single["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in ranks[0][wrapped + name]["state"].items():  # every rank: one model
        assert torch.equal(ranks[1][wrapped + name]["state"][key], value)


def test_allocation_sums_every_rank_s_sensitivities(ranks):
    batches = worker.make_batches()
    local = []
    for r in range(WORLD):  # what each rank measured on its own shard
        pruner = cleanai.StructuredPruner(worker.make_model(), torch.randn(1, 3, 8, 8),
                                          allocation=OutputSensitivity(), pruning_ratio=0.4)
        pruner.calibrate(batches[r::WORLD])
        local.append(pruner.allocation.scores)
    for res in ranks:
        assert res["allocation"].keys() == local[0].keys()
        for gid, got in res["allocation"].items():
            torch.testing.assert_close(got, local[0][gid] + local[1][gid], rtol=1e-6, atol=0,
                                       equal_nan=True)  # nan: groups nobody reads
    for key, value in ranks[0]["allocation state"].items():
        assert torch.equal(ranks[1]["allocation state"][key], value)


def test_a_process_group_other_than_the_default(ranks):
    assert ranks[0]["group"]["removals"] == ranks[0]["hybrid"]["removals"]
    assert ranks[1]["group"]["removals"] == ranks[1]["hybrid"]["removals"]


def test_ddp_model_prunes_through_its_module_and_trains_on(ranks):
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert r0["pruner_sees_module"] and r1["pruner_sees_module"]
    dense = sum(p.numel() for p in worker.make_model().parameters())
    assert r0["params"] == r1["params"] < 0.75 * dense
    assert len(r0["losses"]) == 3 and all(torch.isfinite(torch.tensor(r0["losses"])))
    for key, value in r0["state"].items():  # gradients were averaged: the weights stay equal
        if "running" not in key and "num_batches" not in key:  # BN statistics are per rank
            torch.testing.assert_close(r1["state"][key], value, rtol=1e-6, atol=1e-7)


def test_collective_helpers_keep_dtypes_settings_and_paths(ranks):
    for res in ranks:
        first, second = res["summed"]
        assert first.dtype == torch.bfloat16 and first.tolist() == [1.0, 1.0, 1.0]
        assert second.tolist() == [3.0, 3.0, 3.0]
        assert "a step failed on 2 of 2 ranks" in res["mixed"] and "KeyError" in res["mixed"]
        assert res["rewrapped_sync"] is False  # broadcast_buffers=False survives the rewrap


def test_a_rank_without_data_fails_on_every_rank(ranks):
    for res in ranks:
        msg = res["no_data"]
        assert "calibration failed on 1 of 2 ranks" in msg and "rank 1:" in msg
        assert "no batches" in msg


def test_ranks_whose_models_differ_are_named(ranks):
    for res in ranks:
        msg = res["differ"]
        assert "rank 1's model differs from rank 0's" in msg and "'fc1.weight'" in msg


def test_without_a_process_group_everything_is_local():
    from cleanai import distributed
    assert list(distributed.shard(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.active_group() is None
    with pytest.raises(distributed.DistributedError, match="init_process_group"):
        import cleanai
        cleanai.StructuredPruner(worker.make_model(), torch.randn(1, 3, 8, 8),
                                 process_group=object()).calibrate(worker.make_batches())
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        distributed.rewrap(worker.make_model())
