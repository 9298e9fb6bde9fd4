"""Code from outside this repository, loaded from its file: the authors' layers from their own
checkouts, which the benchmarks time and the tests compare with. None of it is part of the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def load_module(path: str | Path, name: str) -> ModuleType:
    """The Python file at ``path`` as a module called ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AuthorsCBN(nn.Module):
    """The authors' ``CBatchNorm2d`` (Howal/Cross-iterationBatchNorm, ``mmdet/models/utils/CBN.py``,
    given as ``layer_class`` from ``load_module``) called as they call it, with the weight of the
    conv that feeds it (``self.conv[0]``, set by the caller); its ``.cuda()`` at construction is a
    no-op off CUDA, and gamma starts at 1 (their ConvModule's init)."""

    def __init__(self, layer_class, channels, **options):
        super().__init__()
        cuda = torch.Tensor.cuda
        if not torch.cuda.is_available():
            torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            self.layer = layer_class(channels, **options)
        finally:
            torch.Tensor.cuda = cuda
        nn.init.ones_(self.layer.weight)
        self.conv = []  # the conv that feeds it, outside the module tree

    def forward(self, x):
        return self.layer(x, self.conv[0].weight)
