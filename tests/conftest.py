import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the slow, paper-scale checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
