"""Test set-up: the Triton interpreter is switched on before any kernel is defined (no GPU here)."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name so failures reproduce. The name is taken as
    tests/<file>::<test>, without the layer folder, so a test keeps its inputs when its file moves between them."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    path, separator, test = node.partition("::")
    seed = zlib.crc32(f"tests/{os.path.basename(path)}{separator}{test}".encode())
    return torch.Generator().manual_seed(seed)
