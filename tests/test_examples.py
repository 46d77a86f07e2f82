"""Every example runs with --quick and prints what it promises."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_start():
    pytest.importorskip("torchvision")
    out = run_example("quick_start.py")
    assert "11,689,512" in out and "5,079,126" in out  # ResNet-18 params before and after
    assert "latency ms" in out and "output shape: (1, 1000)" in out


def test_example_basic():
    out = run_example("example_basic.py")
    assert "protected 10: model output" in out and "PruningPlan(step 1" in out
    assert "output shape (1, 10) (unchanged)" in out
    assert "replayed on a fresh model, same outputs: True" in out


def test_example_resnet():
    pytest.importorskip("torchvision")
    out = run_example("example_resnet.py")
    assert "step 2/2: params" in out and "after reconstruction" in out
    assert "after distillation from the dense model" in out
    assert "identical outputs = True" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("accuracy ", "params "))}
    before, after = (int(v.replace(",", "")) for v in rows["params"])
    assert after < before / 3


def test_example_train_prune():
    pytest.importorskip("sklearn")
    out = run_example("example_train_prune.py")
    rows = {line[:34].strip(): line for line in out.splitlines() if "accuracy" in line}
    assert set(rows) == {"dense", "aimed sparsity + cut + 1 epoch", "gradual pruning"}
    for name in ("aimed sparsity + cut + 1 epoch", "gradual pruning"):
        macs = float(rows[name].split("MACs")[1].split("%")[0])
        accuracy = float(rows[name].split("accuracy")[1].split("%")[0])
        assert macs <= 30.0 and accuracy > 50, rows[name]  # the budget met, the model still works
    steps = [float(v.split("%")[0]) for v in out.split("after each step: ")[1].splitlines()[0].split(", ")]
    assert steps == sorted(steps, reverse=True) and len(steps) >= 4


def test_example_distributed():
    pytest.importorskip("sklearn")
    out = run_example("example_distributed.py")
    rows = {line.split()[0]: line for line in out.splitlines() if "accuracy" in line}
    assert set(rows) == {"dense", "pruned", "+1"}
    params = {k: int(v.split("params")[1].split()[0].replace(",", "")) for k, v in rows.items()}
    accuracy = {k: float(v.split("accuracy")[1].split("%")[0]) for k, v in rows.items()}
    assert params["pruned"] == params["+1"] < params["dense"] / 2
    assert accuracy["+1"] > 70 and accuracy["dense"] > 70  # training went on after the step
    assert "every rank holds the same model: True" in out
