"""model.py — the video backbones, with no action code in them.

A backbone maps a clip to a clip and exposes three things that `adapter.py` attaches to:

    backbone.embed               the module that turns inputs into tokens      (input-level conditioning)
    backbone.blocks[l].ffn_norm  the norm in front of block l's feed-forward   (the DWS adapter, method.md §1)
    backbone.token_frames        (L,) long: the frame each of the current L tokens belongs to

The video DiT (diffusion transformer), trained by flow matching. For a clip of T frames of
S x S pixels cut into P x P patches there are N = (S/P)^2 tokens per frame, laid out frame by frame:

    token:   0 .. N-1  |  N .. 2N-1  |  ...  |  (T-1)N .. TN-1
    frame:       0     |      1      |  ...  |       T-1
    attends to: frames <= its own (full attention inside a frame, causal across frames)

Every frame i has its own noise level tau_i (0 = clean, 1 = pure noise), so context frames stay
clean while later frames are denoised, one at a time or all together. The tokens of frame i are
cut from its noisy pixels stacked, channel-wise, on the pixels of frame i-1 as the model sees
them (zeros for i = 0): a causal space-time patch that makes "copy what did not move" nearly
free (method.md §5). The timestep enters by adaLN-Zero, one modulation per frame.

The DiT predicts each frame's clean pixels (loss.py explains why), as a change to the frame before:
x0_hat_i = x_{i-1} + head(tokens of frame i). The head is zero-initialised, so an untrained DiT
predicts "nothing moves" and training only has to learn what changes.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# device and precision, chosen in one place

def pick_device(name="auto"):
    """-> (device, autocast dtype or None, why). CUDA if there, else CPU; bf16 autocast only where supported."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from data import UserError
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return dev, torch.bfloat16, f"{torch.cuda.get_device_name(dev)}: bf16 autocast"
    cores = f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else ""
    return dev, None, f"{name}{cores}: float32" + (", no CUDA GPU found" if dev.type == "cpu" else "")


# ----------------------------------------------------------------------------------------------
# the video DiT

@dataclass
class DiTConfig:
    size: int = 32          # frames are size x size pixels
    channels: int = 3
    patch: int = 4          # tokens per frame: (size / patch)^2
    clip_len: int = 3       # longest clip the model sees at once (context + frames being denoised)
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    margin: int = 4         # each patch token also sees this many pixels around its patch (overlapping patches)


def per_token(c, token_frames):
    """Broadcast per-frame vectors to tokens: c (B, T, K), token_frames (L,) -> (B, L, K).
    (index_select: its backward is several times faster on a CPU than c[:, token_frames].)"""
    return torch.index_select(c, 1, token_frames)


def timestep_embedding(t, dim):
    """Sinusoidal features of a noise level t in [0, 1]: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    a = 1000 * t.float()[..., None] * freqs
    return torch.cat([a.cos(), a.sin()], -1)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


def mlp(width, ratio):
    return nn.Sequential(nn.Linear(width, int(width * ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(width * ratio), width))


class PatchEmbed(nn.Module):
    """Causal space-time patches: frame i's noisy pixels stacked on frame i-1's, cut into P x P patches, each
    seen with `margin` pixels of its surroundings (a strided convolution). With the margin an object that moves
    into a patch is already visible to that patch's token, so learning a move needs no attention first."""

    def __init__(self, channels, patch, margin, width):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, width, patch + 2 * margin, stride=patch, padding=margin)

    def forward(self, x, prev):
        # x, prev (B, T, C, S, S) -> tokens (B, T*N, D), frame by frame, row-major inside a frame
        B, T = x.shape[:2]
        h = self.conv(torch.cat([x, prev], 2).flatten(0, 1))                # (B*T, D, G, G)
        return h.flatten(2).transpose(1, 2).reshape(B, -1, h.shape[1])


class DiTBlock(nn.Module):
    """x <- x + g1 * Attn(mod(LN(x)));  x <- x + g2 * FFN(mod(ffn_norm(x))), (shift, scale, gate) per frame from tau."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.ffn_norm = nn.LayerNorm(width, elementwise_affine=False)   # the adapter hooks this
        self.ffn = mlp(width, mlp_ratio)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight); nn.init.zeros_(self.ada.bias)  # adaLN-Zero: the block starts as the identity

    def forward(self, x, c, frames, mask):
        # x (B, L, D); c (B, T, D) each frame's noise-level embedding; frames (L,) each token's frame
        sh1, sc1, g1, sh2, sc2, g2 = per_token(self.ada(F.silu(c)), frames).chunk(6, -1)   # 6 x (B, L, D)
        x = x + g1 * self.attn(self.attn_norm(x) * (1 + sc1) + sh1, mask)
        return x + g2 * self.ffn(self.ffn_norm(x) * (1 + sc2) + sh2)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.size % cfg.patch:
            raise ValueError(f"frame size {cfg.size} is not a multiple of patch {cfg.patch}")
        self.cfg = cfg
        self.grid = cfg.size // cfg.patch
        self.n_tok = self.grid ** 2
        D = cfg.width
        self.embed = PatchEmbed(cfg.channels, cfg.patch, cfg.margin, D)
        self.pos_space = nn.Parameter(torch.randn(self.n_tok, D) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(cfg.clip_len, D) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.out_ada = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, cfg.channels * cfg.patch ** 2)
        for m in (self.out_ada, self.out):
            nn.init.zeros_(m.weight); nn.init.zeros_(m.bias)
        self.token_frames = None

    def unpatchify(self, y, T):
        # (B, T*N, C*P*P) -> (B, T, C, S, S)
        B = y.shape[0]
        C, P, G = self.cfg.channels, self.cfg.patch, self.grid
        y = y.reshape(B, T, G, G, C, P, P).permute(0, 1, 4, 2, 5, 3, 6)       # (B, T, C, G, P, G, P)
        return y.reshape(B, T, C, G * P, G * P)

    def forward(self, x, tau):
        """x (B, T, C, S, S) noisy frames in [-1, 1]; tau (B, T) their noise levels -> clean frames (B, T, C, S, S)."""
        B, T, C, S, _ = x.shape
        if T > self.cfg.clip_len or S != self.cfg.size or C != self.cfg.channels:
            raise ValueError(f"DiT expects clips (B, <={self.cfg.clip_len}, {self.cfg.channels}, {self.cfg.size}, "
                             f"{self.cfg.size}); got {tuple(x.shape)}")
        frames = torch.arange(T, device=x.device).repeat_interleave(self.n_tok)   # (L,)
        self.token_frames = frames                                           # set first: hooks on embed read it
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)          # frame i-1 beside frame i
        h = self.embed(x, prev)                                              # (B, L, D), L = T*N
        h = h + self.pos_space.repeat(T, 1) + self.pos_time.index_select(0, frames)
        c = self.t_embed(timestep_embedding(tau, self.cfg.width))            # (B, T, D)
        mask = frames[:, None] >= frames[None, :]                            # (L, L) causal across frames
        for blk in self.blocks:
            h = blk(h, c, frames, mask)
        sh, sc = per_token(self.out_ada(F.silu(c)), frames).chunk(2, -1)
        return prev + self.unpatchify(self.out(self.out_norm(h) * (1 + sc) + sh), T)


BACKBONES = {"dit": (DiT, DiTConfig)}


def flops_per_token(cfg, n_ctx_tokens):
    """Rough forward FLOPs per token (matmuls only), for the MFU estimate: 2 * params-in-blocks + attention."""
    D = cfg.width
    per_block = 2 * (4 * D * D + 2 * cfg.mlp_ratio * D * D + 6 * D * D) + 4 * n_ctx_tokens * D
    return cfg.depth * per_block
