"""Test set-up: the Triton interpreter is switched on before any kernel is defined (no GPU here)."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode())
    return torch.Generator().manual_seed(seed)


def triton_device() -> str:
    """Where the Triton path runs in this session: the GPU, or CPU tensors under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
