"""Pruned models still deploy: every family CleanAI prunes (a CNN, nn.MultiheadAttention,
torchvision's ViT, Hugging Face LLaMA with grouped-query attention and BERT, LSTM, GRU) exports
with torch.export and ONNX, traces with torch.jit and compiles with torch.compile, and each
runs within 1e-4 of the pruned model in eager mode.

Tiny random models, nothing downloaded. By default: torch.export and the .pt2 file for every
family, ONNX for the CNN and the LSTM. Behind ``-m slow``: torch.compile and torch.jit.trace for
every family, ONNX for the others."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from cleanai import StructuredPruner
from cleanai.core.runtime import iter_tensors
from cleanai.deploy import export, load
from cleanai.utils import count_params

ATOL = 1e-4
FAMILIES = ["cnn", "mha", "vit", "llama", "bert", "lstm", "gru"]
ATTENTION = {"mha", "vit", "llama", "bert"}  # 4 heads before pruning
RECURRENT = {"lstm", "gru"}
ONNX_BY_DEFAULT = {"cnn", "lstm"}


class AttentionClassifier(nn.Module):
    """Linear -> nn.MultiheadAttention (4 heads of 4) with a residual -> LayerNorm -> Linear,
    averaged over the sequence: [batch, steps, 5] -> [batch, 3]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.fc(self.norm(a + h)).mean(1)


class RecurrentClassifier(nn.Module):
    """Linear -> two-layer bidirectional LSTM or GRU (12 units) -> Linear on the last step:
    [batch, steps, 5] -> [batch, 3]."""

    def __init__(self, rnn):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.rnn = rnn(8, 12, 2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.fc(out[:, -1])


def _build(name):
    """A small random model of the family and its inputs (batch 2)."""
    torch.manual_seed(0)
    if name == "cnn":
        return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
    if name == "mha":
        return AttentionClassifier(), torch.randn(2, 6, 5)
    if name == "vit":
        vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                hidden_dim=32, mlp_dim=64, num_classes=10)
        return vit, torch.randn(2, 3, 32, 32)
    if name in RECURRENT:
        return RecurrentClassifier(nn.LSTM if name == "lstm" else nn.GRU), torch.randn(2, 6, 5)
    transformers = pytest.importorskip("transformers")
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    if name == "llama":  # 4 query heads share 2 key/value heads; no cache in the outputs,
        # which torch.export cannot return (dense or pruned)
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, bos_token_id=0, eos_token_id=0,
                                       use_cache=False)
        return transformers.LlamaForCausalLM(cfg), ids
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64)
        return transformers.BertModel(cfg), ids
    raise KeyError(name)


def _call(fn, inputs):
    return fn(**inputs) if isinstance(inputs, dict) else fn(inputs)


def _eager(model, inputs):
    with torch.no_grad():
        return _call(model, inputs)


def _split(inputs):
    return ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})


def _batch(inputs, n):
    """The inputs with the batch grown to ``n`` by repeating its samples."""
    def grow(t):
        return t.repeat(-(-n // t.shape[0]), *[1] * (t.dim() - 1))[:n]
    return {k: grow(v) for k, v in inputs.items()} if isinstance(inputs, dict) else grow(inputs)


def assert_matches(got, want):
    """Every output tensor (of a ModelOutput, dict, tuple or tensor) within ATOL of eager."""
    got, want = list(iter_tensors(got)), list(iter_tensors(want))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def pruned():
    """``pruned(name)``: a fresh copy of the family's model pruned at 0.5 in eval mode, its
    inputs, and its parameter count and output shapes before pruning (each family is pruned
    once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = _build(name)
            model.eval()
            before = count_params(model), [t.shape for t in iter_tensors(_eager(model, inputs))]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # config warnings are tested elsewhere
                StructuredPruner(model, inputs, pruning_ratio=0.5).step()
            cache[name] = model.eval(), inputs, before
        model, inputs, before = cache[name]
        return copy.deepcopy(model), inputs, before
    return get


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _heads(model):
    config = getattr(model, "config", None)
    if config is not None:
        return {config.num_attention_heads}
    return {m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_really_pruned(pruned, name):
    model, inputs, (params, shapes) = pruned(name)
    assert count_params(model) < params
    assert [t.shape for t in iter_tensors(_eager(model, inputs))] == shapes
    if name in ATTENTION:
        assert _heads(model) == {2}
    if name == "llama":  # still grouped-query attention, MLP neurons gone
        assert model.config.num_key_value_heads == 1
        assert model.config.intermediate_size < 64
    if name == "bert":
        assert model.config.intermediate_size < 64
    if name == "vit":
        assert all(layer.mlp[0].out_features < 64 for layer in model.encoder.layers)
    if name == "cnn":
        assert model.conv1.out_channels < 64
    if name in RECURRENT:
        assert model.rnn.hidden_size < 12


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_runs_like_eager(pruned, name):
    model, inputs, _ = pruned(name)
    args, kwargs = _split(inputs)
    program = torch.export.export(model, args, kwargs)
    assert_matches(_eager(program.module(), inputs), _eager(model, inputs))


@pytest.mark.parametrize("name", FAMILIES)
def test_pt2_file_runs_like_eager(pruned, name, tmp_path):
    model, inputs, _ = pruned(name)
    result = export(model, inputs, str(tmp_path / "model.pt2"))
    assert (result.format, result.checked_with) == ("pt2", "torch.export.load")
    assert result.size_bytes > 0 and result.max_abs_diff <= ATOL
    # the batch stays dynamic in the pruned program
    loaded = torch.export.load(result.path).module()
    three = _batch(inputs, 3)
    assert_matches(_eager(loaded, three), _eager(model, three))


@pytest.mark.parametrize("name", [n if n in ONNX_BY_DEFAULT else
                                  pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES])
def test_onnx_file_runs_like_eager_in_onnxruntime(pruned, name, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    model, inputs, _ = pruned(name)
    result = export(model, inputs, str(tmp_path / "model.onnx"))
    assert (result.format, result.checked_with) == ("onnx", "onnxruntime")
    assert result.size_bytes > 0 and result.max_abs_diff <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_aoti_package_runs_like_eager(pruned, name, tmp_path):
    model, inputs, _ = pruned(name)
    result = export(model, inputs, str(tmp_path / "model.pt2"), "aoti")
    assert result.max_abs_diff <= ATOL
    three = _batch(inputs, 3)  # compiled with a dynamic batch
    with torch.no_grad():
        assert_matches(_eager(load(result.path), three), _eager(model, three))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_jit_trace_runs_like_eager(pruned, name):
    model, inputs, _ = pruned(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts become constants
        if isinstance(inputs, dict):  # Hugging Face models return a dict: strict=False allows it
            traced = torch.jit.trace(model, example_kwarg_inputs=inputs, strict=False)
        else:
            traced = torch.jit.trace(model, inputs)
    assert_matches(_eager(traced, inputs), _eager(model, inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_torch_compile_runs_like_eager(pruned, name, fresh_dynamo):
    model, inputs, _ = pruned(name)
    compiled = torch.compile(model, fullgraph=True)
    # Dynamo skips nn.LSTM / nn.GRU unless asked (dense models too); without it they would run
    # eagerly behind a graph break and nothing recurrent would be compiled
    with torch._dynamo.config.patch(allow_rnn=name in RECURRENT):
        got = _eager(compiled, inputs)
    assert_matches(got, _eager(model, inputs))
