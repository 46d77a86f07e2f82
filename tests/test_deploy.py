"""cleanai.deploy: int8 copies that stay close to the model and say what they did; exported
files that run back; clear errors for bad input."""
import io

import pytest
import torch
from torch import nn

import cleanai
from cleanai.deploy import CompiledPackage, export, load, quantize

pytest.importorskip("torchao")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10)).eval()


class Tagger(nn.Module):
    """An LSTM and two Linear layers: what the Linear recipes quantize, and what they cannot."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 32, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x):
        return self.mlp(self.rnn(x)[0])


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def state_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_linear_recipes_quantize_linears_and_say_the_lstm_stays_float(mode):
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(4, 7, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize(model, mode=mode)
    assert result.mode == mode and result.quantized == ["mlp.0", "mlp.2"]
    assert result.skipped == {"rnn": "torchao has no int8 recurrent layers"}
    assert "left in float: rnn" in result.summary()
    with torch.no_grad():
        assert relative_error(result.model(x), model(x)) < 0.03
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert type(result.model.mlp[0].weight).__name__ == "Int8Tensor"


def test_static_recipe_calibrates_runs_at_any_batch_and_shrinks_the_file():
    model = cnn()
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(4)]
    result = quantize(model, data, compile=False)  # auto: convs and data -> static
    assert result.mode == "static" and result.quantized == ["0", "3", "7"]
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, 1, 28, 28)
            assert relative_error(result.model(x), model(x)) < 0.05
    assert state_bytes(result.model) < state_bytes(model)  # no float weights left behind
    assert result.model.eval() is result.model  # an exported graph alone refuses eval()


class Block(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice, the second after an add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_static_recipe_takes_a_module_called_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block()).eval()
    result = quantize(model, [torch.randn(8, 3, 16, 16)], compile=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(result.model(x), model(x)) < 0.05


def test_int8_models_export(tmp_path):
    """The static recipe's int8 graph saves as a .pt2 and converts to a QDQ ONNX graph; the
    Linear recipes' torchao tensors save as .pt2; a dynamic int8 model goes to ONNX as its float
    graph quantized by onnxruntime, and weight-only int8 says why it cannot."""
    model = cnn()
    x = torch.randn(2, 1, 28, 28)
    static = quantize(model, [torch.randn(8, 1, 28, 28)])  # compiled: the graph goes out
    saved = export(static.model, x, str(tmp_path / "int8.pt2"))
    assert saved.max_abs_diff == 0.0
    loaded = torch.export.load(str(tmp_path / "int8.pt2")).module()
    with torch.no_grad():
        assert relative_error(loaded(x), model(x)) < 0.05
    dynamic = quantize(Tagger().eval(), mode="dynamic")
    assert export(dynamic.model, torch.randn(2, 7, 8), str(tmp_path / "d.pt2")).max_abs_diff == 0
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    assert export(static.model, x, str(tmp_path / "int8.onnx")).max_abs_diff < 1e-2  # int8 rounding
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    dynamic = export(quantize(mlp).model, x, str(tmp_path / "d.onnx"))  # onnxruntime's int8
    assert dynamic.checked_with == "onnxruntime" and dynamic.max_abs_diff < 1e-2
    import onnx
    ops = {n.op_type for n in onnx.load(dynamic.path).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops, ops
    assert not list(tmp_path.glob("*.float.onnx"))  # the float intermediate is gone
    weight_only = quantize(mlp, mode="weight_only").model
    with pytest.raises(RuntimeError, match="weight-only int8 has no ONNX form"):
        export(weight_only, x, str(tmp_path / "w.onnx"))


@pytest.mark.slow
def test_static_recipe_compiled_matches_its_eager_form():
    model = cnn()
    data = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    torch._dynamo.reset()
    compiled = quantize(model, data)
    plain = quantize(model, data, compile=False)
    assert compiled.compiled and isinstance(compiled.model, cleanai.deploy.StaticInt8Model)
    with torch.no_grad():
        for n in (3, 1):
            x = torch.randn(n, 1, 28, 28)
            assert relative_error(compiled.model(x), plain.model(x)) < 0.02


def test_static_recipe_reads_only_max_batches_and_leaves_modes_alone():
    model = cnn()
    model[1].train()  # a BatchNorm left in training mode inside an eval model
    read = []

    def batches():
        for i in range(200):
            read.append(i)
            yield torch.randn(4, 1, 28, 28)
    quantize(model, batches(), max_batches=2, compile=False)
    assert read == [0, 1]
    assert model[1].training and not model.training and not model[0].training


def test_quantize_refuses_bad_input_clearly():
    model = cnn()
    with pytest.raises(ValueError, match="static quantization calibrates on data"):
        quantize(model, mode="static")
    with pytest.raises(ValueError, match="backend 'arm' is not supported"):
        quantize(model, backend="arm")
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize(model, mode="int4")
    with pytest.raises(ValueError, match="has no nn.Linear layer.*mode='static'"):
        quantize(nn.Sequential(nn.Conv2d(1, 4, 3)), mode="dynamic")
    with pytest.raises(ValueError, match="use mode='dynamic'"):
        quantize(model, [{"x": torch.randn(2, 1, 28, 28)}], mode="static")


def test_a_pruned_model_quantizes_and_exports(tmp_path):
    model = cnn()
    x = torch.randn(2, 1, 28, 28)
    cleanai.StructuredPruner(model, x[:1], pruning_ratio=0.5).prune()
    assert model[0].out_channels == 8
    result = quantize(model, [torch.randn(8, 1, 28, 28)], compile=False)
    with torch.no_grad():
        assert relative_error(result.model(x), model(x)) < 0.05
    pt2 = export(model, x, str(tmp_path / "pruned.pt2"))
    assert pt2.format == "pt2" and pt2.max_abs_diff <= 1e-4 and pt2.size_bytes > 0
    loaded = torch.export.load(str(tmp_path / "pruned.pt2")).module()
    torch.testing.assert_close(loaded(torch.randn(5, 1, 28, 28)).shape, torch.Size([5, 10]))
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    onnx = export(model, x, str(tmp_path / "pruned.onnx"))
    assert onnx.checked_with == "onnxruntime" and onnx.max_abs_diff <= 1e-4
    assert "onnxruntime: outputs within" in onnx.summary()


def test_aoti_packages_run_back_like_the_model(tmp_path):
    """A pruned float model compiles ahead of time with a dynamic batch; its static int8 graph
    compiles for the example's batch; ``load`` runs both, and a torch.export file too."""
    model = cnn()
    x = torch.randn(2, 1, 28, 28)
    cleanai.StructuredPruner(model, x[:1], pruning_ratio=0.5).prune()
    result = export(model, x, str(tmp_path / "pruned.pt2"), "aoti")
    assert (result.format, result.checked_with) == ("aoti", "AOTInductor (cleanai.deploy.load)")
    assert result.max_abs_diff <= 1e-4
    package = load(result.path)
    assert isinstance(package, CompiledPackage) and not list(package.parameters())
    five = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(package(five), model(five), atol=1e-4, rtol=1e-4)
        static = quantize(model, [torch.randn(8, 1, 28, 28)])
        int8 = export(static.model, x, str(tmp_path / "int8.pt2"), "aoti")
        assert int8.max_abs_diff < 1e-4  # the same int8 graph, compiled
        assert relative_error(load(int8.path)(x), model(x)) < 0.05
        with pytest.raises(ValueError, match=r"compiled for args\[0\] of shape \(2, 1, 28, 28\)"):
            load(int8.path)(five)  # an int8 package keeps the example's batch
        export(model, x, str(tmp_path / "program.pt2"))  # the suffix alone means torch.export
        assert not isinstance(load(str(tmp_path / "program.pt2")), CompiledPackage)


def test_aoti_package_checks_nested_inputs(tmp_path):
    class Pair(nn.Module):  # its input is a tuple: shapes keyed deeper than a position
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, pair):
            return self.fc(pair[0]) + pair[1]

    model = Pair().eval()
    pair = (torch.randn(3, 4), torch.randn(3, 2))
    package = load(export(model, (pair,), str(tmp_path / "pair.pt2"), "aoti").path)
    with torch.no_grad():
        torch.testing.assert_close(package((torch.randn(5, 4), pair[1][:1])).shape,
                                   torch.Size([5, 2]))
        with pytest.raises(ValueError, match=r"args\[0\]\[0\] of shape \(any, 4\), got \(5, 3\)"):
            package((torch.randn(5, 3), pair[1]))


def test_load_refuses_what_it_cannot_run(tmp_path):
    import zipfile
    with pytest.raises(FileNotFoundError, match="no file at"):
        load(str(tmp_path / "missing.pt2"))
    (tmp_path / "model.onnx").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        load(str(tmp_path / "model.onnx"))
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as archive:
        archive.writestr("other/readme.txt", "hello")
    with pytest.raises(ValueError, match="neither a torch.export program nor an AOTInductor"):
        load(str(tmp_path / "other.pt2"))


def test_export_refuses_bad_input_clearly(tmp_path):
    model = cnn()
    with pytest.raises(ValueError, match="cannot tell the format"):
        export(model, torch.randn(1, 1, 28, 28), str(tmp_path / "model.bin"))
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, torch.randn(1, 1, 28, 28), str(tmp_path / "m.onnx"), format="tflite")
    with pytest.raises(ValueError, match="does not run on the example inputs"):
        export(model, torch.randn(1, 3, 28, 28), str(tmp_path / "m.pt2"))  # wrong channels

    class Branchy(nn.Module):  # control flow on a value: torch.export cannot follow it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x
    with pytest.raises(RuntimeError, match="torch.export could not export Branchy"):
        export(Branchy(), torch.ones(2, 3), str(tmp_path / "b.pt2"))
