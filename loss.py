"""loss.py — the flow-matching objective as a per-element map, and the motion-reinforced weights.

Flow matching conventions (rectified flow): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) * x_0 + t * eps,        v = dx_t/dt = eps - x_0 = (x_t - x_0) / t

The network predicts the clean frame x0_hat ("x-prediction"); its velocity is v_hat = (x_t - x0_hat) / t,
which is what the sampler integrates. The velocity error is |v_hat - v|^2 = |x0_hat - x_0|^2 / t^2; we weight
it by t^2, i.e. the loss is |x0_hat - x_0|^2 at every noise level. Why x-prediction: a small model must
otherwise reproduce the input noise pixel for pixel to output v, and on a CPU budget it never gets there
(multi-step samples fill with patch-shaped noise). Predicting a clean frame is a low-dimensional target
(Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").

Each frame has its own t (model.py). A training clip of T frames gets a clean context of k frames
(t = 0) and the frames >= k get independent noise levels. By default k = T - 1: every clip teaches
"the next frame from a clean history", which is what a frame-by-frame rollout asks. With
denoise_frames = n > 1, k is drawn from T-n..T-1, so the model also learns "several frames at once,
from noisy neighbours" (rollout(chunk=n)). That costs: the DiT predicts each frame as a change to the
one before it (model.py), so a frame after a noisy one must also undo its neighbour's noise, and on
64x64 Breakout those frames took nearly all of the loss (0.046 against 0.0004 for next-frame clips
late in pre-training, 450-500 iterations in) and most of the control (README: Real games).

Motion-reinforced loss (the paper's), our exact form. For frame i >= 1 of the ground truth:

    d_i(p)  = mean over channels and over the pixels of grid cell p of |x_i - x_{i-1}|
    s_i(p)  = min( n * softmax_p(d_i / temp), s_max )          n = number of grid cells
    m_i     = fraction of cells p with d_i(p) > 0.01            (about 2.5 grey levels)
    w_i(p)  = (1 + c (1 - m_i) s_i(p)) / mean_p(1 + c (1 - m_i) s_i(p))

A frame with no motion gets w = 1 everywhere (softmax is uniform, s = 1); where pixels change
the weight rises; the clamp s_max keeps a few cells from taking weights near n (in our CPU
calibration runs that destabilised training) and the normalisation keeps each frame's mean weight at 1, so c
trades static detail against dynamics without changing the loss scale. c = 0 turns it off.
The factor (1 - m_i) is ours: the loss is for small moving objects (Breakout's paddle and ball change 1.5% of
the cells from one frame to the next), not for a moving camera (CoinRun's scrolling changes 43% on average, most
of the frame while the agent runs), where reweighting by the largest changes only takes weight from the rest of
the frame: the more of a frame moves, the less its weights depart from uniform.
The weights are constants (no gradient) computed on ground-truth pixels, on the loss's grid:
the DiT's patches, or the tokenizer's cells for the token model.

Motion-reinforced cross-entropy, for the video GPT (model.py): the frames are turned into codes by the
frozen tokenizer, and the cross-entropy of each predicted code is multiplied by the same w_i(p), with p
now the tokenizer cell (2^down pixels a side) the code stands for. Frame 0 of a clip is context: its
codes are not scored, so, as for the DiT, the model learns "frame i from the frames before it".
"""
import torch
import torch.nn.functional as F


def motion_weights(frames, cell, c=1.0, temp=0.05, s_max=8.0):
    """frames (B, T, C, H, W) ground truth in [-1, 1] -> weights (B, T, H/cell, W/cell); frame 0 gets 1."""
    B, T, C, H, W = frames.shape
    with torch.no_grad():
        diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(2) / 2            # (B, T-1, H, W) in [0, 1]
        d = F.avg_pool2d(diff.reshape(-1, 1, H, W), cell).reshape(B, T - 1, -1)   # (B, T-1, n)
        n = d.shape[-1]
        s = (n * torch.softmax(d / temp, -1)).clamp(max=s_max)
        moving = (d > 0.01).float().mean(-1, keepdim=True)                     # (B, T-1, 1) m_i
        w = 1 + c * (1 - moving) * s
        w = w / w.mean(-1, keepdim=True)
        w = torch.cat([torch.ones_like(w[:, :1]), w], 1)                       # (B, T, n)
    return w.reshape(B, T, H // cell, W // cell)


def clean_prefix(T, denoise_frames=1):
    """The frames clean in every training clip of T frames that denoises its last 1..denoise_frames (at least one
    context frame): never scored, so the DiT is not asked to predict them (DiT.forward(last=...))."""
    return max(T - denoise_frames, 1)


def flow_matching_noise(frames_shape, device, generator, denoise_frames=1):
    """The randomness of one flow-matching batch, drawn apart from the loss so that a batch split over processes
    (torchrun) uses the very draws the whole batch would: per-frame noise levels tau (B, T), a clean prefix of k frames,
    k drawn from T-n..T-1 (n = denoise_frames, at most T-1), followed by independent U(0, 1) levels, and the noise
    eps (B, T, C, H, W); `clean` (an int, known without reading the draws back from a GPU): the frames before it are
    clean in every clip."""
    B, T = frames_shape[:2]
    clean = clean_prefix(T, denoise_frames)
    k = torch.randint(clean, T, (B, 1), device=device, generator=generator)
    t = torch.rand(B, T, device=device, generator=generator)
    tau = torch.where(torch.arange(T, device=device) < k, torch.zeros_like(t), t)
    return dict(tau=tau, eps=torch.randn(frames_shape, device=device, generator=generator), clean=clean)


def flow_matching_loss(model, frames, actions=None, motion_c=0.0, motion_temp=0.05, cell=4, noise=None, generator=None,
                       distance="mse"):
    """Motion-weighted flow-matching loss of `model` on a batch of clips.

    frames (B, T, C, H, W) in [-1, 1]; actions as the model takes them, or None; noise: flow_matching_noise's draws
    (None: drawn here from `generator`). distance: "mse" (the posterior mean, as above) or "l1", |x0_hat - x_0|: the
    posterior median, whose gradient does not fade near zero, so pixels that do not change are predicted as exactly
    unchanged rather than nearly. Returns the scalar loss, averaged over the frames being denoised (t > 0)."""
    noise = noise if noise is not None else flow_matching_noise(frames.shape, frames.device, generator)
    tau = noise["tau"]
    t = tau[:, :, None, None, None]
    x_t = (1 - t) * frames + t * noise["eps"]
    first = noise["clean"]                                                     # frames before it are clean in every clip:
    x0_hat = model(x_t, tau, actions=actions, last=frames.shape[1] - first).float()   # never scored, so never predicted
    err = x0_hat - frames[:, first:]
    per = (err.abs() if distance == "l1" else err.pow(2)).mean(2)              # (B, T', H, W); mse: t^2 |v_hat - v|^2
    per = F.avg_pool2d(per, cell)                                              # (B, T', H/cell, W/cell) on the grid
    w = motion_weights(frames, cell, motion_c, motion_temp)[:, first:] if motion_c > 0 else torch.ones_like(per)
    per_frame = (per * w).mean((2, 3))                                         # (B, T')
    denoised = (tau[:, first:] > 0).float()
    return (per_frame * denoised).sum() / denoised.sum()


def motion_cross_entropy(model, frames, actions=None, motion_c=0.0, motion_temp=0.05, cell=4, noise=None, generator=None,
                         distance=None):
    """Motion-weighted next-code cross-entropy of a token `model` on a batch of clips.

    frames (B, T, C, H, W) in [-1, 1]; `cell` is the tokenizer's cell size. Returns the scalar loss,
    averaged over the codes of frames 1..T-1 (noise, generator, distance: unused: codes are scored by cross-entropy)."""
    B, T = frames.shape[:2]
    tokenizer = getattr(model, "module", model).backbone.tokenizer               # (under DDP, the wrapped model's)
    z = tokenizer.encode(frames)                                                 # (B, T, N) code ids
    logits = model(z, actions=actions).float()                                   # (B, T*N, K)
    ce = F.cross_entropy(logits.flatten(0, 1), z.flatten(), reduction="none").view(B, T, -1)
    w = motion_weights(frames, cell, motion_c, motion_temp).flatten(2) if motion_c > 0 else torch.ones_like(ce)
    return (ce * w)[:, 1:].mean()


LOSSES = {"dit": flow_matching_loss, "ar": motion_cross_entropy}
NOISE = {"dit": flow_matching_noise, "ar": lambda shape, device, generator, denoise_frames=1: None}   # what each loss draws per batch
