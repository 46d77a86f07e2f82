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
