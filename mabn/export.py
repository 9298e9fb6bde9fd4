"""Deployment: an eval-mode model with any norm, folded where foldable, exported to ONNX with
torch's exporter, checked by ``onnx.checker`` and run in ONNX Runtime against PyTorch.

    python -m mabn.export --model resnet50 --norm mabn --out resnet50_mabn.onnx

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
from torch.nn.utils import parametrize

from .convert import fold_norms
from .wiring import wire_norms

# relative and absolute tolerance of ONNX Runtime's outputs against PyTorch's (fp32)
RTOL, ATOL = 1e-4, 1e-4


class ExportError(ValueError):
    """A model or an export that cannot be deployed, in one line."""


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    op_counts: Counter

    def summary(self) -> str:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(self.op_counts.items()))
        return (
            f"{self.path}: onnx.checker passed; ONNX Runtime vs PyTorch max abs diff {self.max_abs_diff:.2e}; "
            f"ops: {ops}"
        )


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
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
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


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, fold: bool = True) -> ExportResult:
    """Fold (``for_inference``) and export ``model`` to ONNX at ``path``, validate the file and
    compare ONNX Runtime's outputs with the eval-mode PyTorch model's on ``example``."""
    import onnx
    import onnxruntime

    check_exportable(model)
    path = Path(path)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = _flat_outputs(model(example))
        deployed = _bake(model, fold)  # the copy, once its eval-mode outputs are taken
        try:
            torch.onnx.export(deployed, (example,), path, dynamo=True, verbose=False)
        except Exception as error:  # the exporter's messages run to pages: keep the first line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first[:200]}") from None
    exported = onnx.load(path)
    onnx.checker.check_model(exported)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    if len(got) != len(expected):
        raise ExportError(f"the exported model has {len(got)} outputs, PyTorch's {len(expected)}")
    worst = 0.0
    for value, reference in zip(got, expected):
        value = torch.from_numpy(value)
        worst = max(worst, (value - reference).abs().max().item())
        if not torch.allclose(value, reference, rtol=RTOL, atol=ATOL):
            raise ExportError(
                f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.2e} "
                f"(tolerance {ATOL} + {RTOL} x |output|)"
            )
    return ExportResult(path, worst, op_counts(exported))


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
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-fold", action="store_true", help="export the norms as they are")
    parser.add_argument("--out", type=Path, default=None, help="the .onnx file (default: <model>_<norm>.onnx)")
    args = parser.parse_args(argv)
    try:
        model = build_model(args.model, args.norm)
        example = torch.randn(args.batch, 3, args.image_size, args.image_size)
        result = export_onnx(model, example, args.out or Path(f"{args.model}_{args.norm}.onnx"), not args.no_fold)
    except (ExportError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
