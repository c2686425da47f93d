"""Fused Triton kernels: the ``@triton.jit`` kernels and their launchers, one file per kernel
family. The torch.library ops that call the launchers (schemas, fake kernels, autograd) are
registered in :mod:`snnorm.backends.triton_backend`."""
