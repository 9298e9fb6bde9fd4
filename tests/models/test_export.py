"""Export to ONNX: folded models validate and run in ONNX Runtime with PyTorch's outputs; folded
MABN's graph has exactly folded BN's ops; non-foldable norms list their extra ops; a whole
detector is refused in one line."""

import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the deploy extra is not installed (pip install -e '.[deploy]')")

from hydra_configs import ROOT

from mabn.detectors.torchvision_maskrcnn import build_maskrcnn
from mabn.export import ExportError, build_model, export_onnx
from mabn.registry import norm_layer

FOLDABLE = {"bn": {}, "brn": {}, "mabn": {}, "cbn": {"burnin": 0}, "syncbn": {}}


def trained(model, steps=3):
    """A few training steps, so that the folded statistics are not their initial values."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 32, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def plain_network_ops(tmp_path_factory):
    """The op counts of the same network with no norm at all: what a folded one must export to."""
    plain = timm.create_model("resnet10t", num_classes=10, norm_layer=nn.Identity).eval()
    return export_onnx(plain, torch.randn(2, 3, 32, 32), tmp_path_factory.mktemp("plain") / "plain.onnx").op_counts


@pytest.mark.parametrize("norm", sorted(FOLDABLE))
def test_folded_models_export_validate_and_match_pytorch(norm, plain_network_ops, tmp_path):
    model = trained(build_model("resnet10t", norm, num_classes=10, **FOLDABLE[norm]))
    result = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx")
    assert result.max_abs_diff < 1e-4
    assert result.op_counts == plain_network_ops, result.op_counts


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50"])
def test_folded_mabn_graph_has_exactly_folded_bn_ops(model_name, tmp_path):
    example = torch.randn(1, 3, 64, 64)
    counts = {
        norm: export_onnx(build_model(model_name, norm).eval(), example, tmp_path / f"{norm}.onnx").op_counts
        for norm in ("bn", "mabn")
    }
    assert counts["mabn"] == counts["bn"]
    assert counts["bn"]["Conv"] == (20 if model_name == "resnet18" else 53)


@pytest.mark.parametrize(
    "norm,options",
    [
        ("gn", {"num_groups": 8}),
        ("ln", {}),
        ("in", {}),
        ("evonorm_b0", {}),
        ("evonorm_s0", {"groups": 8}),
        ("frn", {}),
        ("gn_ws", {"num_groups": 8}),
    ],
)
def test_unfoldable_norms_export_with_their_extra_ops(norm, options, plain_network_ops, tmp_path):
    result = export_onnx(
        trained(build_model("resnet10t", norm, num_classes=10, **options)),
        torch.randn(2, 3, 32, 32),
        tmp_path / "model.onnx",
    )
    extra = result.op_counts - plain_network_ops  # what folded BN would not have
    assert extra and result.max_abs_diff < 1e-4, (extra, result.op_counts)


def test_maskrcnn_backbone_with_fpn_exports_and_the_whole_detector_is_refused(tmp_path):
    model = build_maskrcnn(
        3, norm_layer("mabn"), "resnet18", min_size=64, max_size=64, channels=32, fc_channels=32
    ).eval()
    with pytest.raises(ExportError, match="export its backbone"):
        export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "detector.onnx")
    result = export_onnx(model.backbone, torch.randn(1, 3, 64, 64), tmp_path / "backbone.onnx")
    assert result.max_abs_diff < 1e-4 and "BatchNormalization" not in result.op_counts


def test_the_command_prints_the_validation_and_refuses_bad_input_in_one_line(tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "mabn.export",
            "--model",
            "resnet10t",
            "--norm",
            "mabn",
            "--image-size",
            "32",
            "--out",
            str(tmp_path / "m.onnx"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "onnx.checker passed" in ok.stdout and "max abs diff" in ok.stdout and "Conv " in ok.stdout
    assert (
        "(any batch, height, width); ONNX Runtime vs PyTorch at 1x3x32x32, 3x3x32x32, 8x3x32x32, 1x3x64x64" in ok.stdout
    )
    bad = subprocess.run(
        [sys.executable, "-m", "mabn.export", "--norm", "mabnx", "--out", str(tmp_path / "x.onnx")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "unknown norm" in bad.stderr


@pytest.mark.parametrize("norm,options", [("mabn", {}), ("gn", {"num_groups": 8})])  # foldable, per-sample
def test_the_file_takes_any_batch_and_image_size_and_each_is_checked(norm, options, tmp_path):
    model = trained(build_model("resnet10t", norm, num_classes=10, **options))
    result = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx")
    assert result.dynamic_axes() == [0, 2, 3] and result.input_shape[1] == 3
    assert result.checked[0] == [2, 3, 32, 32]  # the example first, then every other batch and size
    assert sorted(result.checked) == sorted([b, 3, s, s] for s in (32, 64) for b in (1, 2, 3, 8))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 48, 40)
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(images), rtol=1e-4, atol=1e-4)


def test_static_files_keep_the_examples_shape(tmp_path):
    result = export_onnx(
        build_model("resnet10t", "mabn", num_classes=10).eval(),
        torch.randn(1, 3, 32, 32),
        tmp_path / "model.onnx",
        dynamic=False,
    )
    assert result.input_shape == [1, 3, 32, 32] and result.checked == [[1, 3, 32, 32]] and not result.dynamic_axes()
