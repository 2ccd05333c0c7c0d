"""Kernels, custom ops and their references."""
