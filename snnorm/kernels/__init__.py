"""Fused Triton kernels: the ``@triton.jit`` kernels and their launchers, one file per kernel
family — ``lif`` (LIF and MPBN with constant statistics), ``mpbn_lif_train`` (MPBN-LIF with
batch statistics), ``bn_pipeline`` (the statistics pipeline of BN/tdBN, BNTT, TEBN and TAB:
its kernels in ``bn_pipeline/_kernels.py``) and ``norm_lif`` (a pipeline norm fused with a
LIF neuron). They share one kitchen: ``_device`` (every device function and named mode) and
``_common`` (host side: device checks, views, the argument checks, the warp rule and the
grids). The torch.library ops that call the launchers (schemas, fake kernels, autograd) are
registered in :mod:`snnorm.backends.triton_backend`."""
