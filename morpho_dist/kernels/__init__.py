"""Triton kernels and their launchers: no autograd, no torch.distributed, no logging."""
