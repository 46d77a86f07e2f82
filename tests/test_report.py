"""Before/after reports, the kept-channels plot and the rendered dependency graph."""
import json
import os
import stat
import sys

import pytest
import torch
from torch import nn

import cleanai
from cleanai.utils import Report, render_graph, report, snapshot


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
