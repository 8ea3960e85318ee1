"""Every test starts from the same random state, whatever ran before it in the process.

Tests that draw from the global RNGs (a model's default initialization, torch.randn without a
generator) would otherwise get other numbers when run alone, in another order, or in a subset
(`make test-cpus`), and pass or fail by that accident.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_rngs():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
