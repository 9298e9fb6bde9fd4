"""wire_norms on each model family: norm + activation layers (EvoNorm, FRN) compute the paper's
block (the norm's own activation where a ReLU followed it, none before a residual add, whose
ReLU stays), GN+WS standardizes its convs, CBN gets its conv; every new name trains."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import EvoNorm2dS0
from torch import nn

import mabn
from mabn.benchmark import saved_bytes
from mabn.detectors.torchvision_maskrcnn import build_maskrcnn
from mabn.norms.centralization import is_centralized
from mabn.norms.group_norm import StandardizeWeight
from mabn.norms.wired import NeedsWiring
from mabn.wiring import conv_norm_pairs

NORM_ACT = {"evonorm_b0": {}, "evonorm_s0": {"groups": 4}, "frn": {}}
SUCCESSORS = {"cbn": {"burnin": 1}, "gn_ws": {"num_groups": 4}, **NORM_ACT}


def activates(layer) -> bool:
    return layer.apply_act and (getattr(layer, "v", None) is not None or getattr(layer, "tau", None) is not None)


def randomize(model):
    """Parameters away from their init (v = 1, tau = 0) so that an activation too many shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".v", ".tau", ".weight", ".bias")) and p.dim() == 1:
                p.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("name", sorted(NORM_ACT))
def test_timm_blocks_compute_the_paper_block(name):
    factory = mabn.norm_layer(name, **NORM_ACT[name])
    model = randomize(
        mabn.wire_norms(
            timm.create_model("resnet26", num_classes=4, norm_layer=factory, channels=(16, 16, 32, 32), stem_width=16)
        )
    ).eval()
    basic = randomize(mabn.wire_norms(timm.create_model("resnet10t", num_classes=4, norm_layer=factory))).eval()
    block = model.layer2[0]  # a Bottleneck with a downsample
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    assert activates(block.bn1) and activates(block.bn2) and not activates(block.bn3)
    assert not activates(block.downsample[1]) and activates(model.bn1)
    shortcut = block.downsample(x)
    expected = F.relu(block.bn3(block.conv3(block.bn2(block.conv2(block.bn1(block.conv1(x)))))) + shortcut)
    torch.testing.assert_close(block(x), expected)
    b = basic.layer2[0]
    y = torch.randn(2, b.conv1.in_channels, 8, 8)
    assert activates(b.bn1) and not activates(b.bn2)
    torch.testing.assert_close(b(y), F.relu(b.bn2(b.conv2(b.bn1(b.conv1(y)))) + b.downsample(y)))


@pytest.mark.parametrize("name", sorted(NORM_ACT))
def test_torchvision_blocks_compute_the_paper_block(name):
    for builder, x in (
        (torchvision.models.resnet18, torch.randn(2, 64, 8, 8)),
        (torchvision.models.resnet50, torch.randn(2, 64, 8, 8)),
    ):
        model = randomize(mabn.convert_model(builder(num_classes=4), name, **NORM_ACT[name])).eval()
        block = model.layer1[0]
        assert isinstance(model.relu, nn.Identity) and activates(model.bn1)
        out = block.bn1(block.conv1(x))
        if hasattr(block, "bn3"):
            assert activates(block.bn2) and not activates(block.bn3)
            out = block.bn3(block.conv3(block.bn2(block.conv2(out))))
        else:
            assert not activates(block.bn2)
            out = block.bn2(block.conv2(out))
        shortcut = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(block(x), F.relu(out + shortcut))
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_torchvision_maskrcnn_heads_take_the_relu_and_the_fpn_has_none():
    model = mabn.wire_norms(
        build_maskrcnn(
            3,
            mabn.norm_layer("evonorm_s0", groups=4),
            "resnet18",
            min_size=64,
            max_size=64,
            channels=32,
            fc_channels=32,
        )
    )
    body = model.backbone.body
    assert isinstance(body.relu, nn.Identity) and activates(body.bn1)
    fpn_norms = [m for m in model.backbone.fpn.modules() if isinstance(m, EvoNorm2dS0)]
    assert fpn_norms and not any(activates(m) for m in fpn_norms)
    head = model.roi_heads.box_head[0]  # conv, norm, (ReLU taken by the norm)
    assert activates(head[1]) and isinstance(head[2], nn.Identity)
    x = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(head(x), head[1](head[0](x)))
    model.train()
    images = [torch.rand(3, 64, 64)]
    target = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 64, dtype=torch.uint8),
        }
    ]
    sum(model(images, target).values()).backward()


def test_wiring_is_idempotent_and_unknown_blocks_keep_their_activation_with_a_warning():
    factory = mabn.norm_layer("frn")
    model = mabn.wire_norms(timm.create_model("resnet10t", num_classes=4, norm_layer=factory))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mabn.wire_norms(model)
    assert model.state_dict().keys() == before.keys()

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 1), factory(4)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.warns(UserWarning, match="keep their activation"):
        custom = mabn.wire_norms(Custom())
    assert activates(custom.norm)


def test_weight_standardization_backward_is_the_formulas_and_keeps_only_the_weight():
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    standardize = StandardizeWeight(1e-3)
    assert torch.autograd.gradcheck(standardize, [weight])
    flat = weight.flatten(1)
    formula = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-3)
    grad = torch.randn(6, 27, dtype=torch.float64)
    (expected,) = torch.autograd.grad(formula, weight, grad)
    (got,) = torch.autograd.grad(standardize(weight), weight, grad.view(6, 3, 3, 3))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    kept = saved_bytes(standardize, weight, grad.view(6, 3, 3, 3))
    assert kept == weight.numel() * 8  # the weight alone


def test_gn_ws_standardizes_the_convs_that_feed_it():
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=4), "gn_ws", num_groups=8)
    conv = model.layer1[0].conv1
    weight = conv.parametrizations.weight.original
    flat = weight.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(conv.weight, expected.view_as(weight))
    x = torch.randn(2, 64, 8, 8)
    out = F.group_norm(
        F.conv2d(x, expected.view_as(weight), padding=1), 8, model.layer1[0].bn1.weight, model.layer1[0].bn1.bias
    )
    torch.testing.assert_close(model.layer1[0].bn1(conv(x)), out)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert weight.grad is not None
    plain = {k: v for k, v in torchvision.models.resnet18(num_classes=4).state_dict().items() if "conv" in k}
    assert not model.load_state_dict(plain, strict=False).unexpected_keys  # plain convs load into standardized ones
    torch.testing.assert_close(weight, plain["layer1.0.conv1.weight"])


@pytest.mark.usefixtures("standalone_layers")
def test_evonorm_b0_normalization_batch_is_timm_layer_per_group_in_turn():
    layer = mabn.build_norm("evonorm_b0", 4, normalization_batch=2)
    reference = timm.layers.EvoNorm2dB0(4)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(6, 4, 5, 5)
    expected = torch.cat([reference(part) for part in x.chunk(3)])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_options_are_checked_and_unfoldable_norms_stay():
    with pytest.raises(TypeError, match="does not take"):
        mabn.norm_layer("cbn", window=3)
    assert mabn.build_norm("evonorm_s0", 48).groups == 24  # the largest divisor of 48 not above 32
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=4), "frn").eval()
    folded = mabn.fold_norms(model)
    assert sum(isinstance(m, timm.layers.FilterResponseNormTlu2d) for m in folded.modules()) == 20


@pytest.mark.parametrize("name", sorted(SUCCESSORS))
def test_every_successor_trains_a_converted_resnet(name):
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=4), name, **SUCCESSORS[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for _ in range(4):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    assert torch.isfinite(model(x)).all()


NEEDS_WIRING = sorted(name for name in mabn.NORMS if isinstance(mabn.build_norm(name, 64), NeedsWiring))


def test_the_norms_that_need_wiring_say_so():
    assert NEEDS_WIRING == ["cbn", "evonorm_b0", "evonorm_s0", "frn", "gn_ws", "mabn"]


@pytest.mark.parametrize("name", NEEDS_WIRING)
def test_an_unwired_model_refuses_its_first_training_step_in_one_line(name):
    model = torchvision.models.resnet18(num_classes=4, norm_layer=mabn.norm_layer(name))
    with pytest.raises(RuntimeError, match=r"is not wired \(.+\): call mabn\.wire_norms\(model\)") as error:
        model(torch.randn(2, 3, 32, 32))
    assert "\n" not in str(error.value)
    mabn.wire_norms(model)(torch.randn(2, 3, 32, 32)).sum().backward()


def test_mabn_trains_uncentralized_when_asked_explicitly():
    model = torchvision.models.resnet18(num_classes=4, norm_layer=mabn.norm_layer("mabn"))
    mabn.wire_norms(model, centralize=False)(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not any(is_centralized(conv) for _, conv, _, _ in conv_norm_pairs(model))
