"""Registry, model conversion, weight centralization and inference folding on real model
families (timm and torchvision ResNets)."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import mabn
from mabn import registry
from mabn.convert import fold_norms
from mabn.norms.centralization import is_centralized
from mabn.wiring import conv_norm_pairs

OPTIONS = {
    "bn": {"normalization_batch": 2},
    "syncbn": {},
    "gn": {},
    "ln": {},
    "in": {},
    "brn": {"normalization_batch": 2, "warmup_iters": 0, "r_max_iters": 2, "d_max_iters": 2},
    "mabn": {"normalization_batch": 2, "sma_window": 2, "warmup_iters": 0, "renorm_warmup_iters": 1},
}
FAMILIES = {
    "timm": lambda **kw: timm.create_model("resnet18", num_classes=10, **kw),
    "torchvision": lambda **kw: torchvision.models.resnet18(num_classes=10, **kw),
}


def norm_modules(model):
    return [
        m
        for m in model.modules()
        if isinstance(
            m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, mabn.BatchNorm2d, mabn.BatchRenorm2d, mabn.MABN2d)
        )
    ]


def test_unknown_norm_and_option_errors_name_the_fix():
    with pytest.raises(
        ValueError,
        match=r"unknown norm 'bnx': choose one of bn, brn, cbn, evonorm_b0, evonorm_s0, frn, gn, gn_ws, in, ln, "
        r"mabn, mimicnorm, powernorm, syncbn",
    ):
        mabn.norm_layer("bnx")
    with pytest.raises(TypeError, match=r"norm 'gn' does not take these options \['sma_window'\]"):
        mabn.norm_layer("gn", sma_window=4)
    assert [mabn.build_norm("gn", c).num_groups for c in (48, 16, 72, 64, 7)] == [24, 16, 24, 32, 7]
    assert mabn.build_norm("gn_ws", 48, num_groups=8).num_groups == 8


def test_register_norm_makes_a_name_available_everywhere():
    class Scale(nn.Module):
        def __init__(self, channels, factor=2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    mabn.register_norm("scale", Scale)
    try:
        model = torchvision.models.resnet18(norm_layer=mabn.norm_layer("scale", factor=0.5))
        assert sum(isinstance(m, Scale) for m in model.modules()) == 20
        with pytest.raises(ValueError, match="already registered"):
            mabn.register_norm("scale", nn.Identity)
    finally:
        registry.TABLE.pop("scale")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_norm_layer_builds_every_norm_of_the_family(family, name):
    model = mabn.wire_norms(FAMILIES[family](norm_layer=mabn.norm_layer(name, **OPTIONS[name])))
    expected = type(mabn.build_norm(name, 64, **OPTIONS[name]))
    found = norm_modules(model)
    assert len(found) == 20 and all(type(m) is expected for m in found)
    model(torch.randn(4, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_convert_model_replaces_every_batchnorm(family, name):
    model = FAMILIES[family]()
    original = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    converted = mabn.convert_model(model, name, **OPTIONS[name])
    expected = type(mabn.build_norm(name, 64, **OPTIONS[name]))
    found = norm_modules(converted)
    assert len(found) == len(original) == 20
    assert all(type(m) is expected for m in found)
    for old, new in zip(original, found):
        assert new.weight is old.weight and new.bias is old.bias
    pairs = conv_norm_pairs(converted)
    assert len(pairs) == 20
    assert all(is_centralized(conv) == (name == "mabn") for _, conv, _, _ in pairs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mabn_conversion_centralizes_weights_and_loads_plain_checkpoints(family):
    plain = FAMILIES[family]()
    plain_state = plain.state_dict()
    model = mabn.convert_model(FAMILIES[family](), "mabn", **OPTIONS["mabn"])
    model.load_state_dict(plain_state)
    for _, conv, _, _ in conv_norm_pairs(model):
        original = conv.parametrizations.weight.original
        assert not torch.allclose(original.mean(dim=(1, 2, 3)), torch.zeros(original.shape[0]), atol=1e-4)
        torch.testing.assert_close(conv.weight.mean(dim=(1, 2, 3)), torch.zeros(conv.out_channels), atol=1e-6, rtol=0)
        torch.testing.assert_close(conv.weight, original - original.mean(dim=(1, 2, 3), keepdim=True))
    first = conv_norm_pairs(model)[0]
    assert torch.equal(first[1].parametrizations.weight.original, plain_state[first[0] + ".weight"])
    # BN statistics seed MABN's EMA with the second moment var + mean^2
    bn_key = first[2]
    torch.testing.assert_close(
        first[3].ema_chi2, plain_state[bn_key + ".running_var"] + plain_state[bn_key + ".running_mean"] ** 2
    )
    mabn.centralize_weights(model)  # idempotent
    assert len(first[1].parametrizations.weight) == 1


def test_centralization_gradients_are_those_of_the_formula_to_second_order():
    conv = mabn.centralize_weights(nn.Sequential(nn.Conv2d(3, 4, 3), mabn.MABN2d(4)))[0]
    original = conv.parametrizations.weight.original
    grad = torch.randn_like(original)
    formula = lambda w: w - w.mean(dim=(1, 2, 3), keepdim=True)
    ours = torch.autograd.grad((conv.weight * grad).sum().square(), original, create_graph=True)[0]
    theirs = torch.autograd.grad((formula(original) * grad).sum().square(), original, create_graph=True)[0]
    torch.testing.assert_close(ours, theirs)
    probe = torch.randn_like(original)
    torch.testing.assert_close(
        torch.autograd.grad((ours * probe).sum(), original)[0], torch.autograd.grad((theirs * probe).sum(), original)[0]
    )
    centralize = conv.parametrizations.weight[0]
    torch.testing.assert_close(
        torch.vmap(centralize)(torch.stack([original, probe])), torch.stack([formula(original), formula(probe)])
    )


@pytest.mark.parametrize("name", ["bn", "brn", "syncbn"])
def test_batchnorm_checkpoints_load_into_converted_models(name):
    plain = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        plain.bn1.running_mean.uniform_()
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=10), name, **OPTIONS[name])
    model.load_state_dict(plain.state_dict())
    assert torch.equal(model.bn1.running_mean, plain.bn1.running_mean)


def train_a_little(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=generator)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["bn", "brn", "mabn", "syncbn"])
def test_folding_keeps_eval_outputs_and_leaves_plain_convs(family, name):
    model = train_a_little(mabn.convert_model(FAMILIES[family](), name, **OPTIONS[name]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(copy.deepcopy(model))
        got = folded(x)
    assert not norm_modules(folded)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(c) is nn.Conv2d and c.bias is not None for c in convs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_folding_leaves_group_norm_alone():
    model = train_a_little(mabn.convert_model(FAMILIES["torchvision"](), "gn"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(copy.deepcopy(model))
        torch.testing.assert_close(folded(x), expected)
    assert len(norm_modules(folded)) == 20


MOBILE_NETS = {  # models nobody here wrote: grouped and depthwise convs, widths 32 does not divide
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=4),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=4),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=4),  # timm's BatchNormAct2d
}
FOLDABLE = {"bn", "syncbn", "brn", "cbn", "mabn"}  # and powernorm without group scaling (not its default)


@pytest.mark.parametrize("net", sorted(MOBILE_NETS))
def test_converting_a_mobile_net_to_bn_keeps_its_outputs(net):
    """The converted model is the same network (every activation, dropout and shortcut kept)."""
    original = MOBILE_NETS[net]().double()
    eps = {m.eps for m in original.modules() if isinstance(m, nn.BatchNorm2d)}.pop()  # 1e-3 in torchvision's
    converted = mabn.convert_model(copy.deepcopy(original), "bn", eps=eps)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    outputs = []
    for model in (converted, original):
        torch.manual_seed(1)  # the same dropout masks
        outputs.append(model(x))
    torch.testing.assert_close(*outputs)


@pytest.mark.parametrize("net", sorted(MOBILE_NETS))
@pytest.mark.parametrize("name", sorted(mabn.NORMS))
def test_every_norm_converts_a_mobile_net_trains_evaluates_and_folds(net, name):
    """In float64: buffers follow the model's dtype (a float64 model converted to mabn used to fail
    in eval); CBN takes grouped and depthwise convs; the group norms pick a group count per layer."""
    options = {**OPTIONS.get(name, {}), **({"burnin": 1} if name == "cbn" else {})}
    model = mabn.convert_model(MOBILE_NETS[net]().double(), name, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    expected = model.eval()(x)
    assert expected.dtype == torch.float64 and expected.isfinite().all()
    if name in FOLDABLE:
        folded = fold_norms(copy.deepcopy(model))
        assert not any(type(m) is type(mabn.build_norm(name, 8)) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, atol=1e-9, rtol=1e-9)
