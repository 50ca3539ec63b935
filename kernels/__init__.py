"""Triton kernels of titok-fast, one file per fused op, each with a plain-PyTorch ``*_ref`` beside it."""
