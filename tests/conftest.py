import os

import pytest
import torch

# The eager kernels unless asked (MABN_FUSED=1): compiling the fused ones costs seconds per new
# shape in every test process. tests/norms/test_fused.py checks the fused kernels against the eager
# ones; the training tests marked below run jobs end to end with them.
os.environ.setdefault("MABN_FUSED", "0")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the slow, paper-scale checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def standalone_layers(monkeypatch):
    """Layers trained on their own, outside any model: nothing around them to wire
    (mabn.norms.wired), so they train as wired ones."""
    from mabn.norms.wired import NeedsWiring

    monkeypatch.setattr(NeedsWiring, "wired", True)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
