"""Which conv feeds which norm (``mabn.wiring.conv_norm_pairs``), by the dataflow: on models
nobody here wrote, pre-activation and concatenating ones included, every pair is checked against
a forward pass, folding is exact in float64, and the norms that no conv feeds are named."""

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import mabn
from mabn.norms.centralization import is_centralized
from mabn.wiring import conv_norm_pairs, paired_norms

MODELS = {  # (builder, input side): families nobody here wrote
    "timm.densenet121": (lambda: timm.create_model("densenet121", num_classes=4), 32),  # concatenation
    "timm.resnetv2_50": (lambda: timm.create_model("resnetv2_50", num_classes=4), 32),  # pre-activation
    "tv.densenet121": (lambda: torchvision.models.densenet121(num_classes=4), 32),
    "timm.dpn68": (lambda: timm.create_model("dpn68", num_classes=4), 32),  # dual path: both, and grouped convs
    "tv.inception_v3": (lambda: torchvision.models.inception_v3(num_classes=4, aux_logits=False), 75),
    "timm.dla34": (lambda: timm.create_model("dla34", num_classes=4), 32),  # aggregation by concatenation
}
TRAINING = {
    "bn": {"normalization_batch": 2},
    "mabn": {"normalization_batch": 2, "sma_window": 2, "warmup_iters": 0, "renorm_warmup_iters": 1},
}


def fed_by_their_conv(model, x) -> int:
    """Assert, in one forward pass, that each paired norm's input is its conv's output (the same
    tensor); return the number of pairs."""
    outputs, inputs, handles = {}, {}, []
    pairs = conv_norm_pairs(model)
    for conv_name, conv, norm_name, norm in pairs:
        handles.append(conv.register_forward_hook(lambda m, a, out, n=conv_name: outputs.setdefault(n, out)))
        handles.append(norm.register_forward_pre_hook(lambda m, a, n=norm_name: inputs.setdefault(n, a[0])))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for conv_name, _, norm_name, _ in pairs:
        assert inputs[norm_name] is outputs[conv_name], f"{norm_name} is not fed by {conv_name}"
    return len(pairs)


def train_a_little(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plain_models_pair_only_norms_their_conv_feeds(name):
    build, side = MODELS[name]
    model = build().eval()
    norms = sum(isinstance(m, paired_norms()) for m in model.modules())
    paired = fed_by_their_conv(model, torch.randn(2, 3, side, side))
    assert 0 < paired <= norms


def unfed(model, kind) -> list[str]:
    fed = {name for _, _, name, _ in conv_norm_pairs(model)}
    return [name for name, m in model.named_modules() if isinstance(m, kind) and name not in fed]


@pytest.mark.parametrize("norm", sorted(TRAINING))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_models_train_and_fold_exactly_in_float64(name, norm):
    build, side = MODELS[name]
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mabn.convert_model(build().double(), norm, **TRAINING[norm])
    told = [str(w.message) for w in caught if "fed by no conv" in str(w.message)]
    paired = fed_by_their_conv(model, x)
    if norm == "mabn":  # exactly the paired convs are centralized; the others are named
        fed = {id(conv) for _, conv, _, _ in conv_norm_pairs(model)}
        assert all(is_centralized(m) == (id(m) in fed) for m in model.modules() if isinstance(m, nn.Conv2d))
        left = unfed(model, mabn.MABN2d)
        assert len(told) == (1 if left else 0) and (not left or told[0].startswith(f"MABN2d at {left[0]} "))
    else:
        assert not told
    model = train_a_little(model, x)
    with torch.no_grad():
        expected = model(x)
        folded = mabn.fold_norms(copy.deepcopy(model))
        got = folded(x)
    left = sum(isinstance(m, paired_norms()) for m in folded.modules())
    assert left == sum(isinstance(m, paired_norms()) for m in model.modules()) - paired  # the unfed stay
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("norm", ["cbn", "gn_ws"])
@pytest.mark.parametrize("name", ["timm.densenet121", "timm.resnetv2_50"])
def test_norms_that_need_their_conv_refuse_a_model_where_none_feeds_them(name, norm):
    with pytest.raises(ValueError, match=r"at \S+ \(and \d+ more\) is fed by no conv .*use another norm") as error:
        mabn.convert_model(MODELS[name][0](), norm)
    assert "\n" not in str(error.value)
    first = "features.denseblock1.denselayer1.norm1.0" if "densenet" in name else "stages.0.blocks.0.norm1.0"
    assert f" at {first} " in str(error.value)  # the first norm of a dense layer or a pre-activation block


class Crossed(nn.Module):
    """Registered in another order than it computes: ``norm`` follows ``late``, the last conv of
    its width registered before it, but is fed by ``early``; a sum feeds ``after_sum``."""

    def __init__(self, norm_layer):
        super().__init__()
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.late = nn.Conv2d(3, 8, 1)
        self.norm = norm_layer(8)
        self.after_sum = norm_layer(8)

    def forward(self, x):
        return self.after_sum(self.norm(self.early(x)) + self.late(x))


class Untraceable(nn.Module):
    """Control flow on its input: the trace fails here, its children are traced on their own."""

    def __init__(self):
        super().__init__()
        self.chain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.chain(x)
        return self.norm(self.conv(x)) if x.sum() > 0 else self.norm(x)


def test_pairs_follow_the_dataflow_not_the_registration_order():
    assert [(c, n) for c, _, n, _ in conv_norm_pairs(Crossed(nn.BatchNorm2d))] == [("early", "norm")]
    model = mabn.convert_model(Crossed(nn.BatchNorm2d), "mabn")
    assert is_centralized(model.early) and not is_centralized(model.late)
    with pytest.raises(ValueError, match="GroupNormWS at after_sum is fed by no conv"):
        mabn.convert_model(Crossed(nn.BatchNorm2d), "gn_ws")
    # where the trace fails, what is certain remains: a Sequential's conv and the norm after it
    assert [(c, n) for c, _, n, _ in conv_norm_pairs(Untraceable())] == [("chain.0", "chain.1")]


def test_cbn_reads_the_conv_that_feeds_it():
    model = Crossed(nn.BatchNorm2d)
    model.after_sum = nn.Identity()  # only the conv-fed norm left: cbn binds
    model = mabn.convert_model(model, "cbn", burnin=1).train()
    assert model.norm._conv[3] == tuple(model.early.weight.shape)  # (8, 3, 3, 3), not late's 1x1
    assert model.early._forward_pre_hooks and not model.late._forward_pre_hooks  # the input it reads
    model(torch.randn(4, 3, 8, 8)).sum().backward()


def test_the_export_folds_only_the_norms_a_conv_feeds(tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra is not installed (pip install -e '.[deploy]')")
    from mabn.export import export_onnx

    model = train_a_little(
        mabn.convert_model(timm.create_model("resnetv2_18", num_classes=4), "bn"), torch.randn(4, 3, 32, 32)
    )
    left = len(unfed(model, mabn.BatchNorm2d))  # the pre-activation norms and the final one
    result = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")  # checked against PyTorch
    assert left == 9 and result.op_counts["BatchNormalization"] == left
