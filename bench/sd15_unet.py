"""A UNet of Stable Diffusion 1.5's size and shape with random weights, for sampler-overhead measurements.

Latent-diffusion UNet layout (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): base width 320, widths x(1, 2, 4, 4), two residual blocks per level, one cross-attention transformer
block (8 heads, context 768) at the first three levels and in the middle; about 860M parameters.  Only its
cost matters here, so the weights are random (scaled so the activations stay finite).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SD15SizedUNet", "parameter_count"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def timestep_embedding(timestep: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep features (Vaswani et al. 2017), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between, plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention of queries from x to keys/values from context (self-attention when it is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class SpatialTransformer(nn.Module):
    """Project in, self-attention, cross-attention, GEGLU feed-forward, project out (one block)."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.norm = _norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = Attention(channels, channels, heads)
        self.attn2 = Attention(channels, context_dim, heads)
        self.ff_in = nn.Linear(channels, channels * 8)
        self.ff_out = nn.Linear(channels * 4, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        n1 = self.norm1(t)
        t = t + self.attn1(n1, n1)
        t = t + self.attn2(self.norm2(t), context)
        value, gate = self.ff_in(self.norm3(t)).chunk(2, dim=-1)
        t = t + self.ff_out(value * F.gelu(gate))
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class SD15SizedUNet(nn.Module):
    """eps-prediction UNet with SD1.5's widths, depths and attention placement: network(x, timestep, context)."""

    def __init__(self, in_channels: int = 4, base: int = 320, mults=(1, 2, 4, 4), res_blocks: int = 2,
                 attention_levels=(0, 1, 2), context_dim: int = 768, heads: int = 8):
        super().__init__()
        self.base = base
        emb_dim = base * 4
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for level, mult in enumerate(mults):
            for _ in range(res_blocks):
                block = nn.ModuleList([ResBlock(ch, base * mult, emb_dim)])
                ch = base * mult
                if level in attention_levels:
                    block.append(SpatialTransformer(ch, context_dim, heads))
                self.down.append(block)
                skips.append(ch)
            if level != len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim), SpatialTransformer(ch, context_dim, heads),
                                  ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), base * mult, emb_dim)])
                ch = base * mult
                if level in attention_levels:
                    block.append(SpatialTransformer(ch, context_dim, heads))
                if level and i == res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(block)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, pooled=None) -> Tensor:
        emb = self.time_embed(timestep_embedding(timestep, self.base).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.mid, h, emb, context)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
