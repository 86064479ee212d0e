"""Shared test settings: deterministic seeds, and the CUDA marker's skip."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state (tests that draw inputs use
    their own seeded generators too)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
