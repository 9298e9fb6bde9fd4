"""MimicNorm: the model the authors build (residual scalars, no norm in the body, one norm on the
logits, centred convs), by name through train_imagenet.py, refused by train_coco.py; and equal to
the authors' ResNet-18 where their code is given (``MIMICNORM_SOURCE=<checkout of github
Kid-key/MimicNorm>/ImageNet/models/resnet_nobn.py``, outside this repository)."""

import subprocess
import sys

import pytest
import torch
import torchvision
from authors_code import authors_module
from hydra_configs import ROOT, compose_config
from torch import nn

import mabn
from mabn.engine.classification import ClassificationRun
from mabn.mimicnorm import ChannelBias, LogitNorm, Scale, center_weights_, mimic, residual_blocks
from mabn.norms.batch_norm import BatchNorm2d


def centred(conv):
    return conv.weight.mean(dim=(1, 2, 3)).abs().max().item() < 1e-6


@pytest.mark.parametrize("builder,power", [(torchvision.models.resnet18, 2), (torchvision.models.resnet50, 3)])
def test_the_model_has_the_authors_scalars_no_norm_in_its_body_and_one_on_the_logits(builder, power):
    model = mimic(builder(num_classes=10, norm_layer=ChannelBias), 10, normalization_batch=2)
    blocks = residual_blocks(model)
    assert len(blocks) == (8 if power == 2 else 16)
    for index, block in enumerate(blocks, start=1):
        last = block.bn3 if power == 3 else block.bn2
        assert isinstance(last[1], Scale) and last[1].scale.item() == pytest.approx(1.2**power / index)
        if block.downsample is not None:
            assert isinstance(block.downsample[-1], Scale) and block.downsample[-1].scale.item() == pytest.approx(1.2)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchNorm2d, nn.GroupNorm))]
    assert norms == [model.fc[1].norm] and isinstance(model.fc[1], LogitNorm)
    assert model.fc[1].norm.normalization_batch == 2 and not model.fc[1].norm.weight.requires_grad
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(centred(conv) for conv in convs)  # every fan-in > 50 here, the 7x7x3 stem included


def test_the_study_models_stem_is_not_centred_and_the_rest_stays_centred_after_each_step(tmp_path):
    cfg = compose_config(
        "train_imagenet", ["data=synthetic", "workers=0", "per_device_batch=8", "norm=mimicnorm", "batch=4"]
    )
    run = ClassificationRun(cfg, tmp_path)
    model, x = run.model, torch.randn(8, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    for _ in range(3):
        run.optimizer.zero_grad()
        logits = model(x)
        nn.functional.cross_entropy(logits, torch.randint(0, logits.shape[1], (8,))).backward()
        run.optimizer.step()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = [c for c in convs if c.weight[0].numel() > 50]
    assert big and all(centred(c) for c in big)
    assert not all(centred(c) for c in convs if c.weight[0].numel() <= 50)  # 3x3x3 stem: free, as their CIFAR rule


def test_train_imagenet_trains_mimicnorm_and_train_coco_refuses_it_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train_coco.py", "norm=mimicnorm", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "norm=mimicnorm is a classification method" in result.stderr and "train_imagenet.py" in result.stderr


def authors_resnet18():
    return authors_module("MIMICNORM_SOURCE", "ImageNet/models/resnet_nobn.py").resnet18_cbn(num_classes=10)


def test_mimicnorm_equals_the_authors_resnet18():
    """Their scalars' initial values, then, with their weights copied in (their conv biases into our
    per-channel biases), the same logits and the same gradients, in float64."""
    torch.manual_seed(0)
    theirs = authors_resnet18().double()
    ours = mimic(torchvision.models.resnet18(num_classes=10, norm_layer=ChannelBias), 10).double()
    their_scales = [m.scale.item() for m in theirs.modules() if type(m).__name__ == "MyScaleLayer"]
    assert their_scales == pytest.approx([m.scale.item() for m in ours.modules() if isinstance(m, Scale)])
    their_params = [p for name, p in theirs.named_parameters()]
    our_params = [p for name, p in ours.named_parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in their_params] == [tuple(p.shape) for p in our_params]
    with torch.no_grad():
        for a, b in zip(our_params, their_params):
            a.copy_(b)
    x = torch.randn(4, 3, 224, 224, dtype=torch.float64)
    outputs = [model(x) for model in (ours, theirs)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    for out in outputs:
        out.square().sum().backward()
    for a, b in zip(our_params, their_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    center_weights_(theirs)  # their meanweigh, on their model: our rule keeps every conv of it
    assert all(centred(m) for m in theirs.modules() if isinstance(m, nn.Conv2d))


def test_mimicnorm_by_name():
    assert isinstance(mabn.build_norm("mimicnorm", 8), ChannelBias)
