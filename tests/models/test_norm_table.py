"""One table of norms (``mabn.registry.TABLE``): the lists of the library derive from it, a norm
registered later reaches them, the docs list every norm, and the docs' example of adding one runs."""

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import mabn
from mabn import registry
from mabn.convert import fold_norms
from mabn.probes import norm_layers
from mabn.wiring import conv_norm_pairs, foldable_norms, paired_norms

ROOT = Path(__file__).resolve().parents[2]


def test_every_name_builds_its_declared_layer():
    assert list(registry.NORMS) == list(registry.TABLE)
    for name, entry in registry.TABLE.items():
        assert type(mabn.build_norm(name, 8)) is entry.layer, name


def test_the_lists_derive_from_the_table():
    foldable = {name for name, e in registry.TABLE.items() if e.foldable}
    assert foldable == {"bn", "syncbn", "brn", "mabn", "cbn", "powernorm"}
    assert all(issubclass(registry.TABLE[name].layer, foldable_norms()) for name in foldable)
    assert all(issubclass(e.layer, paired_norms()) for e in registry.TABLE.values())
    assert [name for name, e in registry.TABLE.items() if e.classification_only] == ["mimicnorm"]


@pytest.mark.parametrize("doc", ["docs/layers.md", "docs/index.md", "README.md"])
def test_the_docs_list_every_norm(doc):
    text = (ROOT / doc).read_text()
    missing = [name for name in registry.TABLE if not re.search(rf"`{name}`", text)]
    assert not missing, f"{doc} does not name {missing}"


class RMSBatchNorm2d(nn.Module):
    """The layer of docs/adding_a_norm.md."""

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x):
        rms = x.square().mean(dim=(0, 2, 3), keepdim=True).add(self.eps).rsqrt()
        return x * rms * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "TABLE", dict(registry.TABLE))
    mabn.register_norm("rms_bn", RMSBatchNorm2d, batch_statistics=True)


def test_the_docs_example_of_adding_a_norm_runs(registered):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    layer = mabn.build_norm("rms_bn", 3).double()
    reference = x / (x * x).mean(dim=(0, 2, 3), keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(layer(x), reference)
    dy = torch.randn_like(x)
    (got,) = torch.autograd.grad(layer(x), x, dy)
    (expected,) = torch.autograd.grad(reference, x, dy)
    torch.testing.assert_close(got, expected)


def test_a_registered_norm_reaches_the_pairing_and_the_probe_but_folds_only_if_declared(registered):
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=4), "rms_bn")
    pairs = conv_norm_pairs(model)
    assert len(pairs) == 20 and all(isinstance(norm, RMSBatchNorm2d) for *_, norm in pairs)
    assert len(norm_layers(model)) == 20
    assert not any(isinstance(m, nn.Identity) for m in fold_norms(model.eval()).modules())  # not foldable
