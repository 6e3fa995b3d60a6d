"""sample.py — the flow-matching sampler, batched rollouts, GIFs, and loading a model from its checkpoint.

    python sample.py --ckpt out/ckpt.pt --out rollout.gif
    python sample.py --ckpt out/ckpt.pt --play                 # play inside the learned world (a window)
    python sample.py --ckpt out/ckpt.pt --play --keys right,right,up --out play.gif    # headless
    python sample.py --ckpt out/ckpt.pt --bench_play           # frames per second of play

writes held-out episodes as a GIF, one row per episode: the ground truth, the model's rollout under
the recorded actions, and its rollout under another episode's actions. The checkpoint is all it
needs: the model is rebuilt from the config stored inside, and the held-out episodes are
regenerated from the data config stored there too.
"""
import argparse
import contextlib
import os
import pickle
import time

import numpy as np
import torch

from envs import KEYS, UserError, check_folder, check_out_file, keys_for, run_cli
from data import ClipSampler, DataConfig, cache_path, load_corpus, spread_clips, to_uint8
from model import BACKBONES, VideoGPT, make_generator, pick_device
from adapter import WorldModel, check_actions

CKPT_FORMAT = "nanoworld-1"
# what numpy random states in pre-2026-11-26 checkpoints are made of: arrays, rebuilt without running stored code
# (numpy 2 renamed numpy.core to numpy._core; the same function either way)
NUMPY_ARRAYS = [(np.ndarray.__reduce__(np.zeros(1))[0], f"numpy.{m}core.multiarray._reconstruct") for m in ("", "_")] + \
    [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"), (type(np.dtype(np.uint32)), "numpy.dtypes.UInt32DType")]


# ----------------------------------------------------------------------------------------------
# the sampler

@torch.no_grad()
def denoise(model, history, actions, n_new, steps=4, generator=None, share=1, use_cache=True):
    """Euler integration of dx/dt = v from t = 1 (noise) to t = 0 (data) for n_new frames after a clean history.
    The model predicts the clean frames x0_hat; the velocity is v = (x_t - x0_hat) / t (loss.py), so the last
    step lands exactly on the model's x0_hat.

    actions (B, h + n_new, ...) lead into each frame. Each group of `share` consecutive rows draws one noise: its
    futures differ by their actions alone. history (B, h, C, S, S) clean frames, or (B / share, h, C, S, S), one per
    group, computed once for the group. With use_cache the history's keys and values are computed once (DiT.forward
    with a cache) instead of at every Euler step. Returns the n_new new frames, (B, n_new, C, S, S)."""
    B, (Bh, h) = actions.shape[0], history.shape[:2]
    x = torch.randn((B // share, n_new) + history.shape[2:], device=history.device, generator=generator)
    x = x.repeat_interleave(share, 0)
    use_cache = use_cache and (steps > 1 or Bh < B)      # one step over one history each: the cache saves nothing
    cache = model.backbone.new_cache() if use_cache else None
    if use_cache and Bh < B:                             # a shared history: computed once, its keys copied to each row
        model(history, torch.zeros(Bh, h, device=x.device), cache=cache, last=1, actions=actions[::B // Bh, :h])  # (output unused)
        for layer in cache["layers"]:
            layer.update({k: v.repeat_interleave(B // Bh, 0) for k, v in layer.items()})
    history = history.repeat_interleave(B // Bh, 0)
    ts = torch.linspace(1, 0, steps + 1, device=history.device)
    for i in range(steps):
        tau = torch.cat([torch.zeros(B, h, device=x.device), torch.full((B, n_new), float(ts[i]), device=x.device)], 1)
        keep = h if use_cache and cache["frames"] == 0 else 0          # the first step computes the history: keep it
        x0_hat = model(torch.cat([history, x], 1), tau, cache=cache, keep=keep, last=n_new, actions=actions).float()
        x = x + (ts[i + 1] - ts[i]) * (x - x0_hat) / ts[i]
    return x.clamp(-1, 1)


def pick_code(logits, temperature=1.0, top_k=0, generator=None):
    """logits (B, K) -> code ids (B,): sample at `temperature` from the top_k most likely codes
    (top_k 0: all of them; temperature 0: the most likely code)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def sample_codes(model, z, actions, n_new, temperature=1.0, top_k=0, generator=None, use_cache=True, on_frame=None):
    """Extend the code clip z (B, k, N) by n_new frames, code by code, through the video GPT of `model`.

    The GPT sees at most clip_len frames: frame f is sampled inside the window of frames
    lo..f, lo = max(0, f + 1 - clip_len). With use_cache, the keys and values of every slot are kept
    and each new code costs one slot's forward pass; the cache is rebuilt (one batched pass over the
    window's earlier frames) only when the window slides. Without it, every code reruns the whole window.
    actions (B, k + n_new, ...) lead into each frame. Returns (B, k + n_new, N)."""
    gpt = model.backbone
    W, N = gpt.cfg.clip_len, gpt.n_tok
    k = z.shape[1]
    cache, start, finite_logits = None, -1, torch.ones((), dtype=torch.bool, device=z.device)
    for f in range(k, k + n_new):
        lo = max(0, f + 1 - W)
        if lo != start or not use_cache:
            cache, start = (gpt.new_cache() if use_cache else None), lo
        z = torch.cat([z, torch.zeros_like(z[:, :1])], 1)
        win, acts = z[:, lo:f + 1], actions[:, lo:f + 1]                   # a view: codes written to win land in z
        base = (f - lo) * N                                                  # the slot where frame f starts
        for p in range(N):
            logits = model(win, cache=cache, stop=base + p + 1, actions=acts)[:, -1]   # (B, K) for slot (f, p)
            finite_logits &= torch.isfinite(logits).all()                   # read once at the end: no sync per code
            win[:, f - lo, p] = pick_code(logits.nan_to_num(0.0), temperature, top_k, generator)
        if on_frame is not None:
            on_frame(f)
    if not finite_logits:
        raise UserError("the model generated NaN or inf logits: its weights are not finite (a diverged checkpoint?)")
    return z


def check_rollout(model, context, actions, generator, device):
    """Raise a UserError that names the problem unless context, actions and generator fit the model on `device`."""
    cfg = model.backbone.cfg
    want = (cfg.channels, cfg.size, cfg.size)
    for name, x in (("context", context), ("actions", actions)):
        if not isinstance(x, torch.Tensor):
            raise UserError(f"the {name} must be a torch tensor; got {type(x).__name__}")
    if actions.dim() < 2:
        raise UserError(f"actions must be (batch, k + H) ids or (batch, k + H, action_dim) vectors; got shape {tuple(actions.shape)}")
    if context.dim() != 5 or tuple(context.shape[2:]) != want:
        raise UserError(f"the context must be frames (batch, k, {', '.join(map(str, want))}) in [-1, 1]; got {tuple(context.shape)}")
    if not torch.isfinite(context).all():
        raise UserError("the context frames hold NaN or inf: pass finite frames in [-1, 1]")
    B, (Bc, k) = actions.shape[0], context.shape[:2]
    if B % Bc:
        raise UserError(f"{Bc} contexts need {Bc} action sequences, or a multiple (several futures each); got {B}")
    if actions.shape[1] - k < 1:
        raise UserError(f"actions must cover the context ({k} frames) and at least one new frame; got {actions.shape[1]}")
    if model.spec is not None:
        check_actions(actions, model.spec, actions.shape[1], values=True)
    own = actions[:, :k].reshape(Bc, B // Bc, -1)
    if B > Bc and not (own == own[:, :1]).all():
        raise UserError("the action sequences that share a context must agree on the context's own actions (the first k)")
    if generator is not None and generator.device.type != device.type:
        raise UserError(f"the generator is on {generator.device} but the model on {device}: "
                        f"make it with model.make_generator(device, seed)")


@torch.no_grad()
def rollout(model, context, actions, steps=4, chunk=1, temperature=1.0, top_k=0, generator=None, use_cache=True,
            on_frame=None):
    """Roll the world forward from context frames under a sequence of actions: the world model as a batched env.

    context (Bc, k, C, S, S) in [-1, 1]; actions (B, k + H, ...) where actions[:, i] leads into frame i (those of the
    context frames included). B = Bc, or a multiple: then each context drives B / Bc consecutive action sequences
    (a planner's candidates), computed once and sharing one noise, so its futures differ by their actions alone.
    Returns the H new frames, (B, H, C, S, S), on the model's device.
    DiT: frames are denoised `chunk` at a time (1 = frame by frame) with `steps` Euler steps, each chunk seeing at
    most clip_len - chunk earlier frames, whose keys and values are computed once per chunk (use_cache). The window's
    time positions are absolute, so a sliding window recomputes them, once per chunk, never per Euler step.
    GPT: the context is tokenized, frames are sampled code by code (temperature, top_k, KV cache: sample_codes) and
    decoded. The noise comes from `generator` (on the model's device; None: a fresh one seeded 0, so a call is
    reproducible). Bad inputs raise a UserError that names them; NaN frames never come back."""
    device = next(model.parameters()).device
    check_rollout(model, context, actions, generator, device)
    context, actions = context.to(device), actions.to(device)
    generator = generator if generator is not None else make_generator(device, 0)
    window = model.backbone.cfg.clip_len
    B, (Bc, k), H = actions.shape[0], context.shape[:2], actions.shape[1] - context.shape[1]
    if isinstance(model.backbone, VideoGPT):
        tok = model.backbone.tokenizer
        z = tok.encode(context).repeat_interleave(B // Bc, 0)
        z = sample_codes(model, z, actions, H, temperature, top_k, generator, use_cache, on_frame)
        return finite(tok.decode(z[:, k:]))
    if not 1 <= chunk < window:
        raise UserError(f"chunk must be in 1..{window - 1} for a model with clip_len {window}")
    frames = context
    while frames.shape[1] < k + H:
        n = min(chunk, k + H - frames.shape[1])
        hist = frames[:, -(window - n):]
        t0 = frames.shape[1] - hist.shape[1]
        new = denoise(model, hist, actions[:, t0:t0 + hist.shape[1] + n], n, steps, generator, B // Bc, use_cache)
        frames = torch.cat([frames.repeat_interleave(B // frames.shape[0], 0), new], 1)
        if on_frame is not None:
            on_frame(frames.shape[1] - 1)
    return finite(frames[:, k:])


def finite(frames):
    if not torch.isfinite(frames).all():
        raise UserError("the model generated NaN or inf frames: its weights are not finite (a diverged checkpoint?)")
    return frames


# ----------------------------------------------------------------------------------------------
# checkpoints

def build_model(ck):
    """A WorldModel from a checkpoint's description (backbone, its config, adapter, action spec)."""
    cls, cfg_cls = BACKBONES[ck["backbone"]]
    return WorldModel(cls(cfg_cls(**ck["model_args"])), ck["adapter"], ck["spec"])


def read_checkpoint(path):
    """Load a checkpoint dict on the CPU without pickle (weights_only: tensors, numbers, strings, lists, dicts), or
    raise a UserError that says what is wrong with it. Checkpoints of nanoworld releases before 2026-11-26 also hold
    numpy random states; those load through numpy's array reconstructors alone (no code runs), minus that state."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at '{path}': train one with `python train.py` or fix the path")
    try:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if not needs or not set(needs) <= {name for _, name in NUMPY_ARRAYS}:
                raise
            with torch.serialization.safe_globals(NUMPY_ARRAYS):
                ck = torch.load(path, map_location="cpu", weights_only=True)
            ck.pop("rng", None)
    except pickle.UnpicklingError:
        raise UserError(f"'{path}' needs pickle to load, which could run code stored in it: nanoworld loads only "
                        f"plain tensors and containers; re-save its weights as a plain state dict") from None
    except Exception as e:
        raise UserError(f"'{path}' is not a readable checkpoint ({type(e).__name__}); it may be truncated or "
                        f"corrupted: point to another file or retrain") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise UserError(f"'{path}' is not a nanoworld checkpoint (format {CKPT_FORMAT})")
    if ck["backbone"] not in BACKBONES:
        raise UserError(f"'{path}' holds a '{ck['backbone']}' backbone, which this version cannot build")
    return ck


def read_world_model(path, flag="--ckpt"):
    """read_checkpoint for a file that must hold a world model (ckpt.pt, pretrain.pt), not a tokenizer alone."""
    ck = read_checkpoint(path)
    if "ema" not in ck:
        raise UserError(f"'{path}' holds only a {ck.get('stage', 'partial')} stage, not a world model: point {flag} at "
                        f"a ckpt.pt or pretrain.pt" + (" (a tokenizer.pt goes to train.py --tokenizer)" if
                                                       ck.get("stage") == "tokenizer" else ""))
    return ck


def load_model(path, device="cpu", ema=True, flag="--ckpt"):
    """-> (WorldModel with the checkpoint's EMA weights (or raw ones), the checkpoint dict)."""
    ck = read_world_model(path, flag)
    model = build_model(ck)
    model.load_state_dict(ck["ema" if ema else "model"])
    return model.to(device).eval(), ck


# ----------------------------------------------------------------------------------------------
# pictures

def save_gif(path, columns, labels, scale=4, ms=200):
    """Write a GIF: columns is a list of uint8 videos (B, T, S, S, 3), shown side by side, one row per clip."""
    from PIL import Image, ImageDraw
    B, T, S = columns[0].shape[:3]
    pad, head = 2, 24                                                      # two lines: the labels, then t
    W = len(columns) * (S * scale + pad) + pad
    Hh = head + B * (S * scale + pad) + pad
    frames = []
    for t in range(T):
        img = Image.new("RGB", (W, Hh), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for j, (col, lab) in enumerate(zip(columns, labels)):
            x0 = pad + j * (S * scale + pad)
            d.text((x0 + 2, 1), lab, fill=(0, 0, 0))
            for b in range(B):
                tile = Image.fromarray(col[b, min(t, col.shape[1] - 1)]).resize((S * scale, S * scale), Image.NEAREST)
                img.paste(tile, (x0, head + pad + b * (S * scale + pad)))
        d.text((pad + 2, 12), f"t={t}", fill=(120, 120, 120))
        frames.append(img)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)


def heldout_clips(ck, n, length):
    """n held-out clips of `length` frames (at most the longest held-out episode) from the checkpoint's own
    action-labelled corpus, spread over its episodes."""
    folder = ck["data"].get("folder")
    if folder and not os.path.isdir(folder):
        raise UserError(f"this checkpoint was trained on the folder '{folder}', which is not there: its held-out "
                        f"episodes give the contexts, so put the folder back at that path")
    cfg = DataConfig(**ck["data"])
    cached = folder or os.path.exists(os.path.join(cache_path(cfg, True), "meta.json"))
    if ck.get("stage") == "mbrl":                                        # (mbrl.py keeps no corpus: its own buffer)
        print(f"note: this world model was trained by mbrl.py on its replay buffer of {source(ck)}, which its checkpoint "
              f"does not hold: the contexts come from a generated corpus" + ("" if cached else f" (into {cfg.data_dir}/)") +
              ", episodes the model has not seen")
    elif not cached:
        print(f"note: the checkpoint's held-out episodes are generated anew into {cfg.data_dir}/ (its corpus is not "
              f"cached here; as it was made, so the same episodes)")
    data = load_corpus(cfg, labelled=True, progress=False)
    length = min(length, int(data.test["lengths"].max()) - 1)
    e, s = spread_clips(data.test["lengths"], length, n)
    return ClipSampler(data.test, length).clips(e, s)


def parse_actions(text, spec, horizon):
    """'4,4,1' (discrete ids) or '1,0;0,-1' (continuous vectors, ';' between steps) -> (horizon,) or (horizon, A);
    a shorter sequence repeats its last action."""
    if spec["discrete"]:
        n = spec["n_actions"]
        size_ok, hint = ";" not in text, f"one id in [0, {n}) per step, like " + ",".join(str(i % n) for i in (n - 1, n - 1, 1))
        cut = [[v] for v in text.split(",")]
    else:
        A = spec["action_dim"]
        cut = [s.split(",") for s in text.split(";")]
        size_ok, hint = all(len(s) == A for s in cut), f"{A} number{'s' * (A > 1)} in [-1, 1] per step, like " + ";".join([",".join(["0.5"] * A)] * 2)
    if not size_ok:
        raise UserError(f"--actions '{text}' does not fit this model's actions: write {hint}")
    try:
        a = torch.tensor([[float(v) for v in s] for s in cut])
    except ValueError:
        raise UserError(f"could not read --actions '{text}': write {hint}") from None
    if len(a) > horizon:
        print(f"note: --actions holds {len(a)} steps and --horizon is {horizon}: the last {len(a) - horizon} {'is' if len(a) - horizon == 1 else 'are'} not used")
    a = torch.cat([a, a[-1:].expand(max(0, horizon - len(a)), -1)])[:horizon]
    if spec["discrete"]:
        if (a < 0).any() or (a >= spec["n_actions"]).any() or (a != a.round()).any():
            raise UserError(f"--actions: write {hint}")
        return a[:, 0].long()
    if a.abs().max() > 1:
        raise UserError(f"--actions '{text}': every number must be in [-1, 1]: write {hint}")
    return a


def compare_gif(model, ck, path, n=4, horizon=16, seed=0, device="cpu", actions=None, **sampling):
    """GIF of n held-out episodes: ground truth | rollout under recorded actions | under other actions
    (another episode's, or `actions` (H, ...) given for every episode)."""
    k = model.backbone.cfg.clip_len - 1
    clips = heldout_clips(ck, n, k + horizon)
    x, a = clips["frames"].to(device), clips["actions"].to(device)
    H = x.shape[1] - k                                                    # (fewer than horizon in short episodes)
    mine = a.roll(1, 0)[:, k:] if actions is None else actions[:H].to(device).expand((len(a), H) + actions.shape[1:])
    other = torch.cat([a[:, :k], mine], 1)
    g = lambda: make_generator(device, seed)
    pred = rollout(model, x[:, :k], a, generator=g(), **sampling)
    pred_other = rollout(model, x[:, :k], other, generator=g(), **sampling)
    ctx = to_uint8(x[:, :k])
    vids = [to_uint8(x)] + [np.concatenate([ctx, to_uint8(p)], 1) for p in (pred, pred_other)]
    save_gif(path, vids, ["truth", "model", "other acts" if actions is None else "--actions"])
    return len(x), H                                                      # episodes and frames drawn


# ----------------------------------------------------------------------------------------------
# play inside the learned world

class Player:
    """The learned world as a game: it starts from a held-out context and generates one frame per key pressed.
    Keys (left, right, up, down, space, none) map to actions through the checkpoint's spec (envs.py, keys)."""

    def __init__(self, model, ck, device, seed=0, keymap=None, **sampling):
        self.model, self.device, self.sampling = model, device, sampling
        self.k = model.backbone.cfg.clip_len - 1
        spec = ck["spec"]
        self.keys = dict(spec.get("keys") or keys_for(spec["n_actions"], None, spec["action_dim"]), **(keymap or {}))
        self.starts = heldout_clips(ck, 16, self.k)
        self.g, self.n = make_generator(device, seed), 0

    def restart(self):
        """A new held-out context (they take turns)."""
        i = self.n % len(self.starts["frames"])
        self.n += 1
        self.frames = self.starts["frames"][i:i + 1].to(self.device)            # (1, k, C, S, S)
        self.actions = self.starts["actions"][i:i + 1].to(self.device)          # (1, k[, A])
        return to_uint8(self.frames[0, -1])

    def step(self, key):
        """One generated frame after pressing `key` -> (S, S, 3) uint8."""
        if key not in self.keys:
            raise UserError(f"key '{key}' plays no action of this model: use {', '.join(self.keys)}")
        a = torch.as_tensor(self.keys[key], dtype=self.actions.dtype, device=self.device)
        self.actions = torch.cat([self.actions, a.expand((1, 1) + self.actions.shape[2:])], 1)[:, -(self.k + 1):]
        new = rollout(self.model, self.frames[:, -self.k:], self.actions, generator=self.g, **self.sampling)
        self.frames = torch.cat([self.frames, new], 1)[:, -self.k:]
        return to_uint8(new[0, 0])


def play_keys(player, keys, path, scale=4):
    """Headless play: a scripted sequence of key names -> a GIF (the context frame, then one frame per key)."""
    frames, labels = [player.restart()], ["start"]
    for i, key in enumerate(keys):
        frames.append(player.step(key))
        labels.append(f"{i + 1} {key}")
    from PIL import Image, ImageDraw
    S = frames[0].shape[0] * scale
    imgs = []
    for f, lab in zip(frames, labels):
        img = Image.new("RGB", (S, S + 12), (255, 255, 255))
        img.paste(Image.fromarray(f).resize((S, S), Image.NEAREST), (0, 12))
        ImageDraw.Draw(img).text((2, 0), lab, fill=(0, 0, 0))
        imgs.append(img)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=250, loop=0)
    return frames


def play_window(player):
    """A matplotlib window driven by the keyboard: arrows and space act while held, r restarts from another held-out
    context, q quits. The frame rate is in the title."""
    import matplotlib
    import matplotlib.pyplot as plt
    if matplotlib.get_backend().lower() in ("agg", "pdf", "svg", "ps"):
        raise UserError("no display for a window: play headless with --keys right,right,up,... --out play.gif")
    for k in [k for k in plt.rcParams if k.startswith("keymap.")]:
        plt.rcParams[k] = []                                                # the keys are the game's, not the figure's
    fig, ax = plt.subplots(figsize=(5, 5.4))
    im, held = ax.imshow(player.restart()), dict(key="none", quit=False)
    ax.axis("off")
    names = {"left": "left", "right": "right", "up": "up", "down": "down", " ": "space"}

    def press(e):
        if e.key in names:
            held["key"] = names[e.key]
        elif e.key == "r":
            im.set_data(player.restart())
        elif e.key in ("q", "escape"):
            held["quit"] = True
    fig.canvas.mpl_connect("key_press_event", press)
    fig.canvas.mpl_connect("key_release_event", lambda e: held.update(key="none"))
    t, fps = time.perf_counter(), 0.0
    while plt.fignum_exists(fig.number) and not held["quit"]:
        im.set_data(player.step(held["key"]))
        now = time.perf_counter()
        fps, t = 0.9 * fps + 0.1 / max(now - t, 1e-6), now
        ax.set_title(f"{held['key']:>5s} | {fps:4.1f} frames/s\narrows / space: act, r: restart, q: quit", fontsize=9)
        plt.pause(0.001)
    plt.close(fig)


def bench_play(player, frames=32):
    """Frames per second of play (one generated frame per key press, batch 1), after 4 frames of warm-up."""
    player.restart()
    for key in ["right"] * 4:
        player.step(key)
    t = time.perf_counter()
    for i in range(frames):
        player.step(("left", "right", "none", "up")[i // 4 % 4])
    return frames / (time.perf_counter() - t)


def arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint written by train.py")
    p.add_argument("--out", default="rollout.gif", help="the GIF to write")
    p.add_argument("--n", type=int, default=4, help="held-out episodes to show")
    p.add_argument("--horizon", type=int, default=16, help="frames to roll out after the context")
    p.add_argument("--steps", type=int, default=None, help="dit: Euler steps per frame (default: the --sample_steps the checkpoint was evaluated with, else 4)")
    p.add_argument("--temperature", type=float, default=None, help="ar: sampling temperature; None: the one the "
                   "checkpoint was evaluated with; 0 picks the most likely code")
    p.add_argument("--top_k", type=int, default=None, help="ar: sample from the k most likely codes (0: all; None: as trained)")
    p.add_argument("--actions", default="", help="drive the third column with these actions instead of another "
                   "episode's: ids like 4,4,1 (coin: 0 stay 1 up 2 down 3 left 4 right) or vectors like 1,0;0,-1 (pusher), one "
                   "per rolled-out frame: a shorter list repeats its last action, a longer one is cut at --horizon")
    p.add_argument("--play", action="store_true", help="play inside the learned world: a window driven by the arrows "
                   "and space (r restarts, q quits); with --keys, headless, into the GIF --out")
    p.add_argument("--keys", default=None, help="--play: a scripted sequence of keys, e.g. right,right,up,space,none,left")
    p.add_argument("--keymap", default="", help="--play: rebind keys, e.g. left=0;down=1;right=2;up=3 (ids) or "
                   "left=-1,0;up=0,-1 (vectors); the game's own action names bind them where it has names")
    p.add_argument("--bench_play", action="store_true", help="print the frames per second of play on this device")
    p.add_argument("--seed", type=int, default=0, help="the seed of the sampling noise (the held-out clips shown are the same for every seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data_dir", help="look for the checkpoint's held-out episodes here, generating them if they are "
                                      "not (None: in the checkpoint's own --data_dir)")
    return p


def main(argv=None):
    a = arg_parser().parse_args(argv)
    check_args(a)
    with play_threads(a):
        return run(a)


@contextlib.contextmanager
def play_threads(a):
    """Play computes one small frame at a time: on a CPU it runs on one thread (OMP_NUM_THREADS=N chooses another
    number). On the 2-core CPU one thread ran ~13% slower than two alone, and 60x faster beside another busy process,
    where two threads wait on each other at every operation (42.6 against 0.7 frames/s, 2026-12-04)."""
    threads = torch.get_num_threads()
    if (a.play or a.bench_play) and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(a):
    """What the checked flags ask for: a GIF of held-out rollouts, play, or play's frames per second."""
    device, _, why = pick_device(a.device)
    model, ck = load_model(a.ckpt, device)
    if a.data_dir:                                                        # (the corpus is the same wherever it is cached)
        ck["data"]["data_dir"] = os.path.abspath(a.data_dir)
    sampling = sampling_args(a, ck)
    if a.play or a.bench_play:
        return play(a, model, ck, device, why, sampling)
    blind = ck.get("adapter") == "none"
    if blind:
        print(f"note: {a.ckpt} has no action module (adapter 'none'): its rollouts under other actions are the same"
              + (", so --actions is not read" if a.actions else ""))
    acts = parse_actions(a.actions, ck["spec"], a.horizon) if a.actions and not blind else None
    n, H = compare_gif(model, ck, a.out, a.n, a.horizon, a.seed, device, acts, **sampling)
    print(f"wrote {a.out}: {n} held-out episode{'s' * (n != 1)} of {source(ck)}" +
          (f" ({a.n} asked: the held-out split holds {n})" if n < a.n else "") + f", {H} frames" +
          (f" ({a.horizon} asked: the held-out episodes hold {H} after the context)" if H < a.horizon else "") + f" ({why})")


def sampling_args(a, ck):
    """The sampler's settings: the flags given, else those the checkpoint was evaluated with (train.py's
    --sample_steps, --temperature, --top_k), else 4 Euler steps and the most likely code. A note for flags the
    checkpoint's backbone does not read."""
    trained = ck["config"]
    ignored = [f for f, v in ((("--steps", a.steps),) if ck["backbone"] == "ar" else
                              (("--temperature", a.temperature), ("--top_k", a.top_k))) if v is not None]
    if ignored:
        print(f"note: {a.ckpt} holds the '{ck['backbone']}' backbone, which samples without {', '.join(ignored)}: ignored")
    return dict(steps=a.steps or trained.get("sample_steps") or 4,
                temperature=(trained.get("temperature") or 0.0) if a.temperature is None else a.temperature,
                top_k=(trained.get("top_k") or 0) if a.top_k is None else a.top_k)


def source(ck):
    """Where a checkpoint's episodes came from, for messages: its environment, else its --data folder."""
    d = ck["data"]
    return f"'{d['env']}'" if d["env"] else f"the folder {d.get('folder') or d.get('free_folder')}"


def check_args(a):
    """The flags that need no checkpoint, checked before one is loaded."""
    if not a.ckpt:
        raise UserError("--ckpt is required: a checkpoint written by train.py")
    if a.n < 1 or a.horizon < 1 or (a.steps is not None and a.steps < 1):
        raise UserError(f"--n, --steps and --horizon must be at least 1 (got {a.n}, {'unset' if a.steps is None else a.steps}, {a.horizon})")
    if a.n > 64:
        raise UserError(f"--n {a.n}: one GIF shows 64 episodes at most (a row each); pass fewer")
    if (a.temperature or 0) < 0 or (a.top_k or 0) < 0:
        raise UserError(f"--temperature and --top_k must be 0 or more (got {a.temperature}, {a.top_k})")
    if a.keys is not None and not a.play:
        raise UserError("--keys plays a scripted game: add --play (and --out FILE.gif)")
    if a.keymap and not (a.play or a.bench_play):
        raise UserError("--keymap rebinds the keys of --play: add --play")
    if a.data_dir:
        check_folder(a.data_dir, "--data_dir", "generated corpora")
    if a.bench_play or (a.play and a.keys is None):                       # nothing to write (the window shows it)
        return
    check_out_file(a.out, "--out", ".gif")
    if a.keys is not None and (bad := [k for k in (k.strip() for k in a.keys.split(",")) if k not in KEYS]):
        raise UserError(f"--keys '{a.keys}': {', '.join(map(repr, bad))} {'is not a key' if len(bad) == 1 else 'are not keys'}: use {', '.join(KEYS)}")


def parse_keymap(text, spec):
    """'left=0;down=1' (ids) or 'left=-1,0;up=0,-1' (vectors) -> {key: action}, the keys it names rebound."""
    discrete, n, A = spec["discrete"], spec["n_actions"], spec["action_dim"]
    want = f"an id in [0, {n})" if discrete else f"{A} number{'s' * (A > 1)} in [-1, 1] between commas"
    keymap = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        key, _, action = (x.strip() for x in pair.partition("="))
        try:
            v = [float(x) for x in action.split(",")]
        except ValueError:
            v = []
        ok = key in KEYS and (len(v) == 1 and v[0].is_integer() and 0 <= v[0] < n if discrete else
                              len(v) == A and all(-1 <= x <= 1 for x in v))
        if not ok:
            raise UserError(f"--keymap '{text}': '{pair}' is not key=action with a key among {', '.join(KEYS)} and "
                            f"the action {want}, e.g. left=0;down=1 (ids) or left=-1,0 (vectors)")
        keymap[key] = int(v[0]) if discrete else v
    return keymap


def play(a, model, ck, device, why, sampling):
    if ck.get("adapter") == "none":
        print(f"note: {a.ckpt} has no action module (adapter 'none'): the keys do not change what it generates")
    player = Player(model, ck, device, a.seed, parse_keymap(a.keymap, ck["spec"]), **sampling)
    print("keys: " + ", ".join(f"{k} -> {player.keys[k]}" for k in KEYS if k in player.keys) + " (actions of " + source(ck) +
          "; --keymap rebinds them)")
    S = model.backbone.cfg.size
    if a.bench_play:
        how = "codes one by one" if isinstance(model.backbone, VideoGPT) else f"{sampling['steps']} Euler steps"
        print(f"play: {bench_play(player):.1f} frames/s ({S}x{S} frames, {how}, {why})")
    elif a.keys is not None:
        keys = [k.strip() for k in a.keys.split(",")]                     # (check_args: every one a key)
        play_keys(player, keys, a.out)
        print(f"wrote {a.out}: {len(keys)} frames played in {source(ck)} by keys ({why})")
    else:
        play_window(player)


if __name__ == "__main__":
    run_cli(main)
