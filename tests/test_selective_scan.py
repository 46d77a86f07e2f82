"""Outer products by broadcasting (a state-space layer's ``dt[..., None] * B[:, None]``) and a
2-D parameter that spans two channel dims (Mamba's ``A_log``, ``d_inner x state``): the larger
dim stays prunable, the parameter is sliced along it, the other dim is kept."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai import PruningPlan, StructuredPruner
from equivalence import apply_unchanged, check_equivalence


class SelectiveScan(nn.Module):
    """A Mamba mixer written in plain torch, the sequential scan of HF's reference path."""

    def __init__(self, hidden=12, inner=24, state=4, rank=2, a_use="once"):
        super().__init__()
        self.state, self.rank, self.a_use = state, rank, a_use
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1.0)).repeat(inner, 1)
                                  + 0.1 * torch.randn(inner, state))
        self.D = nn.Parameter(torch.randn(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):  # x: [B, L, hidden]
        seq = x.shape[1]
        u, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, inner, L] each
        u = F.silu(self.conv1d(u)[..., :seq])
        dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [self.rank, self.state, self.state],
                               dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # [B, inner, L]
        A = -torch.exp(self.A_log.float())
        if self.a_use == "transposed":
            A = A.t().t().contiguous()
        discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # [B, inner, L, state]
        deltaB_u = dt[:, :, :, None] * B[:, None, :, :] * u[:, :, :, None]
        h = torch.zeros(x.shape[0], u.shape[1], self.state)
        ys = []
        for i in range(seq):
            h = discrete_A[:, :, i] * h + deltaB_u[:, :, i]
            ys.append(torch.matmul(h, C[:, i, :].unsqueeze(-1))[:, :, 0])
        y = torch.stack(ys, dim=-1) + u * self.D[None, :, None]
        y = y * F.silu(gate)
        if self.a_use == "twice":  # the parameter read a second time, outside the scan
            y = y + self.A_log.mean()
        if self.a_use == "shared":  # -exp(A_log) itself read a second time, across inner
            y = y + A.sum(0).mean()
        return self.out_proj(y.transpose(1, 2))


def test_selective_scan_prunes_its_inner_channels_exactly():
    torch.manual_seed(0)
    model, x = SelectiveScan(), torch.randn(2, 5, 12)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    inner = next(g for g in pruner.graph.groups if any(m.name == "A_log" for m in g.members))
    assert inner.size == 24 and not inner.protected.any()
    check_equivalence(model, pruner, x)
    assert model.A_log.shape == (12, 4) and model.D.shape == (12,)
    # B and C keep their 4 state channels each; the time-step rank is a group of its own
    assert model.x_proj.weight.shape == (model.dt_proj.in_features + 8, 12)
    assert model.dt_proj.weight.shape[0] == 12
    assert model(x).shape == (2, 5, 12)


@pytest.mark.parametrize("a_use", ["transposed", "twice", "shared"])
def test_a_state_matrix_read_otherwise_keeps_the_inner_channels(a_use):
    """Through a transpose the parameter's dims are not known to be in order; read a second
    time (itself, or a value made from it on the way to the scan), its other reader would see
    a different tensor: the inner channels stay."""
    torch.manual_seed(0)
    model, x = SelectiveScan(a_use=a_use), torch.randn(2, 5, 12)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    inner = [g for g in pruner.graph.groups if g.size == 24]
    assert inner and all(g.protected.all() for g in inner)
    pruner.step()
    assert model.A_log.shape == (24, 4) and model(x).shape == (2, 5, 12)


def test_hf_mamba_prunes_its_inner_channels_exactly_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    def config():  # a fresh one each time: pruning updates the model's config
        return transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                        num_hidden_layers=2, expand=2, time_step_rank=2,
                                        conv_kernel=3)

    ids = torch.randint(0, 64, (2, 6))
    inputs = {"input_ids": ids, "use_cache": False}
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config()).eval()
    pruner = StructuredPruner(model, inputs, pruning_ratio=0.5)
    # the inner channels alone (the hidden size feeds RMSNorms: not exact by zeroing)
    inner = {g.id for g in pruner.graph.groups if any(m.name.endswith("A_log") for m in g.members)}
    assert len(inner) == 2
    full = pruner.plan()
    apply_unchanged(model, pruner, inputs, PruningPlan(
        pruner.graph, {g: idx for g, idx in full.removals.items() if g in inner}))
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.shape == (16, 4) and mixer.conv1d.weight.shape[0] == mixer.D.shape[0] == 16

    # the hidden size and the inner width both halved: the config (expand = 2) describes it
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config()).eval()
    StructuredPruner(model, inputs, pruning_ratio=0.5).step()
    assert model.backbone.layers[1].mixer.A_log.shape == (16, 4)
    model.save_pretrained(tmp_path)
    again = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits)


class TriangularSolve(nn.Module):
    """Values solved against a lower-triangular matrix over positions (the chunked delta rule
    of Gated DeltaNet); ``along="channels"`` makes the system mix the channels instead."""

    def __init__(self, along="positions"):
        super().__init__()
        self.along = along
        self.v, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):  # x: [B, T, 6]
        v = self.v(x)
        n = v.shape[1] if self.along == "positions" else v.shape[2]
        system = torch.eye(n) + 0.1 * torch.ones(n, n).tril(-1)
        if self.along == "positions":
            solved = torch.linalg.solve_triangular(system, v, upper=False)
        else:  # v @ system^-1: the rows of v solved, its channels mixed
            solved = torch.linalg.solve_triangular(system, v, upper=False, left=False)
        return self.head(solved)


def test_triangular_solve_over_positions_keeps_channels_prunable():
    torch.manual_seed(0)
    model, x = TriangularSolve(), torch.randn(2, 5, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    check_equivalence(model, pruner, x)
    assert model.v.out_features == 4 and model.head.in_features == 4


def test_triangular_solve_over_channels_protects_them():
    torch.manual_seed(0)
    model, x = TriangularSolve(along="channels"), torch.randn(2, 5, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    (group,) = [g for g in pruner.graph.groups if g.size == 8]
    assert group.protected.all() and any("solve" in why.lower() for why in group.reasons)


class ResidualScans(nn.Module):
    """Two mixers on a residual stream, as in a Mamba backbone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.mixers = nn.ModuleList([SelectiveScan(), SelectiveScan()])
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.embed(x)
        for mixer in self.mixers:
            h = h + mixer(F.layer_norm(h, (12,)))
        return self.head(h)


def test_the_inner_width_is_channels_and_the_stream_hidden():
    """Joined by products only, the inner width is no residual stream: kinds=["channels"]
    prunes it and keeps the stream."""
    torch.manual_seed(0)
    model, x = ResidualScans(), torch.randn(2, 5, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, kinds=["channels"])
    kinds = {g.size: g.kind for g in pruner.graph.groups if g.size in (12, 24)}
    assert kinds == {12: "hidden", 24: "channels"}
    pruner.step()
    assert [m.A_log.shape for m in model.mixers] == [(12, 4), (12, 4)]
    assert model.embed.out_features == 12 and model(x).shape == (2, 5, 3)


def _mamba2(groups):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=64, hidden_size=16, num_heads=8, head_dim=4,
                                       expand=2, n_groups=groups, state_size=4, chunk_size=4,
                                       num_hidden_layers=2, time_step_rank=2, conv_kernel=3)
    return transformers.Mamba2ForCausalLM(config).eval()


@pytest.mark.parametrize("groups", [1, 2])
def test_hf_mamba2_heads_prune_exactly_within_their_groups(groups, monkeypatch):
    """Mamba-2 splits its projection by ``[d, conv_dim, heads]``, the convolved part again by
    ``[d, g * state, g * state]`` and repeats B and C once per head. Heads prune (as many
    in every group), B and C keep their width, and with the gated norm's group statistics
    left out (they are the one inexact part; the reload test below checks its group size)
    removing the heads whose output projection columns are zero changes nothing."""
    from transformers.models.mamba2 import modeling_mamba2

    def gated(self, hidden_states, gate=None):  # the norm without its group statistics
        return self.weight * hidden_states * F.silu(gate)
    monkeypatch.setattr(modeling_mamba2.MambaRMSNormGated, "forward", gated)
    model = _mamba2(groups)
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "use_cache": False}
    pruner = StructuredPruner(model, inputs, pruning_ratio=0.5, kinds=["heads"])
    heads = [g for g in pruner.graph.groups if any(m.name.endswith("A_log") for m in g.members)]
    assert len(heads) == 2 and not any(g.protected.any() for g in heads)
    fixed = [g for g in pruner.graph.groups if g.protected.any() and "model output" not in
             g.reasons]
    assert fixed and all(any("no attribute of it sizes" in r for r in g.reasons) for g in fixed)
    apply_unchanged(model, pruner, inputs, pruner.plan())
    mixer = model.backbone.layers[0].mixer
    assert (mixer.num_heads, mixer.intermediate_size, mixer.conv_dim) == (
        4, 16, 16 + 2 * groups * 4)
    assert mixer.A_log.shape == (4,)


@pytest.mark.parametrize("groups", [1, 2])
def test_hf_mamba2_pruned_generates_and_reloads(groups, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _mamba2(groups)
    ids = torch.randint(0, 64, (2, 7))
    StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5).step()
    assert (model.config.num_heads, model.config.hidden_size) == (4, 8)
    # the gated norm's groups keep 4 // groups heads of 4 each
    assert model.backbone.layers[0].mixer.norm.group_size == 16 // groups
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 10)
    model.save_pretrained(tmp_path)
    again = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_falcon_h1_mamba_heads_prune_and_its_config_follows(tmp_path):
    """A hybrid (attention and a Mamba-2 mixer side by side) that names its SSM width
    ``mamba_d_ssm``: the head count and that width follow into the config, so
    ``from_pretrained`` rebuilds the pruned model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, mamba_n_heads=8,
        mamba_d_head=4, mamba_d_ssm=32, mamba_n_groups=1, mamba_d_state=4, mamba_chunk_size=4)
    model = transformers.FalconH1ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    with pytest.warns(UserWarning, match="mup_vector"):  # a buffer the model recomputes
        StructuredPruner(model, {"input_ids": ids, "use_cache": False}, pruning_ratio=0.5,
                         kinds=["heads"]).step()
    assert (model.config.mamba_n_heads, model.config.mamba_d_ssm) == (4, 16)
    assert model.model.layers[0].mamba.in_proj.out_features < 32 + 32 + 8 + 8
    model.save_pretrained(tmp_path)
    again = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


class GroupRMSNorm(nn.Module):
    """An RMSNorm over groups of plain channels, written by hand."""

    def __init__(self, c, group_size):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.group_size = group_size

    def forward(self, x):
        g = x.view(*x.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * g.view(*x.shape)


class GroupNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 64), GroupRMSNorm(64, 16), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.fc2(self.norm(self.fc1(x)))


def test_a_grouped_norm_over_plain_channels_loses_whole_groups_exactly():
    """Only over heads (Mamba-2) do a grouped norm's groups keep the same positions; over an
    MLP's channels each group goes whole, and the norm's output does not move."""
    torch.manual_seed(0)
    model, x = GroupNormMLP().eval(), torch.randn(2, 5, 16)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    inner = next(g for g in pruner.graph.groups if any(m.name == "fc1" for m in g.members))
    assert (inner.kind, inner.size) == ("heads", 4)
    check_equivalence(model, pruner, x)
    assert model.fc1.out_features == 32 and model.norm.group_size == 16
