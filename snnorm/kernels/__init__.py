"""Fused Triton kernels, one file per op: kernels, launchers and torch.library registration."""
