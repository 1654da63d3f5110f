from __future__ import annotations

import pytest
import torch
from explain_models import SIZE


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
