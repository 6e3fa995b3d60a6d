"""model.py — the video backbones, with no action code in them.

A backbone maps a clip to a clip and exposes three things that `adapter.py` attaches to:

    backbone.embed               the module that turns inputs into tokens      (input-level conditioning)
    backbone.blocks[l].ffn_norm  the norm in front of block l's feed-forward   (the DWS adapter, adapter.py)
    backbone.token_frames        (L,) long: the frame each of the current L tokens belongs to (in the DiT's
                                 final block, asked for its last frames only, the tokens it outputs: what a hook
                                 on or after the attention's output sees)

Two backbones, as different as the paper's (a diffusion model and a token model): the video DiT below, trained by flow matching,
and the video GPT further down (a per-frame VQ tokenizer and an autoregressive transformer over its codes),
trained by next-code cross-entropy. adapter.py drives both through the same three attachment points.

The video DiT (diffusion transformer), trained by flow matching. For a clip of T frames of
S x S pixels cut into P x P patches there are N = (S/P)^2 tokens per frame, laid out frame by frame:

    token:   0 .. N-1  |  N .. 2N-1  |  ...  |  (T-1)N .. TN-1
    frame:       0     |      1      |  ...  |       T-1
    attends to: frames <= its own (full attention inside a frame, causal across frames)

Every frame i has its own noise level tau_i (0 = clean, 1 = pure noise), so context frames stay
clean while later frames are denoised, one at a time or all together. The tokens of frame i are
cut from its noisy pixels stacked, channel-wise, on the pixels of frame i-1 as the model sees
them (zeros for i = 0): a causal space-time patch that makes "copy what did not move" nearly
free (our CPU calibration runs). The timestep enters by adaLN-Zero, one modulation per frame.

The DiT predicts each frame's clean pixels (loss.py explains why), as a change to the frame before:
x0_hat_i = x_{i-1} + head(tokens of frame i). The head is zero-initialised, so an untrained DiT
predicts "nothing moves" and training only has to learn what changes.
"""
import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# device and precision, chosen in one place

def pick_device(name="auto"):
    """-> (device, autocast dtype or None, why). CUDA if there, else CPU; bf16 autocast only where supported."""
    from envs import UserError
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return dev, torch.bfloat16, f"{torch.cuda.get_device_name(dev)}: bf16 autocast"
    if dev.type == "cpu":     # flush subnormal floats to zero: tiny gradients (GELU tails, Adam's second moments)
        import numpy          # otherwise slow CPU math; measured: the pusher tokenizer 149 -> 75 ms/iter
        numpy.finfo(numpy.float64), numpy.finfo(numpy.float32)   # (numpy reads its float limits before, not after)
        torch.set_flush_denormal(True)
    cores = f" ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})" if dev.type == "cpu" else ""
    return dev, None, f"{name}{cores}: float32" + (", no CUDA GPU found" if dev.type == "cpu" else "")


@contextlib.contextmanager
def seeded(seed):
    """Build modules from their own seed, leaving the global random stream as it was (nothing reseeds it mid-run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_generator(device, seed):
    """The random generator of one run, on the device whose tensors it draws: a CPU generator cannot feed a CUDA
    draw, and a generator of its own keeps one run's stream apart from every other's (and from the global one)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def compiled(module, graphs=False):
    """torch.compile for inference, sharing the module's weights: at any batch size (dynamic shapes), or with graphs
    (CUDA only) each shape's kernels recorded once as a CUDA graph and replayed (mode reduce-overhead), for calls whose
    shapes repeat and whose kernels take less time to run than to launch. Where the compiler cannot run (inductor on
    a CPU needs a C++ compiler), dynamo falls back to running the module as is."""
    torch._dynamo.config.suppress_errors = True
    return torch.compile(module, mode="reduce-overhead") if graphs else torch.compile(module, dynamic=True)


# the dense bf16 peak of the GPUs we know, in FLOP/s (vendor data sheets, without sparsity); MFU is printed only
# for these. A name matches an entry word for word ('L4' is not 'L40S'), the first entry that matches wins.
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                 "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def gpu_peak(name):
    """-> (FLOP/s, name of the table entry) for a GPU's name as CUDA reports it, or (None, why not)."""
    for key, peak in GPU_PEAK_BF16.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return peak, f"{key} dense bf16 {peak / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for '{name}'"


def peak_flops(device):
    """-> (FLOP/s, name of the table entry) for the device's dense bf16 peak, or (None, why not)."""
    if torch.device(device).type != "cuda":
        return None, "no peak table for CPUs: bench.py measures one"
    return gpu_peak(torch.cuda.get_device_name(device))


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
    """Broadcast per-frame vectors to tokens: c (B, T, K), token_frames (L,) -> (B, L, K), whatever the backbone's
    token layout (the adapter's broadcast). (index_select: its backward is several times faster on a CPU than
    c[:, token_frames].)"""
    return torch.index_select(c, 1, token_frames)


def per_frame(x, N, scale, shift=None):
    """x * scale + shift, one (scale, shift) per frame: x (B, n*N, D) the tokens of n frames laid out frame by frame,
    N a frame; scale and shift (B, n, D). Broadcast over each frame's tokens, never copied to them (the DiT's own
    layout; cheaper than per_token, forward and back)."""
    y = x.unflatten(1, (-1, N)) * scale.unsqueeze(2)                              # (B, n, N, D)
    return (y if shift is None else y + shift.unsqueeze(2)).flatten(1, 2)


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

    def forward(self, x, mask, past=None, keep=None, q_from=0):
        """x (B, L, D); mask (L - q_from, L_past + L) bool, True = may attend; past: this layer's KV cache (a dict): its
        keys and values come first, and the first `keep` new ones (None: all) are appended to it in place. Only the
        tokens from q_from on ask (queries) and get an output, (B, L - q_from, D); every token is a key and value."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        q = q[:, :, q_from:]
        if past is not None:
            if "k" in past:
                k, v = torch.cat([past["k"], k], 2), torch.cat([past["v"], v], 2)
            if keep != 0:
                n = k.shape[2] - L + (L if keep is None else keep)
                past["k"], past["v"] = k[:, :, :n], v[:, :, :n]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L - q_from, D))


def mlp(width, ratio):
    # exact (erf) GELU: on a CPU the tanh approximation measured 3.5x slower (393k values: 858 us against 241 us)
    return nn.Sequential(nn.Linear(width, int(width * ratio)), nn.GELU(), nn.Linear(int(width * ratio), width))


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

    def forward(self, x, c, N, mask, past=None, keep=None, q_from=0):
        # x (B, n*N, D) the tokens of n frames, N a frame; c (B, n, D) those frames' noise-level embeddings; past, keep,
        # q_from: Attention (the tokens before q_from are keys and values only) -> (B, n*N - q_from, D)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, -1)          # 6 x (B, n, D), one per frame
        g1, sh2, sc2, g2 = (r[:, q_from // N:] for r in (g1, sh2, sc2, g2))    # the frames that ask
        y = self.attn(per_frame(self.attn_norm(x), N, 1 + sc1, sh1), mask, past, keep, q_from)   # (B, n*N - q_from, D)
        x = x[:, q_from:] + per_frame(y, N, g1)
        return x + per_frame(self.ffn(per_frame(self.ffn_norm(x), N, 1 + sc2, sh2)), N, g2)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.size % cfg.patch:
            raise ValueError(f"frame size {cfg.size} is not a multiple of patch {cfg.patch}")
        self.cfg = cfg
        self.grid = cfg.size // cfg.patch
        self.n_tok = self.grid ** 2
        self.cell = cfg.patch                                                # pixels a side of the cell a token stands for
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

    def new_cache(self):
        return dict(frames=0, layers=[{} for _ in self.blocks])

    def forward(self, x, tau, cache=None, keep=None, last=None):
        """x (B, T, C, S, S) noisy frames in [-1, 1]; tau (B, T) their noise levels -> clean frames (B, T, C, S, S).

        With a cache (new_cache()), the frames before cache["frames"] are not recomputed: their keys and values come
        from the cache, and only the later frames are computed and returned, (B, T - cache["frames"], C, S, S).
        Of those, the first `keep` frames (None: all) add their keys and values to the cache: the clean context frames,
        computed once, not the frames being denoised, which change at every Euler step. Attention is causal across
        frames, so a frame's keys and values never depend on the frames after it: the cache changes no output.

        With `last` (None: all), only the last `last` frames are predicted and returned: in the final block the earlier
        frames are keys and values only, so a loss that scores the newest frames (loss.py) and a sampler that wants
        its new frames skip their feed-forward work there (no output changes)."""
        B, T, C, S, _ = x.shape
        if T > self.cfg.clip_len or S != self.cfg.size or C != self.cfg.channels:
            raise ValueError(f"DiT expects clips (B, <={self.cfg.clip_len}, {self.cfg.channels}, {self.cfg.size}, "
                             f"{self.cfg.size}); got {tuple(x.shape)}")
        f0, N = (cache["frames"] if cache is not None else 0), self.n_tok
        n_out = T - f0 if last is None else last                            # the frames returned
        if not 1 <= n_out <= T - f0:
            raise ValueError(f"last={last}: the DiT computes {T - f0} frames here, so ask for 1 to {T - f0} of them")
        frames = torch.arange(f0, T, device=x.device).repeat_interleave(N)  # (L,) the computed tokens' frames
        self.token_frames = frames                                           # set first: hooks on embed read it
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)[:, f0:]  # frame i-1 beside frame i
        h = self.embed(x[:, f0:], prev)                                      # (B, L, D), L = (T - f0) N
        h = h + (self.pos_time[f0:T, None] + self.pos_space).flatten(0, 1)   # (L, D): each token's frame and place
        c = self.t_embed(timestep_embedding(tau[:, f0:], self.cfg.width))    # (B, T - f0, D): the computed frames
        keys = torch.arange(T, device=x.device).repeat_interleave(N)         # (T N,) the frame of every key
        mask = frames[:, None] >= keys[None, :]                              # (L, T N) causal across frames
        pasts = cache["layers"] if cache is not None else [None] * len(self.blocks)
        q_from = [0] * (len(self.blocks) - 1) + [(T - f0 - n_out) * N]        # the final block asks for the outputs only
        for blk, past, q in zip(self.blocks, pasts, q_from):
            self.token_frames = frames[q:]                                   # the tokens the block's hooks see outputs of
            h = blk(h, c, N, mask[q:], past, None if keep is None else keep * N, q)
        if cache is not None:
            cache["frames"] = T if keep is None else f0 + keep
        sh, sc = self.out_ada(F.silu(c[:, -n_out:])).chunk(2, -1)            # (B, n_out, D) each
        return prev[:, -n_out:] + self.unpatchify(self.out(per_frame(self.out_norm(h), N, 1 + sc, sh)), n_out)


# ----------------------------------------------------------------------------------------------
# the per-frame VQ tokenizer

def upsampler(chans):
    """len(chans) - 1 stride-2 transposed convolutions, chans[0] -> chans[-1] channels, each doubling the frame."""
    return [layer for a, b in zip(chans, chans[1:]) for layer in (nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.GELU())]


class VQTokenizer(nn.Module):
    """Frame (C, S, S) in [-1, 1] <-> a G x G grid of code ids, G = S / 2^down.

    Encoder: one P x P patch convolution, P = 2^down (each code sees its own cell only), then 1x1 convolutions to
    code_dim. Quantiser: the nearest of K codebook vectors; the decoder sees it through the straight-through
    estimator, z + (q - z).detach(). The codebook is not trained by gradients but as running means of the encoder
    outputs assigned to each code (EMA, as in VQ-VAE-2), and a code that goes unused is revived: moved onto a
    random encoder output of the batch.
    Decoder: a 3x3 convolution, `down` stride-2 transposed convolutions back to S x S, two 3x3 convolutions."""

    def __init__(self, channels, down, codes, code_dim, width):
        super().__init__()
        self.down = down
        chans = [width * 2 ** min(i, 1) for i in range(down + 1)]               # e.g. 32, 64, 64 (decoder: reversed)
        cell = 2 ** down
        self.enc = nn.Sequential(nn.Conv2d(channels, 4 * width, cell, stride=cell), nn.GELU(),
                                 nn.Conv2d(4 * width, 4 * width, 1), nn.GELU(), nn.Conv2d(4 * width, code_dim, 1))
        r = chans[::-1]
        self.dec = nn.Sequential(nn.Conv2d(code_dim, r[0], 3, padding=1), nn.GELU(), *upsampler(r),
                                 nn.Conv2d(r[-1], r[-1], 3, padding=1), nn.GELU(), nn.Conv2d(r[-1], channels, 3, padding=1))
        self.register_buffer("codebook", torch.zeros(codes, code_dim))
        self.register_buffer("usage", torch.zeros(codes))                     # EMA of assignments per batch, per code
        self.register_buffer("code_sum", torch.zeros(codes, code_dim))        # EMA sum of assigned encoder outputs

    def quantize(self, z):
        """z (M, code_dim) -> nearest code ids (M,)."""
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(1)
        return d.argmin(1)

    def _flat(self, x):
        z = self.enc(x.flatten(0, -4))                                         # (M, E, G, G)
        return z, z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                # and (M*G*G, E)

    @torch.no_grad()
    def encode(self, x):
        """x (..., C, S, S) -> ids (..., G*G), row-major over the grid. In float32 under autocast too: the tokenizer is
        trained in float32, and a bf16 distance would pick other codes for some cells than evaluation does."""
        with torch.autocast(x.device.type, enabled=False):
            z, flat = self._flat(x.float())
            return self.quantize(flat).view(*x.shape[:-3], -1)

    @torch.no_grad()
    def decode(self, ids):
        """ids (..., G*G) -> frames (..., C, S, S) in [-1, 1], in float32 as encode."""
        G = math.isqrt(ids.shape[-1])
        q = self.codebook[ids.flatten(0, -2)].view(-1, G, G, self.codebook.shape[1]).permute(0, 3, 1, 2)
        S = G * 2 ** self.down
        with torch.autocast(ids.device.type, enabled=False):
            return self.dec(q).clamp(-1, 1).view(*ids.shape[:-1], -1, S, S)

    def loss(self, x, beta=0.25, decay=0.99, revive=1.0, generator=None):
        """One training step's loss on frames x (M, C, S, S); in training mode, also updates the codebook (EMA),
        reviving dead codes at encoder outputs drawn with `generator`."""
        z, flat = self._flat(x)
        ids = self.quantize(flat.detach())
        q = self.codebook[ids]
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(ids, len(self.codebook)).type_as(flat)        # (M*G*G, K)
                self.usage.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
                self.code_sum.mul_(decay).add_(onehot.T @ flat.detach(), alpha=1 - decay)
                live = self.usage > 0
                self.codebook[live] = self.code_sum[live] / self.usage[live, None]
                dead = self.usage < revive                                          # on average less than once a batch: revive
                if dead.any():                                                      # (all of them at the first step)
                    pick = flat.detach()[torch.randint(len(flat), (int(dead.sum()),), device=flat.device, generator=generator)]
                    self.codebook[dead], self.code_sum[dead], self.usage[dead] = pick, pick, 1.0
        st = flat + (q - flat).detach()                                        # straight-through
        G = z.shape[-1]
        recon = self.dec(st.view(-1, G, G, flat.shape[1]).permute(0, 3, 1, 2))
        return F.mse_loss(recon, x) + beta * F.mse_loss(flat, q), recon


# ----------------------------------------------------------------------------------------------
# the video GPT

@dataclass
class ARConfig:
    size: int = 32          # frames are size x size pixels
    channels: int = 3
    down: int = 2           # the tokenizer halves the frame `down` times: G = size / 2^down tokens a side
    codes: int = 512        # codebook size K
    code_dim: int = 32
    tok_width: int = 32     # tokenizer channels: the decoder's last layers (its first ones twice this), the encoder's 4x
    clip_len: int = 3       # longest clip the GPT sees at once, in frames
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    reach: int = 1          # each token also sees the codes of a (2*reach+1)^2 neighbourhood of the frame before


def make_tokenizer(cfg: ARConfig):
    return VQTokenizer(cfg.channels, cfg.down, cfg.codes, cfg.code_dim, cfg.tok_width)


class GPTBlock(nn.Module):
    """Pre-norm transformer block: x <- x + Attn(LN(x));  x <- x + FFN(ffn_norm(x))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ffn_norm = nn.LayerNorm(width)                                     # the adapter hooks this
        self.ffn = mlp(width, mlp_ratio)

    def forward(self, x, mask, past=None):
        x = x + self.attn(self.attn_norm(x), mask, past)
        return x + self.ffn(self.ffn_norm(x))


class TokenEmbed(nn.Module):
    """The input of slot (i, p): the code before it in its own frame (a start-of-frame row for p = 0), plus the
    codes of frame i-1 in a (2r+1)^2 neighbourhood of cell p, each offset with its own table (a convolution over
    one-hot codes, read by gathers). Off-grid cells and frame 0's missing predecessor read an extra row K.
    This is the token model's twin of the DiT's overlapping causal patches: copying a cell, or seeing an object
    about to enter it, needs no attention."""

    def __init__(self, codes, grid, reach, width):
        super().__init__()
        self.K = codes
        r = torch.arange(-reach, reach + 1)
        dy, dx = torch.meshgrid(r, r, indexing="ij")
        y, x = torch.arange(grid ** 2) // grid, torch.arange(grid ** 2) % grid
        ny, nx = y[:, None] + dy.flatten(), x[:, None] + dx.flatten()           # (N, O) neighbour coordinates
        inside = (ny >= 0) & (ny < grid) & (nx >= 0) & (nx < grid)
        self.register_buffer("nbr", torch.where(inside, ny * grid + nx, -1), persistent=False)   # (N, O), -1 off-grid
        self.n_off = self.nbr.shape[1]
        self.prev_code = nn.Embedding(codes + 1, width)
        self.nbr_code = nn.Embedding(self.n_off * (codes + 1), width)

    def forward(self, z, frames, cells):
        # z (B, T, N) code ids; frames, cells (L,) the slots to embed -> (B, L, D)
        B, T, N = z.shape
        flat = z.reshape(B, T * N)
        K = self.K
        before = torch.where(cells > 0, frames * N + cells - 1, 0)
        own = torch.where(cells > 0, flat[:, before], K)                        # (B, L)
        nb = self.nbr[cells]                                                    # (L, O)
        src = (frames[:, None] - 1) * N + nb
        ok = (nb >= 0) & (frames[:, None] > 0)
        ids = torch.where(ok, flat[:, src.clamp(min=0)], K)                     # (B, L, O)
        ids = ids + (K + 1) * torch.arange(self.n_off, device=z.device)
        return self.prev_code(own) + self.nbr_code(ids).sum(2)


class VideoGPT(nn.Module):
    """An autoregressive transformer over the VQ codes of a clip. With N = G*G codes per frame:

        slot:      0 .. N-1  |  N .. 2N-1  |  ...  |  (T-1)N .. TN-1
        frame:         0     |      1      |  ...  |       T-1
        predicts:  z[0, p]   |   z[1, p]   |  ...  |    z[T-1, p]        (p = slot - frame*N, row-major)
        input:     z[i, p-1] (start-of-frame row at p = 0) + codes of frame i-1 around cell p (TokenEmbed)
        attends:   every slot <= itself (plain causal attention over slots)

    A frame starts at slot i*N; every count derives from the config (N = (size / 2^down)^2). Slot (i, p)
    predicts code p of frame i from all codes before it in that order, so sampling runs slot by slot
    with a KV cache: forward(z, cache, stop) computes only the slots cache["n"] .. stop-1.
    The frozen tokenizer lives inside (`self.tokenizer`) so one checkpoint maps pixels to pixels."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        if cfg.size % 2 ** cfg.down:
            raise ValueError(f"frame size {cfg.size} is not a multiple of 2^down = {2 ** cfg.down}")
        self.cfg = cfg
        self.grid = cfg.size // 2 ** cfg.down
        self.n_tok = self.grid ** 2
        D = cfg.width
        self.cell = 2 ** cfg.down                                            # pixels a side of the cell a code stands for
        self.tokenizer = make_tokenizer(cfg).requires_grad_(False)
        self.embed = TokenEmbed(cfg.codes, self.grid, cfg.reach, D)
        self.pos_space = nn.Parameter(torch.randn(self.n_tok, D) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(cfg.clip_len, D) * 0.02)
        self.blocks = nn.ModuleList(GPTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.codes)
        self.token_frames = None

    def new_cache(self):
        return dict(n=0, layers=[{} for _ in self.blocks])

    def forward(self, z, cache=None, stop=None):
        """z (B, T, N) code ids (slots not yet sampled may hold anything: no slot reads a later one).
        Computes slots [cache["n"], stop) (all of them without a cache) -> logits (B, L, K) for those slots."""
        B, T, N = z.shape
        if T > self.cfg.clip_len or N != self.n_tok:
            raise ValueError(f"VideoGPT expects codes (B, <={self.cfg.clip_len}, {self.n_tok}); got {tuple(z.shape)}")
        start = cache["n"] if cache is not None else 0
        stop = T * N if stop is None else stop
        slots = torch.arange(start, stop, device=z.device)
        frames, cells = slots // N, slots % N
        self.token_frames = frames                                           # set first: hooks on embed read it
        h = self.embed(z, frames, cells) + self.pos_space[cells] + self.pos_time[frames]   # (B, L, D)
        mask = torch.arange(stop, device=z.device)[None, :] <= slots[:, None]   # (L, stop) causal over slots
        layers = cache["layers"] if cache is not None else [None] * len(self.blocks)
        for blk, past in zip(self.blocks, layers):
            h = blk(h, mask, past)
        if cache is not None:
            cache["n"] = stop
        return self.head(self.out_norm(h))


BACKBONES = {"dit": (DiT, DiTConfig), "ar": (VideoGPT, ARConfig)}


def block_flops(D, ratio, L, L_keys, L_q=None):
    """Forward FLOPs (2 per multiply-add) of one transformer block's token work: L tokens, the last L_q of them
    (None: all) asking, each over L_keys keys. qkv 3D^2 per token; output projection D^2, feed-forward 2 ratio D^2
    per asking token; scores and weighted sum 2 L_keys D each. Attention is counted over every key the masked
    kernel computes, attended or not."""
    L_q = L if L_q is None else L_q
    return 2 * L * 3 * D * D + 2 * L_q * (D * D + 2 * ratio * D * D) + 4 * L_q * L_keys * D


def forward_flops(backbone, T, last=None):
    """Forward FLOPs of a backbone on one clip of T frames, counted from its config: what runs, per token and per
    frame (test_all checks it against torch.utils.flop_counter). last: the DiT predicts only the last `last`
    frames (DiT.forward). Training costs 3x this (forward + backward)."""
    if last is not None and not isinstance(backbone, DiT):
        raise ValueError("last: only the DiT predicts a clip's last frames alone")
    c, D, N = backbone.cfg, backbone.cfg.width, backbone.n_tok
    L, L_out = T * N, (T if last is None else last) * N
    blocks = (c.depth - 1) * block_flops(D, c.mlp_ratio, L, L) + block_flops(D, c.mlp_ratio, L, L, L_out)
    if isinstance(backbone, DiT):
        k = c.patch + 2 * c.margin
        embed = 2 * L * (2 * c.channels * k * k) * D                          # the causal space-time patch convolution
        T_out = L_out // N
        cond = T * (2 * 2 * D * D + c.depth * 2 * D * 6 * D) + T_out * 2 * D * 2 * D   # t_embed, adaLN per block, out_ada
        return embed + blocks + cond + 2 * L_out * D * c.channels * c.patch ** 2
    return blocks + 2 * L * D * c.codes                                         # the GPT: token tables are lookups


def tokenizer_flops(tok, n_codes):
    """Forward FLOPs of encoding frames into n_codes codes (frames x G^2) with the VQ tokenizer: its encoder
    convolutions and the distances to every codebook vector."""
    cell, w = 2 ** tok.down, tok.enc[0].out_channels
    C, E, K = tok.enc[0].in_channels, tok.codebook.shape[1], tok.codebook.shape[0]
    return 2 * n_codes * (C * cell * cell * w + w * w + w * E + E * K)
