"""Mask R-CNN built from torchvision pieces: norm placement, nothing frozen, train/eval, weight loading."""

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d

import mabn
from mabn.config import ConfigError
from mabn.detectors.torchvision_maskrcnn import build_maskrcnn

NORM_TYPES = (
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    FrozenBatchNorm2d,
)
# tiny images and few RoIs keep the 256-channel heads cheap on CPU; kwargs also exercise the pass-through
SMALL = dict(
    min_size=128,
    max_size=128,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    box_batch_size_per_image=16,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=20,
    box_score_thresh=0.0,
    box_detections_per_img=5,
)


class RecordingNorm:
    """Norm layer callable that remembers every module it made."""

    def __init__(self, factory):
        self.factory, self.made = factory, []

    def __call__(self, num_channels):
        self.made.append(self.factory(num_channels))
        return self.made[-1]


def norm_ids(module):
    return {id(m) for m in module.modules() if isinstance(m, NORM_TYPES)}


def regions(model):
    heads = model.roi_heads
    return {
        "body": model.backbone.body,
        "fpn": model.backbone.fpn,
        "box": heads.box_head,
        "mask": heads.mask_head,
    }


def targets(n_images=2, size=128):
    out = []
    for i in range(n_images):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [50.0 + i, 40.0, 120.0, 110.0]])
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        out.append({"boxes": boxes, "labels": torch.tensor([1, 5 + i]), "masks": masks})
    return out


@pytest.fixture(scope="module")
def bn_model():
    torch.manual_seed(0)
    return build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", **SMALL)


@pytest.mark.parametrize("factory", [nn.BatchNorm2d, lambda c: nn.GroupNorm(32, c)], ids=["bn", "gn"])
def test_every_norm_comes_from_norm_layer(factory):
    norm = RecordingNorm(factory)
    model = build_maskrcnn(11, norm, backbone="resnet18", **SMALL)
    made = {id(m) for m in norm.made}
    counts = {name: len(norm_ids(part)) for name, part in regions(model).items()}
    assert counts == {"body": 20, "fpn": 8, "box": 4, "mask": 4}
    assert norm_ids(model) == made and len(made) == len(norm.made) == sum(counts.values())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert isinstance(model.rpn.head, RPNHead) and not norm_ids(model.rpn)
    assert not norm_ids(model.roi_heads.box_predictor) and not norm_ids(model.roi_heads.mask_predictor)
    fcs = [m for m in model.roi_heads.box_head if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in fcs] == [(256 * 7 * 7, 1024)]
    assert model.roi_heads.box_predictor.cls_score.out_features == 11
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 11
    assert all(p.requires_grad for p in model.parameters())


def test_train_step_updates_every_part(bn_model):
    model = bn_model.train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    losses = model(images, targets())
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    watched = {name: next(part.parameters()) for name, part in regions(model).items()}
    watched["rpn"] = next(model.rpn.parameters())
    before = {name: p.detach().clone() for name, p in watched.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    assert {name for name, p in watched.items() if not torch.equal(p, before[name])} == set(watched)


def test_eval_returns_detections_per_image(bn_model):
    model = bn_model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128), torch.rand(3, 96, 128)])
    assert len(out) == 2
    for det, (h, w) in zip(out, [(128, 128), (96, 128)]):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        n = det["boxes"].shape[0]
        assert 0 < n <= 5
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, h, w)


def test_resnet50_builds_with_paper_placement():
    norm = RecordingNorm(lambda c: nn.GroupNorm(32, c))
    model = build_maskrcnn(81, norm, backbone="resnet50")
    counts = {name: len(norm_ids(part)) for name, part in regions(model).items()}
    assert counts == {"body": 53, "fpn": 8, "box": 4, "mask": 4}
    assert len(norm.made) == 69
    assert model.backbone.fpn.inner_blocks[-1][0].in_channels == 2048
    assert (model.transform.min_size, model.transform.max_size) == ((800,), 1333)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 3}], ids=["flat", "under_model"])
def test_backbone_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=10)
    nn.init.normal_(source.layer4[1].bn2.running_mean)
    path = tmp_path / "r18.pt"
    torch.save(wrap({f"module.{k}": v for k, v in source.state_dict().items()}), path)
    model = build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(path), **SMALL)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, source.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    assert all(p.requires_grad for p in body.parameters())


def test_a_classifier_trained_on_gray_images_gives_the_same_stem_response_to_a_gray_rgb_image(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("resnet18", num_classes=10, in_chans=1)  # as train_imagenet.py on Fashion-MNIST
    path = tmp_path / "gray.pt"
    torch.save({"model": source.state_dict()}, path)
    body = build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(path), **SMALL).backbone.body
    gray = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(body.conv1(gray.expand(-1, 3, -1, -1)), source.conv1(gray))
    assert torch.equal(body.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_a_classifier_with_centralized_weights_loads_its_effective_weights(tmp_path):
    torch.manual_seed(3)
    source = mabn.convert_model(timm.create_model("resnet18", num_classes=10), "mabn", normalization_batch=2)
    path = tmp_path / "mabn.pt"
    torch.save(source.state_dict(), path)  # keys ...conv1.parametrizations.weight.original
    body = build_maskrcnn(
        11, mabn.norm_layer("mabn"), backbone="resnet18", backbone_weights=str(path), **SMALL
    ).backbone.body
    for name in ("conv1", "layer2.0.conv2", "layer4.1.conv1"):
        expected = source.get_submodule(name).weight  # W - mean(W): what the classifier computed with
        torch.testing.assert_close(body.get_submodule(name).weight, expected)
        assert expected.mean(dim=(1, 2, 3)).abs().max() < 1e-6


def test_backbone_weights_extra_keys_warn(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "bn.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.warns(UserWarning, match=r"ignored 60 keys.*running_mean"):
        model = build_maskrcnn(
            11, lambda c: nn.GroupNorm(32, c), backbone="resnet18", backbone_weights=str(path), **SMALL
        )
    assert torch.equal(model.backbone.body.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


def test_backbone_weights_missing_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lacks 1 backbone keys.*layer2\.0\.conv1\.weight"):
        build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(path))


def test_backbone_weights_wrong_architecture(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(path))


class Payload:
    """Stands for anything a pickle could construct (and run code while doing so)."""


def test_backbone_weights_that_are_more_than_tensors_are_refused_with_one_line(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": torchvision.models.resnet18().state_dict(), "extra": Payload()}, path)
    with pytest.raises(
        ConfigError, match=f"{path} holds more than tensors and plain Python values, so it is not loaded"
    ):
        build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(path))


def test_missing_weights_file_names_config_key(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=f"weights={missing}"):
        build_maskrcnn(11, nn.BatchNorm2d, backbone="resnet18", backbone_weights=str(missing))


def test_unknown_backbone_lists_supported():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'.*resnet18.*resnet50"):
        build_maskrcnn(11, nn.BatchNorm2d, backbone="vgg16")
