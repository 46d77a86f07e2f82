"""Models larger than memory: tracing on the meta device gives the graph the real weights give,
and prune_checkpoint prunes a checkpoint on disk to exactly the weights in-memory pruning gives,
written atomically, loadable by from_pretrained and load_pruned."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import cleanai
from cleanai import CheckpointError, DependencyGraph, StructuredPruner, prune_checkpoint
from cleanai.checkpoint import build_on_meta
from cleanai.importance import WeightImportance

safetensors_torch = pytest.importorskip("safetensors.torch")


def signature(graph):
    """Everything a group is: id, size, kind, protected channels, members and their maps."""
    return [(g.id, g.size, g.kind, g.protected.tolist(),
             [(m.name, m.kind, m.dim, m.length, m.positions.tolist(), m.channels.tolist())
              for m in g.members]) for g in graph.groups]


def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    if name == "vit":
        return lambda: tv.models.VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=10), \
            (1, 3, 32, 32)
    return getattr(tv.models, name), (1, 3, 64, 64)


def _llama_config(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def _hf(name):
    transformers = pytest.importorskip("transformers")
    if name == "llama":
        cfg = _llama_config()
        return lambda: transformers.LlamaForCausalLM(copy.deepcopy(cfg))
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64)
    return lambda: transformers.BertModel(copy.deepcopy(cfg))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit", "densenet121",
                                  "efficientnet_b0", "llama", "bert"])
def test_meta_trace_gives_the_same_groups(name):
    if name in ("llama", "bert"):
        factory, inputs = _hf(name), torch.randint(0, 96, (1, 8))
    else:
        factory, shape = _torchvision(name)
        inputs = torch.randn(shape)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = DependencyGraph(factory().eval(), inputs)
        with torch.device("meta"):
            model = factory().eval()
        meta = DependencyGraph(model, inputs)  # inputs moved to meta by the graph
    assert all(p.is_meta for p in model.parameters())
    assert signature(meta) == signature(real)
    assert meta.check_reason == real.check_reason
    assert any(g.prunable for g in meta.groups)


def test_meta_trace_that_reads_values_says_so():
    factory = _hf("llama")
    with torch.device("meta"):
        model = factory().eval()
    ids = torch.randint(0, 96, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(cleanai.TraceError, match="meta device.*attention_mask"):
        DependencyGraph(model, {"input_ids": ids, "attention_mask": mask})


def _read_all(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(safetensors_torch.load_file(f))
    return state


def _in_memory(factory, inputs, **options):
    torch.manual_seed(0)
    model = factory().eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, inputs, importance=WeightImportance(), **options).prune()
    return dense, model


def test_llama_checkpoint_prunes_as_in_memory_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    factory = _hf("llama")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    factory().eval().save_pretrained(tmp_path / "src", safe_serialization=True,
                                     max_shard_size="60KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) >= 3
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    _, pruned = _in_memory(factory, ids, pruning_ratio=0.25)

    out = prune_checkpoint(factory, tmp_path / "src", tmp_path / "out", ids,
                           pruning_ratio=0.25, max_shard_size="40KB")
    got = _read_all(out)
    want = pruned.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(shards) == set(want) and len(set(shards.values())) >= 2
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (48, 6, 3, 72)
    assert (out / "generation_config.json").is_file()  # the folder's other files come along

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
        tokens = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, 11)
    rebuilt = cleanai.load_pruned(factory, out)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, pruned(ids).logits)


def test_tied_embeddings_are_stored_once_and_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _llama_config(tie_word_embeddings=True, num_hidden_layers=1)
    factory = lambda: transformers.LlamaForCausalLM(copy.deepcopy(cfg))  # noqa: E731
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    factory().eval().save_pretrained(tmp_path / "src")
    _, pruned = _in_memory(factory, ids, pruning_ratio=0.25)
    out = prune_checkpoint(factory, tmp_path / "src", tmp_path / "out", ids, pruning_ratio=0.25)
    got = _read_all(out)
    assert "lm_head.weight" not in got  # as transformers stores it: once
    assert torch.equal(got["model.embed_tokens.weight"], pruned.lm_head.weight)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    rebuilt = cleanai.load_pruned(factory, out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
        assert torch.equal(rebuilt(ids).logits, pruned(ids).logits)


class Net(nn.Module):
    """Convs with a residual, BatchNorm, a flatten and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(torch.relu(self.fc(self.pool(x).flatten(1))))


def _random_net():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # running statistics that differ per channel
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_plain_model_in_two_steps_prunes_as_in_memory(tmp_path, fmt):
    net = _random_net()
    if fmt == "safetensors":
        safetensors_torch.save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
        source = tmp_path / "weights.safetensors"
    else:
        torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
        source = tmp_path
    x = torch.randn(2, 3, 8, 8)
    options = dict(pruning_ratio=0.5, iterative_steps=2, ignored_layers=["head"])
    out = prune_checkpoint(Net, source, tmp_path / "out", x, **options)
    model = _random_net()
    StructuredPruner(model, x, importance=WeightImportance(), **options).prune()
    got, want = _read_all(out), model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got["a.weight"].shape[0] < 24
    rebuilt = cleanai.load_pruned(Net, out).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert sorted(p.name for p in out.iterdir()) == ["cleanai.json", "model.safetensors"]


def test_checkpoint_that_does_not_match_is_refused_before_writing(tmp_path):
    state = _random_net().state_dict()
    missing = {k: v for k, v in state.items() if k != "a.bias"}
    safetensors_torch.save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="'a.bias'"):
        prune_checkpoint(Net, tmp_path / "missing.safetensors", tmp_path / "out")
    wrong = dict(state, **{"fc.weight": torch.zeros(32, 65)})
    safetensors_torch.save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"'fc.weight' has shape \[32, 65\]"):
        prune_checkpoint(Net, tmp_path / "wrong.safetensors", tmp_path / "out")
    extra = dict(state, stray=torch.zeros(3))
    safetensors_torch.save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="'stray'"):
        prune_checkpoint(Net, tmp_path / "extra.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    safetensors_torch.save_file(_random_net().state_dict(), str(tmp_path / "w.safetensors"))
    from cleanai.checkpoint import files

    real, calls = files.write_shard, []

    def failing(path, layout, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, layout, tensors)

    monkeypatch.setattr(files, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        prune_checkpoint(Net, tmp_path / "w.safetensors", tmp_path / "out",
                         torch.randn(1, 3, 8, 8), max_shard_size=2000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    safetensors_torch.save_file(_random_net().state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prune_checkpoint(Net, tmp_path / "w.safetensors", out, x)
    assert (out / "old.txt").read_text() == "keep me"
    prune_checkpoint(Net, tmp_path / "w.safetensors", out, x, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cleanai.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w.safetensors"]


def test_options_that_need_weights_in_memory_are_refused(tmp_path):
    safetensors_torch.save_file(_random_net().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="compensate"):
        prune_checkpoint(Net, tmp_path / "w.safetensors", tmp_path / "out", compensate="bias")
    from cleanai.importance import ActivationImportance
    with pytest.raises(ValueError, match="ActivationImportance"):
        prune_checkpoint(Net, tmp_path / "w.safetensors", tmp_path / "out",
                         importance=ActivationImportance())
    assert not (tmp_path / "out").exists()


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"cleanai\[checkpoint\]"):
        prune_checkpoint(Net, tmp_path, tmp_path / "out")


def test_packed_attention_prunes_as_in_memory(tmp_path):
    """nn.MultiheadAttention's packed in_proj (its pruner scores views of it): torchvision ViT."""
    factory, shape = _torchvision("vit")
    torch.manual_seed(0)
    safetensors_torch.save_file(factory().state_dict(), str(tmp_path / "vit.safetensors"))
    x = torch.randn(shape)
    out = prune_checkpoint(factory, tmp_path / "vit.safetensors", tmp_path / "out", x,
                           pruning_ratio=0.5)
    torch.manual_seed(0)
    model = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(model, x, importance=WeightImportance(), pruning_ratio=0.5).prune()
    got, want = _read_all(out), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.encoder.layers[0].self_attention.num_heads < 4
    with pytest.raises(NotImplementedError, match="head_dims"):
        prune_checkpoint(factory, tmp_path / "vit.safetensors", tmp_path / "dims", x,
                         pruning_ratio=0.5, attention="head_dims")
    assert not (tmp_path / "dims").exists()


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class ScaleByData(cleanai.LayerPruner):
    """Slices by assigning ``.data``: a cut prune_checkpoint cannot see."""

    def coupling(self, m):
        return "same"

    def in_channels(self, m):
        return m.scale.numel()

    out_channels = in_channels

    def prune(self, m, in_keep, out_keep):
        m.scale.data = m.scale.data[in_keep if in_keep is not None else out_keep]


def test_a_cut_it_cannot_follow_is_refused(tmp_path, monkeypatch):
    from cleanai.core import layers
    monkeypatch.setitem(layers._REGISTRY, Scale, ScaleByData())

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    torch.manual_seed(0)
    safetensors_torch.save_file(make().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(RuntimeError, match="1.scale.*cannot follow"):
        prune_checkpoint(make, tmp_path / "w.safetensors", tmp_path / "out",
                         torch.randn(1, 3, 8, 8), pruning_ratio=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_meta_model_with_a_value_reading_importance_says_what_to_do():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    pruner = cleanai.StructuredPruner(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="meta device.*cleanai.prune_checkpoint"):
        pruner.plan()
    random = cleanai.StructuredPruner(model, torch.randn(1, 3, 64, 64), pruning_ratio=0.5,
                                      importance=cleanai.importance.RandomImportance(0))
    random.step()  # shapes alone suffice for random scores
    assert model.fc.in_features == 256


def _torchvision_classifiers():
    try:
        import torchvision
    except ImportError:
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.zoo
@pytest.mark.parametrize("name", _torchvision_classifiers())
def test_meta_trace_gives_the_same_groups_on_the_torchvision_zoo(name):
    tv = pytest.importorskip("torchvision")
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") \
        else {}
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = DependencyGraph(tv.models.get_model(name, weights=None, **kw).eval(), x)
        model = build_on_meta(lambda: tv.models.get_model(name, weights=None, **kw).eval())
        meta = DependencyGraph(model, x)
    assert all(t.is_meta for t in model.state_dict().values())
    assert signature(meta) == signature(real)


class ComputedWidth(nn.Module):
    """A constructor that computes its width with tensor values (as RegNet does): it cannot run
    inside ``torch.device("meta")``."""

    def __init__(self):
        super().__init__()
        width = int(torch.tensor(2.0).pow(4).item())
        self.a = nn.Linear(8, width)
        self.b = nn.Linear(width, 4)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_constructor_that_computes_with_tensors_builds_on_meta_and_prunes(tmp_path):
    model = build_on_meta(ComputedWidth)
    assert all(t.is_meta for t in model.state_dict().values()) and model.a.out_features == 16
    assert nn.Module.register_parameter.__name__ == "register_parameter"  # patch undone
    torch.manual_seed(0)
    dense = ComputedWidth()
    safetensors_torch.save_file(dense.state_dict(), str(tmp_path / "model.safetensors"))
    out = prune_checkpoint(ComputedWidth, tmp_path, tmp_path / "out", torch.randn(1, 8),
                           pruning_ratio=0.5)
    StructuredPruner(dense, torch.randn(1, 8), pruning_ratio=0.5).prune()
    got = _read_all(out)
    assert got["a.weight"].shape == (8, 8)
    assert all(torch.equal(got[k], v) for k, v in dense.state_dict().items())


class NumpyWidth(nn.Module):
    """Its width goes through numpy, which a meta tensor cannot reach (a ``TypeError``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, int(torch.tensor([6]).numpy()[0]))


def test_build_on_meta_falls_back_for_numpy_and_out_dir_may_not_hold_the_source(tmp_path):
    assert build_on_meta(NumpyWidth).a.weight.is_meta
    source = tmp_path / "ckpt"
    source.mkdir()
    torch.manual_seed(0)
    safetensors_torch.save_file(ComputedWidth().state_dict(), str(source / "model.safetensors"))
    with pytest.raises(ValueError, match="holds the checkpoint's own folder"):
        prune_checkpoint(ComputedWidth, source, tmp_path, torch.randn(1, 8), overwrite=True,
                         pruning_ratio=0.5)
    assert (source / "model.safetensors").is_file()
