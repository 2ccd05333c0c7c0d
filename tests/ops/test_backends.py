"""Backend support: each backend says why it declines inputs; "auto" picks the first that accepts.

CUDA inputs are FakeTensors (shapes and devices without data or a GPU): selection reads only those.
"""
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pykd
from pykd.ops import _backends, attention_relation, mi_bound


def fake_cuda(*shape):
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda")


def test_auto_takes_the_fused_path_of_the_device():
    assert _backends.select_backend("auto", "x", torch.empty(2, 3), _backends.no_limits) == "cpp"
    assert _backends.select_backend("auto", "x", fake_cuda(2, 3), _backends.no_limits) == "triton"


def test_forced_cpp_declines_cuda_tensors_naming_the_argument():
    with pytest.raises(ValueError, match=r"backend='cpp' declined: the C\+\+ kernels take CPU tensors, got s_a on "
                                         r"cuda:0"):
        _backends.select_backend("cpp", "s_a", fake_cuda(2, 3), _backends.no_limits)


def test_forced_triton_declines_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' declined: the Triton kernels take CUDA tensors .* got x "
                                         r"on cpu"):
        pykd.routed_linear(torch.randn(3, 4), torch.randn(2, 5, 4), torch.ones(2) / 2, backend="triton")


def test_forced_triton_declines_relation_heads_beyond_the_kernel():
    t, s = torch.randn(2, 3, 600), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"backend='triton' declined: relation head size 300 of t_a \(shape "
                                         r"\(2, 3, 600\), 2 relation heads\) exceeds the kernel's maximum 256"):
        pykd.attention_relation_loss(t, t, s, s, 2, backend="triton")


def test_forced_triton_declines_wide_mi_embeddings():
    a = torch.randn(4, 300)
    with pytest.raises(ValueError, match=r"backend='triton' declined: embedding width 300 \(a of shape \(4, 300\)\) "
                                         r"exceeds the kernel's maximum 256"):
        pykd.mi_lower_bound(a, a, backend="triton")


def test_auto_falls_back_to_the_reference_and_says_why():
    t, s = fake_cuda(2, 3, 600), fake_cuda(2, 3, 8)
    with pytest.warns(UserWarning, match=r"backend='auto' runs the reference: triton declined: relation head size "
                                         r"300 of t_a"):
        chosen = _backends.select_backend("auto", "s_a", s,
                                          lambda b: attention_relation._kernel_limits(b, t, s, 2))
    assert chosen == "reference"


def test_auto_is_silent_when_only_other_devices_paths_decline():
    a = torch.randn(4, 300)  # on CPU the C++ path takes it; Triton's limit does not matter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.select_backend("auto", "a", a, lambda b: mi_bound._kernel_limits(b, a, 4)) == "cpp"


def test_missing_triton_is_a_reason(monkeypatch):
    monkeypatch.setattr(_backends, "_TRITON_INSTALLED", False)
    with pytest.raises(ValueError, match=r"backend='triton' declined: triton is not installed"):
        _backends.select_backend("triton", "x", fake_cuda(2), _backends.no_limits)
    with pytest.warns(UserWarning, match="triton declined: triton is not installed"):
        assert _backends.select_backend("auto", "x", fake_cuda(2), _backends.no_limits) == "reference"


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpp', 'triton'\), got 'gpu'"):
        _backends.select_backend("gpu", "x", torch.empty(2), _backends.no_limits)
