"""Triton kernels: the GPU path of pykd's ops. They take tensors and sizes and know nothing of models."""
