"""Deployment: an eval-mode model with any norm, folded where foldable, exported to ONNX with
torch's exporter, checked by ``onnx.checker`` and run in ONNX Runtime against PyTorch at several
batch sizes and image sizes.

    python -m mabn.export --model resnet50 --norm mabn --out resnet50_mabn.onnx

The file takes any batch size and, where the model allows it (the ResNets: a global pooling
before the classifier), any height and width; ``--static`` (``dynamic=False``) fixes them at
the example's.

needs the ``deploy`` extra (onnx, onnxruntime, onnxscript; ``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .convert import bake_parametrization, fold_norms
from .wiring import wire_norms

# relative and absolute tolerance of ONNX Runtime's outputs against PyTorch's (fp32)
RTOL, ATOL = 1e-4, 1e-4
# a dynamic file is checked at these batch sizes (and the example's), and at a second image size
CHECKED_BATCHES = (1, 3, 8)
OTHER_SIZE = 32  # pixels added to the example's height and width


class ExportError(ValueError):
    """A model or an export that cannot be deployed, in one line."""


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    op_counts: Counter
    input_shape: list  # per dimension: its size, or its name where the file takes any size
    checked: list  # the input shapes run in ONNX Runtime against PyTorch

    def summary(self) -> str:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(self.op_counts.items()))
        checked = ", ".join("x".join(map(str, shape)) for shape in self.checked)
        return (
            f"{self.path}: onnx.checker passed; input {self.input_shape} ({self.dynamic_text()}); "
            f"ONNX Runtime vs PyTorch at {checked}: max abs diff {self.max_abs_diff:.2e}; ops: {ops}"
        )

    def dynamic_axes(self) -> list[int]:
        """The input's dimensions that take any size."""
        return [axis for axis, size in enumerate(self.input_shape) if isinstance(size, str)]

    def dynamic_text(self) -> str:
        names = {0: "batch", 1: "channels", 2: "height", 3: "width"}
        axes = [names.get(axis, str(axis)) for axis in self.dynamic_axes()]
        return f"any {', '.join(axes)}" if axes else "static"


def for_inference(model: nn.Module, fold: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode with its norms folded into their convs (where foldable:
    BN, BRN, MABN, CBN) and every weight parametrization (centralization, standardization)
    baked into a plain weight."""
    return _bake(copy.deepcopy(model).eval(), fold)


def _bake(model: nn.Module, fold: bool) -> nn.Module:
    """``for_inference`` in place, on an eval-mode model."""
    if fold:
        fold_norms(model)
    for module in model.modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            bake_parametrization(module, name)
    return model


def _flat_outputs(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return [t for value in values for t in _flat_outputs(value)]


def check_exportable(model: nn.Module) -> None:
    """Refuse, in one line, what the exporter cannot take as a whole."""
    if any(hasattr(model, name) for name in ("roi_heads", "rpn", "proposal_generator")):
        raise ExportError(
            f"{type(model).__name__} is a whole detector (data-dependent proposals): export its "
            "backbone, e.g. export_onnx(model.backbone, images)"
        )


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, fold: bool = True, dynamic: bool = True
) -> ExportResult:
    """Fold (``for_inference``) and export ``model`` to ONNX at ``path``, validate the file and
    compare ONNX Runtime's outputs with the eval-mode PyTorch model's: on ``example`` and, for the
    dimensions the file leaves free (``dynamic``: batch, height and width where the model allows
    them), at ``CHECKED_BATCHES`` and a second image size."""
    import onnx
    import onnxruntime

    check_exportable(model)
    path = Path(path)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        references = [(example, _flat_outputs(model(example)))]
        for images in _more_inputs(example) if dynamic else []:
            try:
                references.append((images, _flat_outputs(model(images))))
            except (RuntimeError, ValueError):  # a size the model itself refuses (IN over 1 x 1 maps of one image)
                continue
    deployed = _bake(model, fold)
    # a dimension of size 1 in the example would be fixed at 1: trace a batch of at least 2
    traced = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    shapes = ({axis: torch.export.Dim.AUTO for axis in (0, *range(2, example.dim()))},) if dynamic else None
    with torch.no_grad():
        try:
            torch.onnx.export(deployed, (traced if dynamic else example,), path, dynamo=True, dynamic_shapes=shapes)
        except Exception as error:  # the exporter's messages run to pages: keep the first line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first[:200]}") from None
    exported = onnx.load(path)
    onnx.checker.check_model(exported)
    dims = exported.graph.input[0].type.tensor_type.shape.dim
    input_shape = [dim.dim_param or dim.dim_value for dim in dims]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, checked = 0.0, []
    for images, expected in references:
        if any(isinstance(size, int) and size != n for size, n in zip(input_shape, images.shape)):
            continue  # a size the file fixed
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        if len(got) != len(expected):
            raise ExportError(f"the exported model has {len(got)} outputs, PyTorch's {len(expected)}")
        for value, reference in zip(got, expected):
            value = torch.from_numpy(value)
            worst = max(worst, (value - reference).abs().max().item())
            if not torch.allclose(value, reference, rtol=RTOL, atol=ATOL):
                raise ExportError(
                    f"ONNX Runtime's outputs at input {list(images.shape)} differ from PyTorch's by up to "
                    f"{worst:.2e} (tolerance {ATOL} + {RTOL} x |output|)"
                )
        checked.append(list(images.shape))
    return ExportResult(path, worst, op_counts(exported), input_shape, checked)


def _more_inputs(example: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of the checked batch sizes at the example's image size and at a second one (the
    example's own shape left out)."""
    batches = sorted({example.shape[0], *CHECKED_BATCHES})
    sizes = [tuple(example.shape[2:]), tuple(n + OTHER_SIZE for n in example.shape[2:])]
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, example.shape[1], *size) for size in sizes for batch in batches]
    return [torch.randn(shape, generator=generator, dtype=example.dtype) for shape in shapes if shape != example.shape]


def op_counts(model) -> Counter:
    """Op types of an ONNX graph and how often each occurs (nested functions included)."""
    counts = Counter(node.op_type for node in model.graph.node)
    for function in model.functions:
        counts.update(node.op_type for node in function.node)
    return counts


def build_model(model_name: str, norm: str, num_classes: int = 1000, **options) -> nn.Module:
    """A classifier of the suite (timm name or small_resnet) with ``norm``, wired, its convs centralized
    where the norm asks for it (MABN)."""
    from . import registry
    from .models import build_classifier

    return wire_norms(build_classifier(model_name, num_classes, 3, registry.norm_layer(norm, **options)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="small_resnet or a timm model name")
    parser.add_argument("--norm", default="mabn")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1, help="the example's batch size (the file takes any)")
    parser.add_argument("--no-fold", action="store_true", help="export the norms as they are")
    parser.add_argument("--static", action="store_true", help="fix batch and image size at the example's")
    parser.add_argument("--out", type=Path, default=None, help="the .onnx file (default: <model>_<norm>.onnx)")
    args = parser.parse_args(argv)
    try:
        model = build_model(args.model, args.norm)
        example = torch.randn(args.batch, 3, args.image_size, args.image_size)
        path = args.out or Path(f"{args.model}_{args.norm}.onnx")
        result = export_onnx(model, example, path, not args.no_fold, dynamic=not args.static)
    except (ExportError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
