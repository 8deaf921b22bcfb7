"""Autograd ops: each dispatches to its csrc kernel on CUDA and to its PyTorch reference otherwise."""
