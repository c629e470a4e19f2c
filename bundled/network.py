"""The bundled model's networks: a word tokenizer, a tiny transformer text encoder and a small conditional UNet.

The UNet follows the latent-diffusion layout (Rombach et al. 2022): residual
blocks modulated by the timestep embedding, and cross-attention from image
tokens to the text encoder's context at every resolution.  It works on
pixels: its core sees 4x4 patches (a patch embedding as in DiT, Peebles & Xie
2023), so a 32x32 input is processed at 8x8, 4x4 and 2x2, and a thin
full-resolution path (one residual block in, one out) restores pixel detail.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Tokenizer", "TextEncoder", "TinyUNet", "NetConfig", "timestep_embedding"]

PAD, UNK = "<pad>", "<unk>"


class Tokenizer:
    """Lower-cased words over a fixed vocabulary; unknown words become ``<unk>``, every prompt is padded to ``max_length``."""

    def __init__(self, vocabulary: Sequence[str], max_length: int = 16, synonyms: Optional[dict] = None):
        self.tokens = [PAD, UNK] + [w for w in vocabulary if w not in (PAD, UNK)]
        self.index = {w: i for i, w in enumerate(self.tokens)}
        self.max_length = int(max_length)
        self.synonyms = dict(synonyms or {})

    def __len__(self) -> int:
        return len(self.tokens)

    def words(self, text: str) -> list:
        """The normalised words of a prompt (letters only, synonyms mapped)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string prompt, got {type(text).__name__}")
        cleaned = "".join(c if c.isalpha() else " " for c in text.lower())
        return [self.synonyms.get(w, w) for w in cleaned.split()]

    def encode(self, text: str) -> list:
        """Token ids, truncated and padded to ``max_length`` (words past it are dropped)."""
        ids = [self.index.get(w, 1) for w in self.words(text)][:self.max_length]
        return ids + [0] * (self.max_length - len(ids))

    def unknown_words(self, text: str) -> list:
        """The words of ``text`` outside the vocabulary (they are encoded as ``<unk>``)."""
        return [w for w in self.words(text) if w not in self.index]

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)


@dataclass
class NetConfig:
    """Hyper-parameters of the text encoder and the UNet (stored with the weights)."""

    vocab_size: int = 38
    max_length: int = 16
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    in_channels: int = 3
    patch: int = 2
    channels: Sequence[int] = field(default_factory=lambda: (64, 96, 128))
    emb_dim: int = 256
    heads: int = 4
    fine_channels: int = 16          # the full-resolution path around the patched core
    layout_size: int = 8             # side of the learned layout map (the core's grid at the training size)
    aux_mask: bool = True            # an extra output channel trained to predict the objects' mask (training only)
    prediction: str = "eps"          # the raw output: "eps" (SD's discrete schedule) or "flow" (velocity)
    timesteps: int = 1000            # eps: the discrete schedule the timestep indexes
    linear_start: float = 0.00085
    linear_end: float = 0.012
    sigma_data: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        cfg = cls(**known)
        cfg.channels = tuple(int(c) for c in cfg.channels)
        return cfg


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class _Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when context is None)."""

    def __init__(self, dim: int, context_dim: Optional[int], heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, None, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token embeddings plus a small pre-norm transformer: token ids [B, L] -> context [B, L, dim]."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.text_dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([_TextBlock(cfg.text_dim, cfg.text_heads) for _ in range(cfg.text_layers)])
        self.norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, :tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _with_coords(x: Tensor) -> Tensor:
    """x with two channels holding each pixel's x and y position, from -1 (left/top) to 1 (right/bottom)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, dtype=x.dtype, device=x.device)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return torch.cat([x, grid.unsqueeze(0).expand(b, -1, -1, -1)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch // 4) if ch >= 16 else 1, ch)


class _ResBlock(nn.Module):
    """Conv residual block with the embedding applied as a GroupNorm scale and shift (Dhariwal & Nichol 2021)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class _AttnBlock(nn.Module):
    """Self-attention (optional) then cross-attention to the text context, on the feature map's pixels."""

    def __init__(self, ch: int, context_dim: int, heads: int, self_attn: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(ch) if self_attn else None
        self.self_attn = _Attention(ch, None, heads) if self_attn else None
        self.norm_cross = nn.LayerNorm(ch)
        self.cross = _Attention(ch, context_dim, heads)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if self.self_attn is not None:
            t = t + self.self_attn(self.norm_self(t))
        t = t + self.cross(self.norm_cross(t), context)
        return t.transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(nn.Module):
    """A small text-conditional UNet: ``forward(x, timestep, context, pooled=None)`` -> raw prediction shaped like x.

    The raw prediction is eps (``prediction="eps"``: x is SD's scaled input
    x0 + sigma n over sqrt(1 + sigma^2), timestep the schedule index) or the
    flow velocity n - x0 (``"flow"``: x = (1 - sigma) x0 + sigma n, timestep
    1000 sigma).  Inside, the UNet body F is preconditioned as in EDM (Karras
    et al. 2022): the denoised estimate is c_skip x + c_out F(c_in x), which
    is then rewritten exactly as eps or velocity.  For eps this is the
    v-parameterisation (Salimans & Ho 2022); it makes the identity path at low
    noise free, which a network this small would otherwise need long training
    to learn.  The mean of the context over tokens joins the timestep
    embedding, a global conditioning signal (as SDXL's pooled text embedding).

    Two additions make shapes learnable in minutes on a CPU: coordinate input
    channels (CoordConv) and an auxiliary output channel trained to predict
    the clean objects' mask (``return_aux``; multi-task supervision from the
    renderer's ground truth).  Without the latter, the few pixels in which a
    square and a circle differ carry too little of the loss for a short run to
    learn them; the mask target is colour-free, so shape is learned as early
    as colour.  Sampling never uses the auxiliary channel.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        c = list(cfg.channels)
        e, ctx, heads = cfg.emb_dim, cfg.text_dim, cfg.heads
        self.time_mlp = nn.Sequential(nn.Linear(c[0], e), nn.SiLU(), nn.Linear(e, e))
        self.text_mlp = nn.Sequential(nn.Linear(ctx, e), nn.SiLU(), nn.Linear(e, e))
        # + 2 coordinate channels (CoordConv, Liu et al. 2018): absolute position ("on the left") is then free
        self.patch_in = nn.Conv2d(cfg.in_channels * cfg.patch ** 2 + 2, c[0], 3, padding=1)
        # a layout map straight from the embedding (as DCGAN's projection of z, Radford et al. 2016): each grid cell
        # has its own weights, so "a square on the left" gets its corners without a deep convolutional detour
        ls = cfg.layout_size
        self.layout = nn.Linear(e, c[0] * ls * ls) if ls else None
        self.down_res = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, ch in enumerate(c):
            cin = c[max(i - 1, 0)]
            self.down_res.append(_ResBlock(cin, ch, e))
            self.down_attn.append(_AttnBlock(ch, ctx, heads, self_attn=i == len(c) - 1))
            if i < len(c) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid_res1 = _ResBlock(c[-1], c[-1], e)
        self.mid_attn = _AttnBlock(c[-1], ctx, heads, self_attn=True)
        self.mid_res2 = _ResBlock(c[-1], c[-1], e)
        self.up_res = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for i in reversed(range(len(c))):
            cin = (c[i + 1] if i + 1 < len(c) else c[-1]) + c[i]
            self.up_res.append(_ResBlock(cin, c[i], e))
            self.up_attn.append(_AttnBlock(c[i], ctx, heads, self_attn=i == len(c) - 1))
        if cfg.prediction not in ("eps", "flow"):
            raise ValueError(f"prediction: must be 'eps' or 'flow', got {cfg.prediction!r}")
        betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("log_sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().float(),
                             persistent=False)
        fc = cfg.fine_channels
        self.norm_out = _norm(c[0])
        out_channels = cfg.in_channels + int(cfg.aux_mask)
        self.conv_out = nn.Conv2d(c[0], (fc or out_channels) * cfg.patch ** 2, 3, padding=1)
        last = self.conv_out
        if fc:
            # full-resolution path: pixel-exact detail (what denoising at low noise needs) that the patched core lacks
            self.fine_in = nn.Conv2d(cfg.in_channels + 2, fc, 3, padding=1)
            self.fine_res1 = _ResBlock(fc, fc, e)
            self.fine_res2 = _ResBlock(2 * fc, fc, e)
            self.fine_norm = _norm(fc)
            self.fine_out = last = nn.Conv2d(fc, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @property
    def context_dim(self) -> int:
        """The width of the conditioning (text encoder output) this network reads."""
        return self.cfg.text_dim

    @property
    def size_multiple(self) -> int:
        """Latent heights and widths must be multiples of this (the patch times the downsamplings)."""
        return self.cfg.patch * 2 ** (len(self.cfg.channels) - 1)

    def forward(self, x: Tensor, timestep: Tensor, context: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None, return_aux: bool = False):
        cfg = self.cfg
        b, _, height, width = x.shape
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"latent: height and width must be multiples of {multiple} pixels, got "
                             f"{height}x{width}; use a width and height that are multiples of {multiple}")
        if context is None:
            raise ValueError("context: the bundled model needs text conditioning; encode a prompt (it may be empty)")
        if timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(b)
        emb = self.time_mlp(timestep_embedding(timestep, cfg.channels[0]).to(x.dtype))
        emb = emb + self.text_mlp(context.mean(dim=1))
        sd = cfg.sigma_data
        if cfg.prediction == "eps":
            # x = x_ve / sqrt(1 + s^2) with x_ve = x0 + s n; denoised = c_skip x_ve + c_out F(c_in x_ve), so
            # eps = (x_ve - denoised) / s = x_ve s / (s^2 + sd^2) - sd F / sqrt(s^2 + sd^2)
            t = timestep.float().clamp(0, len(self.log_sigmas) - 1)
            lo, hi = t.floor().long(), t.ceil().long()
            s = torch.lerp(self.log_sigmas[lo], self.log_sigmas[hi], t - lo).exp().view(-1, 1, 1, 1).to(x.dtype)
            x_ve = x * (1 + s * s).sqrt()
            body, aux = self._split(self._body(x_ve / (s * s + sd * sd).sqrt(), emb, context))
            out = x_ve * s / (s * s + sd * sd) - sd * body / (s * s + sd * sd).sqrt()
            return (out, aux) if return_aux else out
        # flow: with a = s^2 + sd^2 (1 - s)^2, denoised = sd^2 (1 - s) x / a + s sd F(x / sqrt(a)) / sqrt(a),
        # so the velocity (x - denoised) / s = x (s - sd^2 (1 - s)) / a - sd F / sqrt(a), finite at s = 0 and 1
        s = (timestep.float() / 1000.0).clamp(0, 1).view(-1, 1, 1, 1).to(x.dtype)
        a = s * s + sd * sd * (1 - s) ** 2
        body, aux = self._split(self._body(x / a.sqrt(), emb, context))
        out = x * (s - sd * sd * (1 - s)) / a - sd * body / a.sqrt()
        return (out, aux) if return_aux else out

    def _split(self, body: Tensor) -> tuple:
        """(the prediction's channels, the auxiliary mask channel or None)."""
        n = self.cfg.in_channels
        return body[:, :n], (body[:, n:] if self.cfg.aux_mask else None)

    def _body(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        """The UNet proper, F(c_in x)."""
        cfg = self.cfg
        fine = self.fine_res1(self.fine_in(_with_coords(x)), emb) if cfg.fine_channels else None
        h = self.patch_in(_with_coords(F.pixel_unshuffle(x, cfg.patch)))
        if self.layout is not None:
            ls = cfg.layout_size
            layout = self.layout(F.silu(emb)).view(-1, h.shape[1], ls, ls)
            if layout.shape[-2:] != h.shape[-2:]:
                layout = F.interpolate(layout, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = h + layout
        skips = []
        for i, (res, attn) in enumerate(zip(self.down_res, self.down_attn)):
            h = attn(res(h, emb), context)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)
        for res, attn in zip(self.up_res, self.up_attn):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = attn(res(torch.cat([h, skip], dim=1), emb), context)
        coarse = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), cfg.patch)
        if fine is None:
            return coarse
        fine = self.fine_res2(torch.cat([coarse, fine], dim=1), emb)
        return self.fine_out(F.silu(self.fine_norm(fine)))


class TinyAutoencoder(nn.Module):
    """A small convolutional autoencoder: image [B, 3, H, W] in -1..1 <-> latent [B, C, H/8, W/8].

    Deterministic (no KL term); it is trained with Gaussian noise on the
    latent and a small L2 pull towards zero, so that the decoder is smooth
    around the codes the diffusion model samples (cf. Rombach et al. 2022).
    """

    def __init__(self, latent_channels: int = 8, widths: Sequence[int] = (24, 48, 64, 96)):
        super().__init__()
        w = list(widths)
        self.latent_channels = latent_channels
        enc = [nn.Conv2d(3 + 2, w[0], 3, padding=1), nn.SiLU()]
        for cin, cout in zip(w[:-1], w[1:]):
            enc += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                    nn.SiLU()]
        enc += [nn.Conv2d(w[-1], latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        self.dec_in = nn.Conv2d(latent_channels + 2, w[-1], 3, padding=1)
        dec = [nn.SiLU(), nn.Conv2d(w[-1], w[-1], 3, padding=1), nn.SiLU()]
        for cin, cout in zip(w[::-1][:-1], w[::-1][1:]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU()]
        dec += [nn.Conv2d(w[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.downscale = 2 ** (len(w) - 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(_with_coords(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.dec_in(_with_coords(z)))
