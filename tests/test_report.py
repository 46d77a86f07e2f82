"""Before/after reports, the kept-channels plot and the rendered dependency graph."""
import io
import json
import os
import stat
import sys

import pytest
import torch
from torch import nn

import cleanai
from cleanai.utils import LatencyStats, Report, Snapshot, render_graph, report, snapshot
from cleanai.utils import latency as latency_module


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model, x = _net().eval(), torch.randn(1, 3, 16, 16)
    before = snapshot(model, x, latency=False)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5).prune()
    return report(before, model, x), model, x


def test_report_counts_match_the_models(pruned):
    rep, model, x = pruned
    fresh = _net()
    assert rep.before.params == cleanai.utils.count_params(fresh)
    assert rep.after.params == cleanai.utils.count_params(model)
    assert rep.after.macs == cleanai.utils.count_macs(model, x)
    assert rep.before.latency_ms is None and rep.after.latency_ms is not None
    conv = rep.after.layers["0"]
    assert (conv.in_channels, conv.out_channels) == (3, 8)
    assert rep.before.layers["3"].out_channels == 32 and rep.after.layers["3"].out_channels == 16
    assert rep.after.layers["7"].out_channels == 10  # the model's output is never pruned
    # per-layer MACs add up to the total for this model (only convs and the linear count)
    assert sum(s.macs for s in rep.after.layers.values()) == rep.after.macs
    assert rep.after.size_mb == pytest.approx(sum(t.numel() * t.element_size()
                                                  for t in model.state_dict().values()) / 1e6)


def test_report_text_markdown_and_dict(pruned):
    rep = pruned[0]
    text = str(rep)
    assert "params" in text and "MACs" in text and "size MB" in text
    assert "-> 3/8" in text and "-> 8/16" in text and "-> 16/10" in text
    md = rep.to_markdown()
    assert md.startswith("## Sequential: pruning report") and "| `0` | Conv2d |" in md
    d = json.loads(json.dumps(rep.to_dict()))
    back = Report.from_dict(d)
    assert str(back) == text


def test_plot_writes_png(pruned, tmp_path):
    pytest.importorskip("matplotlib")
    out = pruned[0].plot(str(tmp_path / "kept.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(pruned, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        pruned[0].plot(str(tmp_path / "kept.png"))


def test_render_graph_writes_dot_and_calls_graphviz(tmp_path, monkeypatch):
    model, x = _net(), torch.randn(1, 3, 16, 16)
    graph = cleanai.DependencyGraph(model, x)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="apt install graphviz"):
        out = render_graph(graph, tmp_path / "g.svg")
    assert out == tmp_path / "g.dot" and out.read_text().startswith("digraph")
    # a stand-in `dot` that copies its input shows the arguments CleanAI passes
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text(f"#!{sys.executable}\nimport sys, shutil\n"
                    "assert sys.argv[1] == '-Tsvg' and sys.argv[3] == '-o'\n"
                    "shutil.copy(sys.argv[2], sys.argv[4])\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    out = render_graph(graph, tmp_path / "g2.svg")
    assert out == tmp_path / "g2.svg" and out.read_text() == (tmp_path / "g2.dot").read_text()


def test_text_and_markdown_count_the_same_changed_layers():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    before = snapshot(model, x, latency=False)
    cleanai.StructuredPruner(model, x, pruning_ratio=0.35).prune()
    rep = report(before, model, x, latency=False)
    # 20 convs and fc lose channels, and the 20 BatchNorms after the convs follow them
    assert ("layers changed: 41 (channels in/out; not listed: 20 norm or depthwise layers "
            "whose channels follow another's)") in str(rep).splitlines()
    assert "### Layers changed (41; channels in/out)" in rep.to_markdown().splitlines()
    assert len(rep.layer_rows()) == 41
    assert sum(r[1] == "BatchNorm2d" for r in rep.layer_rows()) == 20


def _times(center, jitter, n=10):
    """``n`` seconds around ``center``, spread evenly over +-``jitter`` of it: the middle half
    of them over ``jitter`` (the interquartile range relative to the median)."""
    return [center * (1 + jitter * (2 * i / (n - 1) - 1)) for i in range(n)]


def _timed(times):
    """A hand-made snapshot whose latency was timed as ``times`` (seconds)."""
    return Snapshot("Net", 100, 1000, 0.5, None, {}).with_latency(LatencyStats.from_times(times))


def _latency_row(text):
    return next(line for line in text.splitlines() if line.strip().startswith("latency ms"))


def test_noisy_latency_is_reported_as_too_noisy():
    rep = Report(_timed(_times(0.010, 0.1)), _timed(_times(0.0095, 0.1)))
    text, md = str(rep), rep.to_markdown()
    assert _latency_row(text).split() == ["latency", "ms", "10.00", "9.50", "too", "noisy"]
    assert ["latency", "spread", "10.0%", "10.0%"] in [line.split() for line in text.splitlines()]
    assert ("  latency: too noisy: the interquartile ranges overlap (IQR 10.0% and 10.0% of the "
            "medians); median of 10 runs each, timed apart") in text
    assert "faster" not in text + md and "slower" not in text + md and "-5.0%" not in text + md
    assert "| latency ms | 10.00 | 9.50 | too noisy |" in md
    assert "Latency: too noisy: the interquartile ranges overlap" in md
    assert rep.to_dict()["latency"] == {"verdict": "too noisy", "speedup": pytest.approx(10 / 9.5),
                                        "reason": rep.latency.reason, "paired": False}


def test_clear_latency_change_is_a_speed_up_or_a_slow_down():
    rep = Report(_timed(_times(0.012, 0.02)), _timed(_times(0.008, 0.02)))
    assert _latency_row(str(rep)).split()[-2:] == ["1.50x", "faster"]
    assert "latency: 1.50x faster; median of 10 runs each" in str(rep)
    slower = Report(_timed(_times(0.008, 0.02)), _timed(_times(0.010, 0.02)))
    assert _latency_row(str(slower)).split()[-2:] == ["1.25x", "slower"]
    back = Report.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert str(back) == str(rep) and back.latency == rep.latency


def test_report_of_two_models_times_them_in_turns(monkeypatch):
    calls = []

    def noisy(models, inputs, forward_fn, warmup, repeats):  # stands in for the clock
        calls.append((len(models), repeats))
        return [_times(0.010, 0.1, repeats), _times(0.0095, 0.1, repeats)][:len(models)]
    monkeypatch.setattr(latency_module, "_time_in_turns", noisy)
    torch.manual_seed(0)
    dense, x = _net().eval(), torch.randn(1, 3, 16, 16)
    model = _net().eval()
    cleanai.StructuredPruner(model, x, pruning_ratio=0.5).prune()
    rep = report(dense, model, x, repeats=8)
    assert calls == [(2, 8)]  # one paired run, no model timed alone
    assert rep.latency.paired and rep.latency.verdict == "too noisy"
    assert "too noisy" in _latency_row(str(rep)) and "timed in turns" in str(rep)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["latency"]["paired"] is True and d["latency"]["verdict"] == "too noisy"
    assert d["before"]["latency_ms"] == pytest.approx(10.0)
    assert d["before"]["latency_q1_ms"] == pytest.approx(9.5)
    assert d["after"]["latency_q3_ms"] == pytest.approx(0.0095 * 1.05 * 1e3)
    assert d["after"]["latency_runs"] == 8
    assert Report.from_dict(d).latency == rep.latency


def test_size_on_disk_is_what_torch_save_writes(pruned):
    rep, model, x = pruned
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert rep.after.disk_size_mb == len(buf.getvalue()) / 1e6
    row = next(r for r in rep.totals() if r[0] == "size on disk MB")
    assert row == ("size on disk MB", rep.before.disk_size_mb, len(buf.getvalue()) / 1e6)
    assert row[1] > row[2] > rep.after.size_mb  # the pickle and zip framing cost bytes too
    assert "size on disk MB" in str(rep) and "| size on disk MB |" in rep.to_markdown()


def test_old_snapshot_dicts_still_load():
    old = {"model": "Net", "params": 100, "macs": 1000, "size_mb": 0.5, "latency_ms": 10.0,
           "layers": [{"name": "0", "type": "Conv2d", "in_channels": 3, "out_channels": 8,
                       "params": 100, "macs": 1000, "producer": True}]}
    snap = Snapshot.from_dict(old)
    assert snap.latency_ms == 10.0 and snap.latency_stats is None and snap.disk_size_mb is None
    assert snap.layers["0"].out_channels == 8
    # keys a newer CleanAI may write are left out
    assert Snapshot.from_dict({**old, "from_the_future": 1}) == snap
    rep = Report.from_dict({"before": old, "after": {**old, "latency_ms": 5.0}})
    text = str(rep)
    assert rep.latency is None and "size on disk" not in text and "latency spread" not in text
    assert _latency_row(text).split()[-1] == "-50.0%"
    assert "latency: its spread was not recorded for both models" in text


def test_cli_prints_and_writes_the_latency_verdict(monkeypatch, capsys, tmp_path):
    pytest.importorskip("torchvision")
    from cleanai.cli import main

    calls = []

    def noisy(models, inputs, forward_fn, warmup, repeats):  # stands in for the clock
        calls.append((len(models), repeats))
        return [_times(0.010, 0.1, repeats), _times(0.0095, 0.1, repeats)][:len(models)]
    monkeypatch.setattr(latency_module, "_time_in_turns", noisy)
    code = main(["prune", "torchvision:resnet18", "--ratio", "0.3", "--input-shape", "1,3,32,32",
                 "--latency-repeats", "6", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert calls == [(2, 6)]  # the dense copy and the pruned model, in turns
    assert "too noisy" in _latency_row(out) and "latency: too noisy: the interquartile" in out
    d = json.loads((tmp_path / "r" / "report.json").read_text())
    assert d["latency"]["verdict"] == "too noisy" and d["latency"]["paired"] is True
    assert d["before"]["latency_runs"] == d["after"]["latency_runs"] == 6
    assert d["before"]["disk_size_mb"] > d["after"]["disk_size_mb"] > 0
    assert "Latency: too noisy" in (tmp_path / "r" / "report.md").read_text()


def test_a_model_on_the_meta_device_has_no_size_on_disk():
    with torch.device("meta"):
        model = nn.Linear(1000, 1000)
    snap = snapshot(model, torch.randn(1, 1000, device="meta"), latency=False)
    assert snap.disk_size_mb is None and snap.params == 1_001_000
    assert "size on disk" not in str(Report(snap, snap))
