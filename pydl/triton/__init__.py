"""Triton kernels and their host launchers (no autograd here).

Submodules import triton themselves; importing this package imports nothing.
"""
