import os
import sys

import pytest
import torch

# The helpers module lives next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

import qext  # noqa: E402,F401  (registers torch.ops.qext)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
