"""Channel semantics of single ops, each seen between two producers and a consumer layer."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cleanai
from equivalence import check_equivalence

from conftest import Double, R, assert_maps_follow_dataflow, assert_well_formed, group_with, layout


class Between(nn.Module):
    """Producers ``a`` (ca channels) and ``b`` (cb channels) from the input, ``fn(self, a, b)``,
    then the consumer ``head`` (a 1x1 conv, or a Linear when ``linear=True``)."""

    def __init__(self, fn, head_in=4, ca=4, cb=4, linear=False):
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Conv2d(3, ca, 1), nn.Conv2d(3, cb, 1)
        self.head = nn.Linear(head_in, 2) if linear else nn.Conv2d(head_in, 2, 1)

    def forward(self, x):
        return self.head(self.fn(self, self.a(x), self.b(x)))


class Wrap(nn.Module):
    """Runs ``fn`` inside a named submodule, so warnings can say where."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def graph(model, x=None, train=False, attention="heads"):
    model.train(train)
    x = torch.randn(2, 3, 4, 4) if x is None else x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = cleanai.DependencyGraph(model, x, attention=attention)
    g.warnings = [str(w.message) for w in caught if "CleanAI" in str(w.message)]
    g.x = x
    g.model = model  # the graph refers to its model weakly; the tests inspect its layers
    return g


def check(g, model, channels=4):
    """Structural invariants, and every index map against the model's real data flow."""
    assert_well_formed(g)
    assert_maps_follow_dataflow(model.eval(), g.x, g, channels=channels)


# --- element-wise --------------------------------------------------------------------------

ELEMENTWISE = {
    "add": lambda s, a, b: a + b,
    "sub": lambda s, a, b: a - b,
    "mul": lambda s, a, b: a * b,
    "div": lambda s, a, b: a / b,
    "inplace_add": lambda s, a, b: a.add_(b),
    "maximum": lambda s, a, b: torch.maximum(a, b),
    "where": lambda s, a, b: torch.where(a > b, a, b),
    "lerp": lambda s, a, b: torch.lerp(a, b, 0.3),
    "addcmul": lambda s, a, b: torch.addcmul(a, a, b),
    "einsum_product": lambda s, a, b: torch.einsum("bchw,bchw->bchw", a, b),
}


@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
def test_elementwise_ops_couple_their_operands(op):
    model = Between(ELEMENTWISE[op])
    g = graph(model)
    assert len(g.groups) == 2
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "b.out": R(4), "head.in": R(4)}
    assert not grp.protected.any() and not g.warnings
    check(g, model)


GATES = {
    "one_channel_producer": (lambda s, a, b: a * torch.sigmoid(b), 1),
    "channel_mean": (lambda s, a, b: a * b.mean(1, keepdim=True), 4),
    "per_sample_scalar": (lambda s, a, b: a + b.mean((1, 2, 3), keepdim=True), 4),
    "spatial_max": (lambda s, a, b: a - b.amax(1, keepdim=True), 4),
}


@pytest.mark.parametrize("op", sorted(GATES))
def test_broadcast_operand_with_channel_dim_one_does_not_couple(op):
    fn, cb = GATES[op]
    g = graph(Between(fn, cb=cb))
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": R(4)}
    assert not grp.protected.any()
    assert layout(group_with(g, "b.out")) == {"b.out": R(cb)}


# --- ops that keep the channel dim ---------------------------------------------------------

PASS_THROUGH = {
    "activations": nn.Sequential(nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.LeakyReLU(),
                                 nn.ELU(), nn.Mish(), nn.ReLU6(), nn.Hardsigmoid(), nn.Tanh(),
                                 nn.Softplus(), nn.Sigmoid(), nn.PReLU()),
    "dropouts": nn.Sequential(nn.Dropout(0.5), nn.Dropout2d(0.5)),
    "pooling": nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(3),
                             nn.AdaptiveMaxPool2d(2), nn.LPPool2d(2, 1)),
    "identity": nn.Identity(),
    "interpolate": Wrap(lambda y: F.interpolate(F.interpolate(y, scale_factor=2), size=(5, 3),
                                                mode="bilinear")),
    "upsample": nn.Upsample(scale_factor=2, mode="bicubic"),
    "padding": nn.Sequential(nn.ZeroPad2d(1), nn.ReflectionPad2d(1), nn.ReplicationPad2d(1)),
    "spatial_flip_roll": Wrap(lambda y: torch.roll(y.flip(3), 1, dims=2)),
    "scalar_mul_div": Wrap(lambda y: -(y * 0.5) / 2),
    "spatial_softmax": Wrap(lambda y: y.flatten(2).softmax(-1).view_as(y)),
    "contiguous_channels_last": Wrap(lambda y: y.contiguous(memory_format=torch.channels_last)),
    "spatial_cumsum": Wrap(lambda y: y.cumsum(3)),
    "spatial_sort_topk": Wrap(lambda y: y.sort(dim=3).values.topk(2, dim=2).values),
}


@pytest.mark.parametrize("op", sorted(PASS_THROUGH))
def test_ops_that_keep_channels_pass_them_through(op):
    layer = PASS_THROUGH[op]
    model = Between(lambda s, a, b: s.mid(a))
    model.mid = layer
    g = graph(model)
    # a and head; b's output is dropped: walked all the same, a group nobody reads
    assert len(g.groups) == 3 and layout(group_with(g, "b.out")) == {"b.out": R(4)}
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": R(4)}
    assert not grp.protected.any() and not g.warnings
    check(g, model)


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.Dropout(0.5, inplace=True),
                                   nn.Dropout2d(0.2)], ids=["dropout", "inplace", "dropout2d"])
def test_dropout_graph_does_not_depend_on_train_mode(layer):
    # train-mode dropout multiplies by a random mask made during the forward: not a constraint
    model = Between(lambda s, a, b: s.mid(a))
    model.mid = layer
    eval_graph, train_graph = graph(model, train=False), graph(model, train=True)
    assert layout(group_with(eval_graph, "a.out")) == {"a.out": R(4), "head.in": R(4)}
    assert [layout(g) for g in train_graph.groups] == [layout(g) for g in eval_graph.groups]
    assert not group_with(eval_graph, "a.out").protected.any()
    assert not group_with(train_graph, "a.out").protected.any()
    assert not eval_graph.warnings and not train_graph.warnings


# --- split, chunk, unbind, narrow, slicing -------------------------------------------------

def test_chunk_ties_the_halves():
    model = Between(lambda s, a, b: sum(a.chunk(2, 1)[1:], a.chunk(2, 1)[0]), head_in=2)
    g = graph(model)
    grp = group_with(g, "a.out")
    assert grp.size == 2 and layout(grp) == {"a.out": R(2, reps=2), "head.in": R(2)}
    assert not grp.protected.any()
    check(g, model, channels=2)


def test_split_on_a_spatial_dim_keeps_channels():
    model = Between(lambda s, a, b: torch.cat(a.split([1, 3], dim=2)[::-1], 2) + b)
    g = graph(model)
    assert layout(group_with(g, "a.out")) == {"a.out": R(4), "b.out": R(4), "head.in": R(4)}
    check(g, model)


PROTECTING = {
    "split_unequal": (lambda s, a, b: a.split([1, 3], dim=1)[1], 3, "unequal sizes"),
    "select": (lambda s, a, b: a[:, 2].unsqueeze(1), 1, "select of one channel"),
    "unbind": (lambda s, a, b: torch.stack(a.unbind(1)[:2], 1), 2, "unbind on the channel dim"),
    "pad_channels": (lambda s, a, b: F.pad(a, (0, 0, 0, 0, 1, 0)), 5, "padding of the channel"),
    "roll_channels": (lambda s, a, b: torch.roll(a, 1, dims=1), 4, "reorders channels"),
    "sort_channels": (lambda s, a, b: a.sort(dim=1).values, 4, "reorders channels"),
    "topk_channels": (lambda s, a, b: a.topk(2, dim=1).values, 2, "reorders channels"),
}


@pytest.mark.parametrize("op", sorted(PROTECTING))
def test_ops_that_pick_channels_by_position_protect_them(op):
    fn, head_in, reason = PROTECTING[op]
    g = graph(Between(fn, head_in=head_in))
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4)}  # the consumer is cut off from a's channels
    assert grp.protected.all()
    assert len(grp.reasons) == 1 and reason in next(iter(grp.reasons))
    assert not any(grp.protected.any() for grp in g.groups
                   if "a.out" not in layout(grp) and "head.out" not in layout(grp))
    assert_well_formed(g)


# a slice of a layer's whole output makes the part a group of its own. Bounds written in the
# code do not follow a pruned part, which the pruned forward's check catches: the groups whose
# removal moved them keep their channels. A bound counted from the end does follow (the
# one-channel part after it never loses its channel). Either way the model is exact
PART_SLICES = {  # op, positions taken, whether the bounds follow
    "narrow": (lambda s, a, b: a.narrow(1, 0, 2), [0, 1], False),
    "slice": (lambda s, a, b: a[:, 1:3], [1, 2], False),
    "all_but_the_last": (lambda s, a, b: a[:, :-1], [0, 1, 2, 3, 4], True),
}


@pytest.mark.parametrize("op", sorted(PART_SLICES))
def test_a_slice_of_a_layer_output_is_a_part_checked_when_pruned(op):
    fn, taken, follows = PART_SLICES[op]
    model = Between(fn, head_in=len(taken), ca=6)
    g = graph(model)
    grp = group_with(g, "head.in")
    assert layout(grp) == {"a.out": [taken.index(p) if p in taken else None for p in range(6)],
                           "head.in": list(range(len(taken)))}
    assert not grp.protected.any()
    assert [s[2:] for s in g.slices] == [[taken[0], taken[-1] + 1]]
    check(g, model, channels=6)
    pruner = cleanai.StructuredPruner(model, g.x, pruning_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_equivalence(model, pruner, g.x)
    assert any("SliceMoved" in str(w.message) for w in caught) != follows
    assert (model.head.in_channels < len(taken)) == follows


# ops that take fixed positions of the channel dim otherwise (a step, an index) keep every
# channel of that dim, but pass the ids of the part they take on to the layers that read it
FIXED_PICKS = {
    "strided_slice": (lambda s, a, b: a[:, ::2], [0, 2, 4]),
    "index_from_the_end": (lambda s, a, b: a[:, [-2]] * 2, [4]),
    "index": (lambda s, a, b: a[:, [1, 0]], [1, 0]),
}


@pytest.mark.parametrize("op", sorted(FIXED_PICKS))
def test_fixed_picks_keep_their_channels_and_pass_the_part_taken_on(op):
    fn, taken = FIXED_PICKS[op]
    model = Between(fn, head_in=len(taken), ca=6)  # 6: halves are rotary's case, not this
    g = graph(model)
    grp = group_with(g, "a.out")
    assert layout(grp)["head.in"] == taken and grp.protected.all()
    assert len(grp.reasons) == 1
    check(g, model, channels=6)


class SliceThenLayer(nn.Module):
    """A layer reading a slice, its output added to another branch (Falcon's attention:
    ``dense(attention(qkv[..., :-2, :]))`` into the residual stream)."""

    def __init__(self):
        super().__init__()
        self.a, self.mid = nn.Conv2d(3, 6, 1), nn.Conv2d(4, 8, 1)
        self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.mid(self.a(x)[:, :-2]) + self.b(x))


def test_a_layer_reading_a_slice_keeps_its_own_channels_prunable():
    # the slice used to cut its reader off: mid's output was protected as unfollowed, and
    # with it the branch it is added to
    model = SliceThenLayer()
    g = graph(model)
    branch = group_with(g, "mid.out")
    assert "b.out" in layout(branch) and not branch.protected.any()
    check(g, model, channels=6)
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_equivalence(model, cleanai.StructuredPruner(model, x, pruning_ratio=0.5), x)
    # a's part that mid reads prunes; the two channels after it would move ``[:, :-2]``: kept
    assert (model.mid.out_channels, model.b.out_channels, model.mid.in_channels) == (4, 4, 2)
    assert model.a.out_channels == 4


SPATIAL_PICKS = {
    "narrow": lambda s, a, b: a.narrow(3, 1, 2),
    "slice": lambda s, a, b: a[:, :, 1:3, ::2],
    "select_then_unsqueeze": lambda s, a, b: a[:, :, 0].unsqueeze(2),
    "unbind_stack": lambda s, a, b: torch.stack(a.unbind(2)[::-1], 2),
    "index": lambda s, a, b: a[:, :, torch.tensor([2, 0])],
    "batch_index": lambda s, a, b: a[torch.tensor([1, 0])],
}


@pytest.mark.parametrize("op", sorted(SPATIAL_PICKS))
def test_picking_along_other_dims_keeps_channels(op):
    model = Between(SPATIAL_PICKS[op])
    g = graph(model)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": R(4)} and not grp.protected.any()
    check(g, model)


# --- flatten, view, reshape ----------------------------------------------------------------

FLATTENS = {
    "flatten": (lambda s, a, b: a.flatten(1), 16),
    "view": (lambda s, a, b: a.view(a.size(0), -1), 16),
    "reshape": (lambda s, a, b: a.reshape(2, 4 * 16), 16),
    "pool_flatten": (lambda s, a, b: F.adaptive_avg_pool2d(a, 1).flatten(1), 1),
    "pool_squeeze": (lambda s, a, b: F.adaptive_avg_pool2d(a, (1, 1)).squeeze(-1).squeeze(-1), 1),
    "pool_2x2_view": (lambda s, a, b: F.avg_pool2d(a, 2).view(2, -1), 4),
}


@pytest.mark.parametrize("op", sorted(FLATTENS))
def test_flatten_conv_into_linear(op):
    fn, hw = FLATTENS[op]
    model = Between(fn, head_in=4 * hw, linear=True)
    g = graph(model)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": [j // hw for j in range(4 * hw)]}
    assert not grp.protected.any()
    check(g, model)


def test_view_into_groups_ties_the_inner_position():
    # [B, 4, H, W] -> [B, 2, 2, H, W] -> sum over the 2 outer blocks: channel c and c + 2 merge
    model = Between(lambda s, a, b: a.view(2, 2, 2, 4, 4).sum(1), head_in=2)
    g = graph(model)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(2, reps=2), "head.in": R(2)}
    check(g, model, channels=2)


# --- permute, transpose --------------------------------------------------------------------

LAST_DIM = {
    "permute": lambda s, a, b: s.lin(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    "tokens": lambda s, a, b: s.lin(a.flatten(2).transpose(1, 2)).transpose(1, 2)
    .reshape(2, 5, 4, 4),
    "movedim": lambda s, a, b: s.lin(a.movedim(1, -1)).movedim(-1, 1),
}


@pytest.mark.parametrize("op", sorted(LAST_DIM))
def test_channels_last_linear(op):
    model = Between(LAST_DIM[op], head_in=5)
    model.lin = nn.Linear(4, 5)
    g = graph(model)
    assert len(g.groups) == 4  # with b's dropped output
    assert layout(group_with(g, "a.out")) == {"a.out": R(4), "lin.in": R(4)}
    assert layout(group_with(g, "lin.out")) == {"lin.out": R(5), "head.in": R(5)}
    assert not any(grp.protected.any() for grp in g.groups if "head.out" not in layout(grp))
    check(g, model)


# --- pixel shuffle -------------------------------------------------------------------------

def test_pixel_shuffle_merges_r_squared_channels():
    model = Between(lambda s, a, b: F.pixel_shuffle(a, 2), ca=8, head_in=2)
    g = graph(model)
    grp = group_with(g, "a.out")
    assert grp.size == 2
    assert layout(grp) == {"a.out": [0, 0, 0, 0, 1, 1, 1, 1], "head.in": R(2)}
    check(g, model, channels=2)


def test_pixel_unshuffle_repeats_each_channel():
    model = Between(lambda s, a, b: F.pixel_unshuffle(a, 2), ca=2, head_in=8)
    g = graph(model)
    assert layout(group_with(g, "a.out")) == {"a.out": R(2), "head.in": [0, 0, 0, 0, 1, 1, 1, 1]}
    check(g, model, channels=2)


# --- attention heads -----------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv = nn.Linear(3, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 2)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(o))


def test_view_into_heads_ties_head_dim_across_heads_and_qkv():
    g = graph(Attention(), torch.randn(2, 5, 3), attention="head_dims")
    assert len(g.groups) == 3
    assert layout(group_with(g, "embed.out")) == {"embed.out": R(8), "qkv.in": R(8),
                                                  "proj.out": R(8), "head.in": R(8)}
    heads = group_with(g, "qkv.out")
    # head_dim 4: qkv output c is (q|k|v, head, c % 4); proj input c is (head, c % 4)
    assert heads.size == 4 and layout(heads) == {"qkv.out": R(4, reps=6), "proj.in": R(4, reps=2)}
    assert not heads.protected.any() and not g.warnings
    assert_well_formed(g)


def test_view_into_heads_keeps_whole_heads():
    g = graph(Attention(), torch.randn(2, 5, 3))
    assert len(g.groups) == 3
    heads = group_with(g, "qkv.out")
    # 2 heads of 4 dims: qkv output c is (q|k|v, c // 4 % 2, c % 4); proj input c is head c // 4
    assert heads.size == 2 and heads.kind == "heads"
    assert layout(heads) == {"qkv.out": [c // 4 % 2 for c in range(24)],
                             "proj.in": [c // 4 for c in range(8)]}
    assert not heads.protected.any() and not g.warnings
    assert_well_formed(g)


# --- unknown ops ---------------------------------------------------------------------------

UNKNOWN = {
    "fft": (lambda y: torch.fft.fft2(y).real, "FftC2CBackward0"),
    "cummax": (lambda y: y.cummax(dim=1).values, "CummaxBackward0"),
    "custom_function": (lambda y: Double.apply(y), "DoubleBackward"),
}


@pytest.mark.parametrize("op", sorted(UNKNOWN))
def test_unknown_op_protects_what_it_touches_and_warns_once(op):
    fn, op_name = UNKNOWN[op]
    # the op runs twice in the same module; b bypasses it
    model = Between(lambda s, a, b: torch.cat([s.mid(a) + s.mid(a) * 0.5, b], 1), head_in=8)
    model.mid = Wrap(fn)
    g = graph(model)
    assert len(g.warnings) == 1
    assert op_name in g.warnings[0] and "(in mid)" in g.warnings[0]
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4)} and grp.protected.all()
    assert grp.reasons == {f"unknown op {op_name} in mid": 4}
    other = group_with(g, "b.out")
    assert layout(other) == {"b.out": R(4), "head.in": [None] * 4 + R(4)}
    assert not other.protected.any()
    assert_well_formed(g)


def test_unknown_op_in_two_modules_gives_one_warning_naming_both():
    model = Between(lambda s, a, b: torch.cat([s.m1(a), s.m2(b)], 1), head_in=8)
    model.m1, model.m2 = Wrap(UNKNOWN["cummax"][0]), Wrap(UNKNOWN["cummax"][0])
    g = graph(model)
    assert len(g.warnings) == 1
    assert "CummaxBackward0" in g.warnings[0] and "m1" in g.warnings[0] and "m2" in g.warnings[0]
    assert group_with(g, "a.out").protected.all() and group_with(g, "b.out").protected.all()


def test_unsupported_layer_protects_its_input_and_warns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.head = nn.Linear(3, 6), nn.Bilinear(6, 6, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.mix(h, h))

    g = graph(Net(), torch.randn(4, 2, 3))
    assert len(g.warnings) == 1 and "Bilinear" in g.warnings[0] and "mix" in g.warnings[0]
    grp = group_with(g, "embed.out")
    assert layout(grp) == {"embed.out": R(6)} and grp.protected.all()


# --- bare parameters -----------------------------------------------------------------------

class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.branch = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.1))
        self.temperature = nn.Parameter(torch.ones(1))  # a scalar: not a channel member
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head((y + self.gamma * self.branch(y)) * self.temperature)


def test_layer_scale_parameter_is_a_param_member():
    model = LayerScale()
    g = graph(model)
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "branch.in": R(4), "branch.out": R(4),
                           "head.in": R(4), "gamma[0]": R(4)}
    assert not grp.protected.any()
    assert not any(m.name == "temperature" for grp in g.groups for m in grp.members)
    check(g, model)


class ClassToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(t)[:, 0])


def test_class_token_and_position_embedding_are_param_members():
    g = graph(ClassToken())
    assert len(g.groups) == 2
    grp = group_with(g, "patch.out")
    assert layout(grp) == {"patch.out": R(8), "norm.same": R(8), "head.in": R(8),
                           "cls[2]": R(8), "pos[2]": R(8)}
    assert not grp.protected.any()
    assert_well_formed(g)


def test_functional_layer_norm_weights_are_param_members():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(3, 6), nn.Linear(6, 2)
            self.w, self.b = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))

        def forward(self, x):
            return self.head(F.layer_norm(self.a(x), (6,), self.w, self.b))

    g = graph(Net(), torch.randn(2, 7, 3))
    assert layout(group_with(g, "a.out")) == {"a.out": R(6), "head.in": R(6), "w[0]": R(6),
                                              "b[0]": R(6)}
    assert_well_formed(g)


# --- known bugs ----------------------------------------------------------------------------

SCALAR_ADDS = {
    "y_plus_3": lambda s, a, b: a + 3,
    "y_minus_1": lambda s, a, b: a - 1,
    "hard_sigmoid_by_hand": lambda s, a, b: a * F.relu6(a + 3) / 6,
    "python_sum": lambda s, a, b: sum([a, a * 2]),
    "alpha_dropout": lambda s, a, b: F.alpha_dropout(a, 0.5, training=True),
}


@pytest.mark.parametrize("op", sorted(SCALAR_ADDS))
def test_adding_a_python_scalar_does_not_protect(op):
    g = graph(Between(SCALAR_ADDS[op]))
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": R(4)}
    assert not grp.protected.any(), grp.reasons


@pytest.mark.parametrize("op", [
    "inplace_dropout_after_flatten", "relu_on_a_spatial_slice",
    pytest.param("circular_pad", marks=pytest.mark.xfail(
        reason="F.pad(mode='circular') copies slices of its input into a new tensor; CopySlices "
               "does not say which region was written, so the channels are protected",
        strict=True))])
def test_inplace_op_on_a_view_is_followed(op):
    if op == "inplace_dropout_after_flatten":
        model = Between(lambda s, a, b: s.drop(F.adaptive_avg_pool2d(a, 1).flatten(1)),
                        linear=True)
        model.drop = nn.Dropout(0.2, inplace=True)
    elif op == "circular_pad":  # F.pad(mode="circular") fills its borders with copy_
        model = Between(lambda s, a, b: F.pad(a, (1, 1, 1, 1), mode="circular"))
    else:
        def fn(s, a, b):
            a[:, :, :2].relu_()
            return a
        model = Between(fn)
    g = graph(model)
    assert not g.warnings
    grp = group_with(g, "a.out")
    assert layout(grp) == {"a.out": R(4), "head.in": R(4)} and not grp.protected.any()


def _written_in_slices(s, a, b):
    """A fresh tensor filled in two slices of the channel dim, one by ``x[...] = a``, one by
    ``copy_``: the same values as ``torch.cat([a, b], 1)``, but at bounds the code may fix."""
    out = a.new_empty(a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
    out[:, :a.shape[1]] = a
    out[:, a.shape[1]:].copy_(b)
    return out


def _overwrite(s, a, b):
    out = a.clone()
    out[:, 1:3] = b[:, :2]  # a fixed range of a's channels replaced by two of b's
    return out


def _overwrite_without_grad(s, a, b):
    out = a.clone()
    out[:, 1:3] = b[:, :2]
    with torch.no_grad():  # autograd records no write here: the one above keeps its record
        out[:, 3:4] = 0.0
    return out


def _fill(s, a, b):
    out = a.clone()
    out[:, 1:3] = 0.0
    return out


@pytest.mark.parametrize("fn", [_written_in_slices, _overwrite, _overwrite_without_grad, _fill])
def test_a_write_into_a_range_of_the_channel_dim_keeps_those_channels(fn):
    """The range is fixed by the code, as a slice's bounds are: the channels written into and
    over keep their place, and the layer reading the result reads them where they really
    are (never a shifted mapping)."""
    model = Between(fn, head_in=7 if fn is _written_in_slices else 4, ca=4, cb=3)
    g = graph(model)
    if fn is not _overwrite_without_grad:  # (the untracked write hides a[3] from the check)
        check(g, model)
    ga = group_with(g, "a.out")
    assert ga.protected.all()
    head = {_written_in_slices: R(4) + [None] * 3, _overwrite: [0, None, None, 3],
            _overwrite_without_grad: [0, None, None, 3], _fill: [0, None, None, 3]}[fn]
    assert layout(ga)["head.in"] == head
    if fn is not _fill:  # b[:, :2]: the part of b's output written in
        gb = next(grp for grp in g.groups if {"b.out", "head.in"} <= set(layout(grp)))
        assert gb.protected.all()
        b_at = [None] * 4 + R(3) if fn is _written_in_slices else [None, 0, 1, None]
        assert layout(gb)["head.in"] == b_at


def test_a_slice_written_over_another_dim_keeps_the_part_written():
    """``out[..., :2] = a`` on the width dim, channels on dim 1: the channels pass through,
    the written range stays where it is."""
    def fn(s, a, b):
        out = b.clone()
        out[..., :2] = a[..., :2]
        return out
    g = graph(Between(fn))
    grp = group_with(g, "a.out")
    assert "b.out" in layout(grp) and not grp.protected.any()


def test_layer_norm_over_channels_and_space_is_not_silently_prunable():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 4, 4]), nn.Conv2d(4, 2, 1))
    g = graph(model)
    grp = group_with(g, "0.out")
    assert grp.protected.all() or "1.same" in layout(grp), layout(grp)


# --- tensors the model cached from its buffers -------------------------------------------

class CachedBias(nn.Module):
    """LeViT-style: in eval mode an attention bias gathered by an index buffer is cached at
    ``eval()`` (with autograd on), and an auxiliary head runs only in training, so the tracer
    also tries train mode. The walk then reads the cached gather's saved index buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.biases = nn.Parameter(torch.randn(8, 5))
        self.register_buffer("idxs", torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1], [0, 0, 1, 1], [2, 2, 3, 3]]))
        self.aux = nn.Linear(8, 2)
        self.head = nn.Linear(8, 3)

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self.cached = self.biases[:, self.idxs]
        return self

    def forward(self, x):
        y = self.conv(x)
        bias = self.cached if not self.training else self.biases[:, self.idxs]
        y = y + bias
        if self.training:
            return self.head(y.mean((2, 3))) + self.aux(y.mean((2, 3))).sum(1, keepdim=True)
        return self.head(y.mean((2, 3)))


def test_a_cached_gather_of_a_buffer_survives_the_trace():
    model = CachedBias().eval()
    x = torch.randn(1, 3, 4, 4)
    version = model.idxs._version
    pruner = cleanai.StructuredPruner(model, x, pruning_ratio=0.5)
    assert model.idxs._version == version  # unchanged buffers are not written back
    pruner.step()
    assert model(x).shape == (1, 3)
    model.cached.sum().backward()  # the model's own cached tensor still backpropagates


class ForceField(nn.Module):
    """A forward that runs backward itself (forces as the gradient of an energy)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 64), nn.Linear(64, 1)

    def forward(self, pos):
        pos = pos if pos.requires_grad else pos.requires_grad_(True)
        energy = self.fc2(torch.tanh(self.fc1(pos))).sum()
        (force,) = torch.autograd.grad(-energy, pos, create_graph=True)
        return force


def test_a_forward_that_backpropagates_is_traced_with_the_full_graph():
    # the trace first records without the activations autograd saves; this forward's own
    # backward needs them, so it is recorded again with the whole graph
    model = ForceField()
    with pytest.warns(UserWarning, match="channel semantics"):  # double-backward ops
        g = cleanai.DependencyGraph(model, torch.randn(8, 3))
    assert "fc1" in g.modules and "fc2" in g.modules
    assert [grp.size for grp in g.groups] == [64, 1]
