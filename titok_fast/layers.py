"""Parameter layout shared by the oracle and the lean model: module names match upstream exactly.

Only structure lives here; the forward passes are in ``reference.py`` (plain, per video) and ``model.py``
(packed). Keys produced for V1: ``encoder.model_layers.attn_layer.{i}.to_qkv.weight`` and so on (DESIGN.md section 2).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import HEAD_DIM, StackSize, TiTokConfig


class GatedGelu(nn.Module):
    """``a * gelu(g)`` where ``a, g`` are the first and second halves of the last dimension (exact erf GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = x.chunk(2, dim=-1)
        return a * nn.functional.gelu(g)


class Attention(nn.Module):
    def __init__(self, size: StackSize):
        super().__init__()
        width = size.width
        self.q_heads, self.kv_heads = size.q_heads, size.kv_heads
        self.dim, self.head_dim, self.gqa_dim = width, HEAD_DIM, HEAD_DIM * size.kv_heads  # upstream's names
        self.pre_ln = nn.LayerNorm(width)
        self.to_qkv = nn.Linear(width, (size.q_heads + 2 * size.kv_heads) * HEAD_DIM, bias=False)
        self.q_norm = nn.LayerNorm(HEAD_DIM)
        self.k_norm = nn.LayerNorm(HEAD_DIM)
        self.out_proj = nn.Linear(width, width, bias=False)


def feed_forward(size: StackSize) -> nn.Sequential:
    inner = size.ffn_inner
    return nn.Sequential(
        nn.LayerNorm(size.width),
        nn.Linear(size.width, 2 * inner, bias=False),
        GatedGelu(),
        nn.Dropout(0.0),
        nn.Linear(inner, size.width, bias=False),
    )


class Layers(nn.Module):
    def __init__(self, size: StackSize):
        super().__init__()
        self.num_layer = size.layers
        self.attn_layer = nn.ModuleList(Attention(size) for _ in range(size.layers))
        self.ffd_layer = nn.ModuleList(feed_forward(size) for _ in range(size.layers))


def _upstream_sizes(module: nn.Module, config: TiTokConfig, size: StackSize) -> None:
    """The plain attributes upstream's encoder and decoder have (``width``, ``heads`` as [q, kv], ...)."""
    module.patch_size, module.token_size = config.patch_size, len(config.fsq_levels)
    module.width, module.num_layers, module.heads = size.width, size.layers, [size.q_heads, size.kv_heads]


class EncoderParams(nn.Module):
    def __init__(self, config: TiTokConfig):
        super().__init__()
        size = config.encoder
        self.size = size
        _upstream_sizes(self, config, size)
        self.in_channels = 3
        self.mask_token = nn.Parameter(torch.randn(1, size.width) * size.width**-0.5)
        self.proj_in = nn.Linear(config.patch_dim, size.width)
        self.model_layers = Layers(size)
        self.ln_post = nn.LayerNorm(size.width)
        self.proj_out = nn.Linear(size.width, len(config.fsq_levels))


class DecoderParams(nn.Module):
    def __init__(self, config: TiTokConfig):
        super().__init__()
        size = config.decoder
        self.size = size
        _upstream_sizes(self, config, size)
        self.out_channels = 3
        self.mask_token = nn.Parameter(torch.randn(1, size.width) * size.width**-0.5)
        self.proj_in = nn.Linear(len(config.fsq_levels), size.width)
        self.ln_pre = nn.LayerNorm(size.width)
        self.model_layers = Layers(size)
        self.proj_out = nn.Linear(size.width, config.patch_dim)


def perturb_norms(module: nn.Module, scale: float = 0.3, sharpen: float = 3.0) -> None:
    """Make random weights exercise everything, for tests, benchmarks and demos.

    Every LayerNorm gets a random, non-trivial affine, and the q/k norm gains are multiplied by ``sharpen``:
    with the flat attention of random weights every latent token would emit one of a handful of codes.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + scale * torch.randn(m.weight.shape))
                m.bias.copy_(scale * torch.randn(m.bias.shape))
            if isinstance(m, Attention):
                m.q_norm.weight.mul_(sharpen)
                m.k_norm.weight.mul_(sharpen)
