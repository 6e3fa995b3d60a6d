"""train.py — the DWS recipe: pre-train a video model on action-free clips, attach the action adapter,
fine-tune on action-labelled clips, evaluate, save.

    python train.py --backbone dit                  # the whole recipe, preset picked by device
    python train.py --backbone ar                   # the same with the VQ tokenizer + video GPT
    python train.py --env pusher --adapter input    # another world, the input-level baseline
    python train.py --stage scratch                 # no pre-training: adapter from the start
    python train.py --resume --out out              # continue a stopped run (Ctrl-C saves first)
    torchrun --nproc_per_node=2 train.py            # the same recipe over 2 processes (DDP)

Stages and the files they write in --out:
    tokenizer  (--backbone ar) the per-frame VQ tokenizer on action-free frames -> tokenizer.pt
    pretrain   action-free corpus, no adapter                     -> pretrain.pt
    finetune   action-labelled corpus, adapter attached to the    -> ckpt.pt, metrics.json, rollout.gif
               pre-trained backbone (from pretrain.pt or --init_from)
    scratch    action-labelled corpus, adapter from step 0        -> ckpt.pt, metrics.json, rollout.gif
    all        pretrain, then finetune (the default)
"""
import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from envs import (ABOVE_0, AT_LEAST_0, AT_LEAST_1, AT_LEAST_2, FRACTION, GymEnv, Stopped, UserError, action_space,
                  check_folder, check_size, claimed, keys_for, locate_agent, make_env, run_cli)
from data import ClipSampler, DataConfig, behaviour_policy, load_corpus, read_meta, spread_clips, to_float, to_uint8
from model import (ARConfig, BACKBONES, VideoGPT, forward_flops, make_generator, make_tokenizer, peak_flops,
                   pick_device, seeded, tokenizer_flops)
from adapter import ADAPTERS
from loss import LOSSES, NOISE, clean_prefix
from sample import CKPT_FORMAT, build_model, compare_gif, read_checkpoint, read_world_model, rollout


def opt(default, help, valid=None):
    """A config field: its default, its --help text, and what values it may take (envs.AT_LEAST_1 ...; None: any);
    parse_config checks every flag against its own."""
    return field(default=default, metadata={"help": help, "valid": valid})


@dataclass
class TrainConfig:
    backbone: str = opt("dit", "the video backbone: " + ", ".join(BACKBONES))
    env: str = opt("coin", "where the episodes come from: coin, pusher (built in), gym:<gymnasium id> (e.g. "
                           "gym:ALE/Breakout-v5), procgen:<game> (e.g. procgen:coinrun)")
    data: str = opt("", "a folder of labelled episodes to train on instead of --env (python data.py --record, or your "
                        "own: the format is in `python data.py --help`)")
    pretrain_data: str = opt("", "a folder of episodes whose frames pre-train the backbone (no actions needed; "
                                 "default: the frames of --data, or generated in --env)")
    stage: str = opt("all", "pretrain | finetune | scratch | all (pretrain then finetune)")
    adapter: str = opt("film", "action conditioning: film (DWS) | input (input-level baseline) | none")
    freeze_backbone: bool = opt(False, "fine-tune the adapter only, the backbone frozen")
    motion_weight: float = opt(None, "strength c of the motion-reinforced loss (0 turns it off; default: the preset's, "
                                     "README: why 0 on the built-in worlds)", AT_LEAST_0)
    motion_temp: float = opt(0.05, "softmax temperature of the motion weights", ABOVE_0)
    distance: str = opt(None, "dit: the pixel loss, mse (posterior mean) | l1 (posterior median: unchanged pixels stay "
                              "exactly unchanged); default: the preset's")
    preset: str = opt("auto", "size preset: tiny (CPU, built-in worlds) | games (CPU, 64x64 games) | gpu (one GPU) | "
                              "auto (gpu on CUDA, else games for gym:/procgen:/64-px data, else tiny)")
    init_from: str = opt("", "a checkpoint whose backbone starts the finetune stage")
    tokenizer: str = opt("", "--backbone ar: reuse the tokenizer of this checkpoint (tokenizer.pt or any ar checkpoint) "
                             "instead of training one")
    out: str = opt("out", "output folder: checkpoints, metrics.json, rollout.gif, train.log")
    resume: bool = opt(False, "continue the run in --out from its checkpoints")
    seed: int = opt(0, "random seed (data, initialisation, noise)", AT_LEAST_0)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = opt(True, "torch.compile the training step (CUDA only)")
    max_iters: int = opt(0, "iterations per stage (0: the preset's)", AT_LEAST_0)
    # --- filled in by the preset unless given
    size: int = opt(None, "frame size in pixels", AT_LEAST_1)
    patch: int = opt(None, "dit: patch size", AT_LEAST_1)
    margin: int = opt(None, "dit: pixels around its patch each token also sees", AT_LEAST_0)
    down: int = opt(None, "ar: the tokenizer halves each frame this many times", AT_LEAST_0)
    codes: int = opt(None, "ar: codebook size", AT_LEAST_2)
    reach: int = opt(None, "ar: each code also sees this many cells around it in the frame before", AT_LEAST_0)
    tokenizer_iters: int = opt(None, "ar: iterations of the tokenizer stage", AT_LEAST_0)
    width: int = opt(None, "transformer width", AT_LEAST_1)
    depth: int = opt(None, "transformer blocks", AT_LEAST_1)
    heads: int = opt(None, "attention heads", AT_LEAST_1)
    clip_len: int = opt(None, "frames per training clip (context + denoised)", AT_LEAST_2)
    denoise_frames: int = opt(1, "dit: frames each training clip denoises after its clean context (loss.py): 1, the next "
                                 "frame, what frame-by-frame rollouts ask; n > 1 also teaches n frames at once, at a cost "
                                 "in control (README: Real games)", AT_LEAST_1)
    batch_size: int = opt(None, "clips per batch", AT_LEAST_1)
    lr: float = opt(None, "peak learning rate", ABOVE_0)
    pretrain_iters: int = opt(None, "iterations of the pretrain stage", AT_LEAST_0)
    finetune_iters: int = opt(None, "iterations of the finetune / scratch stage", AT_LEAST_0)
    n_free: int = opt(None, "episodes in the action-free corpus (some are held out)", AT_LEAST_2)
    n_labelled: int = opt(None, "episodes in the action-labelled corpus (some are held out)", AT_LEAST_2)
    episode_len: int = opt(None, "steps per generated episode", AT_LEAST_2)
    frame_skip: int = opt(0, "gym: repeat each action this many frames; 0: the game's default (about 25 actions a "
                             "second of game time for rendered games such as CartPole: 2; 1 for Atari v5 ids, which skip 4 "
                             "themselves; 4 for NoFrameskip-v4 ids)", AT_LEAST_0)
    # --- the rest
    warmup: int = opt(100, "learning-rate warm-up iterations (at most half a stage's)", AT_LEAST_0)
    min_lr_frac: float = opt(0.1, "cosine decay ends at lr * this", FRACTION)
    weight_decay: float = opt(0.01, "AdamW weight decay", AT_LEAST_0)
    grad_clip: float = opt(1.0, "gradient-norm clip", ABOVE_0)
    ema: float = opt(0.999, "EMA decay of the evaluation weights", (lambda v: 0 <= v < 1, "0 or more and below 1"))
    horizon: int = opt(8, "frames rolled out in evaluation", AT_LEAST_1)
    eval_clips: int = opt(96, "held-out clips in evaluation", AT_LEAST_1)
    sample_steps: int = opt(4, "dit: Euler steps per generated frame", AT_LEAST_1)
    temperature: float = opt(None, "ar: sampling temperature (0: the most likely code)", AT_LEAST_0)
    top_k: int = opt(None, "ar: sample from the k most likely codes (0: all)", AT_LEAST_0)
    log_interval: int = opt(50, "iterations between log lines", AT_LEAST_1)
    ckpt_seconds: float = opt(60.0, "seconds between checkpoints", AT_LEAST_0)
    data_dir: str = opt("data_cache", "where generated corpora are cached")


PRESETS = {   # shared fields, then each backbone's own
    "tiny": dict(size=32, width=128, depth=4, heads=4, clip_len=2, batch_size=32, lr=1e-3, n_free=1024, n_labelled=1536,
                 episode_len=32, motion_weight=0.0, distance="mse",
                 dit=dict(patch=4, margin=4, pretrain_iters=1000, finetune_iters=2000, expect="8-20 min on a 2-core CPU"),
                 ar=dict(down=2, codes=512, reach=1, tokenizer_iters=2000, pretrain_iters=800, finetune_iters=3000,
                         temperature=0.0, top_k=0, expect="15-30 min on a 2-core CPU")),
    "games": dict(size=64, width=128, depth=4, heads=4, clip_len=3, batch_size=32, lr=1e-3, n_free=512, n_labelled=768,
                  episode_len=32, motion_weight=4.0, distance="mse",
                  dit=dict(patch=8, margin=4, pretrain_iters=500, finetune_iters=1200, expect="17-19 min on a 2-core CPU"),
                  ar=dict(down=3, codes=512, reach=1, tokenizer_iters=1000, pretrain_iters=400, finetune_iters=1200,
                          temperature=0.0, top_k=0, expect="25-45 min on a 2-core CPU")),
    "gpu": dict(size=64, width=384, depth=8, heads=6, clip_len=6, batch_size=64, lr=5e-4, n_free=8192, n_labelled=2048,
                episode_len=32, motion_weight=0.0, distance="mse",
                dit=dict(patch=4, margin=4, pretrain_iters=8000, finetune_iters=8000, expect="see README for the time on one GPU"),
                ar=dict(down=2, codes=1024, reach=2, tokenizer_iters=5000, pretrain_iters=8000, finetune_iters=8000,
                        temperature=1.0, top_k=0, expect="see README for the time on one GPU")),
}


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_bool(text):
    if text.lower() not in BOOL_WORDS:
        raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(BOOL_WORDS)}")
    return BOOL_WORDS[text.lower()]


def parse_config(cls, doc, argv=None):
    """A command line from a config dataclass: one flag per field, its help from the field's metadata; --flag alone
    sets a bool, --flag false clears it."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        typ = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
        own = "default:" in f.metadata["help"]                                 # the help says its own default
        default = "" if own else " (default: the preset's)" if f.default is None else f" (default {f.default!r})"
        if typ is bool:
            p.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=f.default,
                           help=f.metadata["help"] + default)
        else:
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f.metadata["help"] + default)
    args = vars(p.parse_args(argv))
    for f in fields(cls):
        ok, words = f.metadata.get("valid") or (None, "")
        if ok and args[f.name] is not None and not ok(args[f.name]):
            raise UserError(f"--{f.name} {args[f.name]}: must be {words} ({f.metadata['help']})")
    cfg = cls(**args)
    check_backbone_flags(cfg)
    return cfg


def check_backbone_flags(cfg):
    """A flag of one backbone (its help begins 'dit:' or 'ar:') given to a run of the other: a UserError naming it."""
    for f in fields(cfg) if cfg.backbone in BACKBONES else ():          # (an unknown one is refused by name later)
        kind = f.metadata["help"].split(":", 1)[0]
        if kind in BACKBONES and kind != cfg.backbone and getattr(cfg, f.name) != f.default:
            raise UserError(f"--{f.name} is for --backbone {kind}, and this run's backbone is {cfg.backbone}: drop it")


def parse_args(argv=None):
    return parse_config(TrainConfig, __doc__, argv)


def check_model_flags(cfg):
    """The preset-filled model and loss flags, checked together: a one-line UserError for any that cannot work."""
    if cfg.distance not in ("mse", "l1"):
        raise UserError(f"--distance '{cfg.distance}': choose mse or l1")
    if cfg.denoise_frames >= cfg.clip_len:                               # (a dit flag: check_backbone_flags)
        raise UserError(f"--denoise_frames {cfg.denoise_frames}: must be below --clip_len {cfg.clip_len} (a clip "
                        f"keeps one clean context frame at least)")
    if cfg.clip_len < 2:
        raise UserError(f"--clip_len {cfg.clip_len}: a clip needs a context frame and a frame to predict, pass 2 or more")
    if cfg.width % cfg.heads:
        raise UserError(f"--width {cfg.width} is not a multiple of --heads {cfg.heads}: each head takes an equal share")
    if cfg.backbone == "ar" and cfg.size % 2 ** cfg.down:
        fit = [d for d in range(cfg.down, -1, -1) if cfg.size % 2 ** d == 0][0]
        raise UserError(f"frame size {cfg.size} (--size, or the --data frames') is not a multiple of 2^--down = "
                        f"{2 ** cfg.down}: the tokenizer halves each frame --down times; pass --down {fit} or --size "
                        f"{max(2 ** cfg.down, round(cfg.size / 2 ** cfg.down) * 2 ** cfg.down)}")
    if cfg.backbone == "dit" and cfg.size % cfg.patch:
        tile = math.lcm(8, cfg.patch)                                    # (frames are a multiple of 8: check_size)
        fit = max(2 * tile if tile < 16 else tile, round(cfg.size / tile) * tile)
        raise UserError(f"frame size {cfg.size} (--size, or the --data frames') is not a multiple of --patch {cfg.patch}: "
                        f"patches tile the frame; pass --size {fit} (frames are resized) or another --patch")


TOKENIZER_ARGS = ("size", "channels", "down", "codes", "code_dim", "tok_width")    # what a --tokenizer fixes


def adopt_model_args(cfg):
    """The model flags a starting checkpoint fixes: all of --init_from's (frame size, context, widths), the tokenizer's
    of --tokenizer (frame size, codes). A flag given otherwise is a UserError, before the preset fills the rest.
    Returns the names of the flags it set."""
    fixed = set()
    for flag, path in (("--init_from", cfg.init_from), ("--tokenizer", cfg.tokenizer if cfg.backbone == "ar" else "")):
        if not path:
            continue
        ck = read_world_model(path, flag) if flag == "--init_from" else read_checkpoint(path)
        if ck["backbone"] != cfg.backbone:                                    # (plan_stages says which file to pass)
            continue
        for k, v in ck["model_args"].items():
            if flag == "--tokenizer" and k not in TOKENIZER_ARGS:
                continue
            if getattr(cfg, k, None) not in (None, v):
                raise UserError(f"--{k} {getattr(cfg, k)} but {flag} {path} was trained with {v}: drop --{k} (the "
                                f"--data frames are resized to the model's), or start from scratch")
            if hasattr(cfg, k):
                setattr(cfg, k, v)
                fixed.add(k)
    return fixed


def adopt_folder(cfg, fixed):
    """--data: the environment, frame size and frame skip its meta.json records, checked against the flags given
    (a size taken from the folder joins `fixed`: not a change of the preset)."""
    if not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data}: not a folder; pass the folder of .npz shards and meta.json "
                        f"(python data.py --record ENV --out DIR writes one)")
    meta = read_meta(cfg.data)
    if meta.get("env") and cfg.env not in ("coin", meta["env"]):           # coin: the default, not asked for
        raise UserError(f"--env {cfg.env} but --data {cfg.data} was recorded in {meta['env']}: drop --env")
    if meta.get("env"):                                                    # the control measure replays it
        try:
            spec = make_env(meta["env"]).spec
        except UserError as e:
            raise UserError(f"{os.path.join(cfg.data, 'meta.json')}: its env cannot be made here ({e}): fix it, "
                            f"or remove the key (then control is measured by shuffled actions only)") from None
        if meta.get("spec") and action_space(meta["spec"]) != action_space(spec):
            raise UserError(f"{os.path.join(cfg.data, 'meta.json')}: its spec {meta['spec']} is not the action space "
                            f"of its env {meta['env']} ({action_space(spec)}): fix the spec, or the env")
    if cfg.size is None and meta.get("size"):                             # the folder's size, not a change
        fixed.add("size")
    cfg.env, cfg.size = meta.get("env") or "", cfg.size or meta.get("size")
    if cfg.frame_skip and meta.get("frame_skip") not in (None, cfg.frame_skip):
        raise UserError(f"--frame_skip {cfg.frame_skip} but --data {cfg.data} was recorded with frame_skip "
                        f"{meta['frame_skip']} (its meta.json): drop --frame_skip")
    cfg.frame_skip = cfg.frame_skip or meta.get("frame_skip") or 0    # as recorded (the control measure replays it)


def resolve(cfg, device):
    """Check the names and fill the preset's fields; returns the expected-time note."""
    if cfg.backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{cfg.backbone}': choose one of {', '.join(BACKBONES)}")
    fixed = adopt_model_args(cfg)
    unused = [f"--{k}" for k in ("n_labelled", "n_free", "episode_len") if getattr(cfg, k) is not None and
              (cfg.data or (k == "n_free" and cfg.pretrain_data))]
    if unused:
        raise UserError(f"{', '.join(unused)} {'sets' if len(unused) == 1 else 'set'} the generated corpus, and the episodes come from "
                        f"{'--data' if cfg.data else '--pretrain_data'}: drop {', '.join(unused)}")
    if cfg.data:                                      # episodes from a folder: its meta.json says where they came from
        adopt_folder(cfg, fixed)
    else:                                             # 0: the game's own frame skip, stored as the number it is
        cfg.frame_skip = make_env(cfg.env, frame_skip=cfg.frame_skip).frame_skip
    check_folder(cfg.out, "--out", "the checkpoints, metrics and log")
    check_folder(cfg.data_dir, "--data_dir", "the generated corpora")
    if cfg.adapter not in ADAPTERS:
        raise UserError(f"unknown adapter '{cfg.adapter}': choose one of {', '.join(ADAPTERS)}")
    if cfg.stage not in ("pretrain", "finetune", "scratch", "all"):
        raise UserError(f"unknown stage '{cfg.stage}': choose pretrain, finetune, scratch or all")
    game = ":" in cfg.env or (cfg.size or 0) >= 64
    name = cfg.preset if cfg.preset != "auto" else "gpu" if device.type == "cuda" else "games" if game else "tiny"
    if name not in PRESETS:
        raise UserError(f"unknown preset '{cfg.preset}': choose one of auto, {', '.join(PRESETS)}")
    cfg.preset = name
    preset = {k: v for k, v in PRESETS[name].items() if not isinstance(v, dict)} | PRESETS[name][cfg.backbone]
    stages = [f"--{k}" for k in ("tokenizer_iters", "pretrain_iters", "finetune_iters") if getattr(cfg, k) is not None]
    if cfg.max_iters and stages:
        raise UserError(f"--max_iters sets every stage's iterations, and so do {', '.join(stages)}: pass one or the other")
    for k, v in preset.items():
        if k != "expect" and getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if not cfg.data:                                  # the worlds and games render these sizes (a folder is resized)
        check_size(cfg.size, "--size ")
    check_model_flags(cfg)
    if cfg.max_iters:
        cfg.pretrain_iters = cfg.finetune_iters = cfg.max_iters
        cfg.tokenizer_iters = cfg.tokenizer_iters and cfg.max_iters
    derived = {"pretrain_iters", "finetune_iters", "tokenizer_iters"} if cfg.max_iters else set()   # --max_iters set them
    changed = [k for k in preset if k != "expect" and k not in fixed | derived and getattr(cfg, k) != preset[k]]
    changed += ["max_iters"] if cfg.max_iters else []
    expect = preset["expect"] if name != "gpu" or device.type == "cuda" else \
        f"made for a CUDA GPU: on this {device.type} its defaults take many hours; --preset tiny or games fit a CPU"
    return expect + (f" at its defaults; changed here: --{', --'.join(changed)}" if changed else "")


# ----------------------------------------------------------------------------------------------
# evaluation

def psnr(pred, true):
    """Per clip: (B, T, C, S, S) in [-1, 1] -> (B,) dB over all frames. A perfect clip would score infinity: the
    error is floored at half a grey level of an 8-bit frame, (0.5/255)^2, the finest an 8-bit video can show (54 dB)."""
    mse = ((pred - true) / 2).pow(2).flatten(1).mean(1).clamp(min=(0.5 / 255) ** 2)
    return -10 * torch.log10(mse)


def ssim(pred, true, win=7, sigma=1.5):
    """Mean SSIM per clip with a Gaussian window, on images in [0, 1]: (B, T, C, S, S) -> (B,)."""
    B, T, C, S, _ = pred.shape
    x, y = ((pred + 1) / 2).reshape(-1, C, S, S), ((true + 1) / 2).reshape(-1, C, S, S)
    g = torch.exp(-(torch.arange(win, dtype=x.dtype, device=x.device) - win // 2) ** 2 / (2 * sigma ** 2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].repeat(C, 1, 1, 1)
    f = lambda z: torch.nn.functional.conv2d(z, k, groups=C)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)


def position_error(pred, true, agent_size):
    """Mean pixel distance of the controlled object in predicted vs true frames, over frames where it is found
    in both; also the fraction of predicted frames where it cannot be found."""
    pp, fp = locate_agent(to_uint8(pred), agent_size)
    pt, ft = locate_agent(to_uint8(true), agent_size)
    both = fp & ft
    err = np.linalg.norm(pp - pt, axis=-1)[both].mean() if both.any() else float("nan")
    return float(err), float(1 - fp[ft].mean()) if ft.any() else float("nan")


@torch.no_grad()
def evaluate(model, cfg, data, device):
    """Roll out `horizon` frames from held-out contexts spread over every held-out episode; compare with the truth
    under the recorded and under shuffled actions. Draws only from generators of its own: evaluating changes nothing."""
    model.eval()
    k = model.backbone.cfg.clip_len - 1
    e, s = spread_clips(data.test["lengths"], k + cfg.horizon, cfg.eval_clips)
    clips = ClipSampler(data.test, k + cfg.horizon).clips(e, s)
    x, a = clips["frames"].to(device), clips["actions"].to(device)
    true = x[:, k:]
    perm = torch.randperm(len(a), generator=make_generator("cpu", 0)).to(device)
    runs = {}
    for name, acts in (("", a), ("_shuffled", torch.cat([a[:, :k], a[perm, k:]], 1))):
        runs[name] = eval_rollout(model, x[:, :k], acts, cfg, device)       # same noise for both: only actions differ
    runs["_copy_last"] = x[:, k - 1:k].expand_as(true)
    m = {}
    env = make_env(cfg.env) if cfg.env else None                         # (a --data folder may not say where it came from)
    for name, pred in runs.items():
        m["psnr" + name] = psnr(pred, true).mean().item()
        m["ssim" + name] = ssim(pred.cpu(), true.cpu()).mean().item()
        if env is not None and env.agent_size:
            m["pos_err" + name], m["pos_missing" + name] = position_error(pred, true, env.agent_size)
    if isinstance(model.backbone, VideoGPT):
        tok = model.backbone.tokenizer
        m["tokenizer_psnr"] = psnr(tok.decode(tok.encode(true)), true).mean().item()
    if env is not None and env.restorable and model.spec is not None and action_space(model.spec) != action_space(env.spec):
        m["control"] = f"not measured: the model takes no actions of {cfg.env} (it was trained on frames only)"
    elif env is not None and env.restorable:
        m.update(control_eval(model, cfg, k, device))
    else:
        m["control"] = "no simulator to restore: psnr - psnr_shuffled (the shuffled-actions gap) measures control"
    m.update(horizon=cfg.horizon, clips=len(x), clips_asked=cfg.eval_clips, episodes=len(set(e.tolist())), context=k,
             **sampling(cfg))
    return m


def eval_rollout(model, context, actions, cfg, device, batch=256):
    """rollout() in batches of `batch` clips (memory stays bounded at any --eval_clips), all drawing from one generator
    seeded cfg.seed: every call draws the same noise, and a single batch draws what one rollout() call would."""
    g, n = make_generator(device, cfg.seed), len(actions)
    return torch.cat([rollout(model, context[i:i + batch], actions[i:i + batch], generator=g, **sampling(cfg))
                      for i in tqdm(range(0, n, batch), desc="evaluating", unit="batch", leave=False,
                                    disable=None if n > batch else True)])


def counterfactuals(cfg, k, n):
    """n start states of cfg.env (seeds apart from the training corpora), reached by the behaviour policy, each with
    its k context frames and the actions that led into them, two action sequences from there (A: the policy's own;
    A': another start state's) and the true frames under each, from the same restored state.
    -> context (n, k, S, S, 3) uint8, ctx_actions (n, k[, A]), A, A' (n, H[, A]), truth_A, truth_A' (n, H, S, S, 3)."""
    copies = min(n, GymEnv.max_copies if cfg.env.startswith("gym:") else n)   # (games: a few copies, reused)
    env = make_env(cfg.env, num=copies, size=cfg.size, max_steps=10 ** 6, seed=10 ** 6 + cfg.seed, frame_skip=cfg.frame_skip)
    policy = behaviour_policy(env, DataConfig(env=cfg.env), np.random.default_rng(10 ** 6 + cfg.seed))
    parts, have = [], 0
    for _ in range(16 * -(-n // copies)):             # copies whose episode ends on the way are left out: more batches
        parts.append(counterfactual_batch(env, policy, k, cfg.horizon))
        have += len(parts[-1][0])
        if have >= n:
            break
    return tuple(np.concatenate([p[i] for p in parts])[:n] for i in range(6))


def counterfactual_batch(env, policy, k, horizon):
    """counterfactuals for env.num start states at once (copies whose episode ended on the way are left out)."""
    obs, _ = env.reset()
    frames, acts, ended = [obs], [], np.zeros(env.num, bool)
    for t in range(k + 8):                                               # into the game, past its first frames
        acts.append(policy(obs, t))
        obs, _, term, _, _ = env.step(acts[-1])
        frames.append(obs); ended |= term
    start, A, truth_A = env.get_state(), [], []
    for t in range(horizon):
        A.append(policy(obs, t))
        obs, *_ = env.step(A[-1]); truth_A.append(obs)
    A = np.stack(A, 1)
    A_other = np.roll(A, 1, 0)                                           # another start state's actions
    env.set_state(start)
    truth_B = np.stack([env.step(A_other[:, t])[0] for t in range(horizon)], 1)
    keep = ~ended                                                        # an episode that ended has no future to compare
    return (np.stack(frames[-k:], 1)[keep], np.stack(acts[-k:], 1)[keep], A[keep], A_other[keep],
            np.stack(truth_A, 1)[keep], truth_B[keep])


def masked_psnr(pred, true, mask):
    """PSNR per clip over the pixels of mask: pred, true (B, H, C, S, S) in [-1, 1]; mask (B, H, S, S) -> (B,) dB."""
    err = ((pred - true) / 2).pow(2).mean(2)                             # (B, H, S, S)
    mse = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    return -10 * torch.log10(mse.clamp(min=(0.5 / 255) ** 2))


@torch.no_grad()
def control_eval(model, cfg, k, device):
    """Control where it happens, without a reserved colour (for environments that restore their state): from one
    start state the true environment runs under actions A and under A' (counterfactuals); the pixels where the two
    truths differ, widened by one pixel so that a one-pixel shift counts, are the ones the actions decide.
        control_psnr        PSNR on those pixels, the model under A against the truth under A, and A' against A'
        control_psnr_wrong  the same pixels, the model under A' against the truth under A, and A against A'
        control_pixels      the mean fraction of pixels the actions decide
        control_gap_by_step the gap at each rolled-out frame alone: where along the horizon control is kept or lost
    A model that ignores actions scores the same on both; the gap is control."""
    ctx, ctx_a, A, A_other, truth_A, truth_B = counterfactuals(cfg, k, cfg.eval_clips)
    if len(ctx) == 0:
        return dict(control=f"not measured: every episode of the behaviour policy ended in the {k + 8} steps that lead "
                            f"to a start state, so there was no future to compare")
    x, tA, tB = (to_float(f, device) for f in (ctx, truth_A, truth_B))
    tensor = lambda a: torch.as_tensor(a, device=device)
    pred_A, pred_B = (eval_rollout(model, x, torch.cat([tensor(ctx_a), tensor(acts)], 1), cfg, device) for acts in (A, A_other))
    diff = torch.as_tensor(np.abs(truth_A.astype(np.int16) - truth_B).max(-1) > 8, device=device).float()   # (n, H, S, S)
    mask = F.max_pool2d(diff.flatten(0, 1)[:, None], 3, 1, 1)[:, 0].view(diff.shape)
    some = mask.flatten(1).sum(1) > 0                                    # clips where the actions changed anything
    if not some.any():
        return dict(control=f"not measured: the actions changed no pixel in {cfg.horizon} steps from any of {len(ctx)} "
                            f"start states {k + 8} steps into the game (some games ignore actions at first): raise "
                            f"--horizon, and --episode_len so that training sees the steps where they matter",
                    control_pixels=0.0, control_clips=0)
    def gap(h):                                       # frames h (a slice), over the clips where the actions decide any
        right = (masked_psnr(pred_A[:, h], tA[:, h], mask[:, h]) + masked_psnr(pred_B[:, h], tB[:, h], mask[:, h])) / 2
        wrong = (masked_psnr(pred_B[:, h], tA[:, h], mask[:, h]) + masked_psnr(pred_A[:, h], tB[:, h], mask[:, h])) / 2
        some = mask[:, h].flatten(1).sum(1) > 0
        return (right[some].mean().item(), wrong[some].mean().item()) if some.any() else (None, None)
    right, wrong = gap(slice(None))
    steps = [gap(slice(h, h + 1)) for h in range(mask.shape[1])]
    return dict(control_psnr=right, control_psnr_wrong=wrong, control_pixels=mask.mean().item(), control_clips=int(some.sum()),
                control_gap_by_step=[None if r is None else round(r - w, 3) for r, w in steps])   # None: no pixel decided


def sampling(cfg):
    """The sampler's settings, as rollout() takes them."""
    return dict(steps=cfg.sample_steps, temperature=1.0 if cfg.temperature is None else cfg.temperature,
                top_k=cfg.top_k or 0)


# ----------------------------------------------------------------------------------------------
# processes, checkpoints, signals

class Dist:
    """This process's place in a `torchrun` job (DDP: nccl on CUDA, gloo on the CPU); a plain run is a job of one.
    Every process draws the same global batch and the same noise and trains on its own rows of them, so the
    averaged gradient is the one a single process would compute on the whole batch: exactly for the GPT, and for the DiT
    at --denoise_frames 1 (one denoised frame per clip); with more, each process divides its DiT loss by its own count
    of denoised frames, so frames are weighted slightly differently from a single process's mean over the whole batch."""

    def __init__(self, device_name, alone=False):
        env = {} if alone else os.environ
        self.world, self.rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0))
        self.main = self.rank == 0
        if self.world > 1 and device_name in ("auto", "cuda") and torch.cuda.is_available():
            device_name = f"cuda:{os.environ['LOCAL_RANK']}"
        self.device_name = device_name

    def start(self, device):
        if self.world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return self

    def part(self, batch):
        """This process's rows of a global batch of `batch` clips."""
        if batch % self.world:
            raise UserError(f"--batch_size {batch} does not split over {self.world} processes: pass a multiple of {self.world}")
        b = batch // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def wrap(self, model):
        if self.world == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, x):
        """The mean of a number over the processes."""
        if self.world == 1:
            return float(x)
        t = torch.tensor(float(x), device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def any(self, *flags):
        """Each flag, true in every process if it is true in any, in one exchange (one process: no communication)."""
        if self.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return (t > 0).tolist()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def save_checkpoint(path, obj):
    """Write to a temporary file, then rename into place: a crash or kill -9 mid-write never spoils the previous
    checkpoint. Only tensors, numbers, strings, lists and dicts go in, so it loads with torch.load(weights_only=True)."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopSignals:
    """While a stage trains, SIGINT (Ctrl-C) or SIGTERM asks it to stop after the step in progress: train_loop then
    saves and exits. A second signal stops at once, as a plain Ctrl-C would."""

    def __enter__(self):
        self.signum = 0
        self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def resume_command(dist, argv=None):
    """The command line that continues this run: the same flags, --resume (and any value given to it) once, at the end."""
    launcher = "python" if dist.world == 1 else f"torchrun --nproc_per_node={dist.world}"
    args, keep = list(sys.argv if argv is None else argv), []
    for i, a in enumerate(args):
        given = i > 0 and args[i - 1] == "--resume" and a.lower() in BOOL_WORDS
        if a != "--resume" and not a.startswith("--resume=") and not given:
            keep.append(a)
    return " ".join([launcher] + [shlex.quote(a) for a in keep] + ["--resume"])


# ----------------------------------------------------------------------------------------------
# the training loop, shared by every stage

class Logger:
    def __init__(self, out, main=True):
        self.path, self.main = os.path.join(out, "train.log"), main

    def __call__(self, msg, echo=True):
        """msg to train.log and, with echo, to the terminal (rank 0 only)."""
        if self.main:
            if echo:
                tqdm.write(msg)
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def lr_at(step, cfg, iters):
    """Linear warm-up over --warmup steps (at most half the stage's, so a short run reaches the peak lr), then
    cosine decay to lr * min_lr_frac."""
    warmup = warmup_steps(cfg, iters)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, iters - warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def warmup_steps(cfg, iters):
    return min(cfg.warmup, iters // 2)


def memory_note(cfg, margs):
    """On a CPU: a note when one training step's activations would not fit in this machine's memory (the kernel then
    kills the run without a word), with a --batch_size that fits. The estimate keeps, per token and block, about 20
    floats per channel and one attention row (measured: the gpu preset's DiT at batch 4, 3.3 GB estimated, 3.8 used)."""
    cell = margs["patch"] if cfg.backbone == "dit" else 2 ** margs["down"]
    T = margs["clip_len"] * (margs["size"] // cell) ** 2                    # tokens in one clip
    per_clip = T * margs["depth"] * (20 * margs["width"] + margs["heads"] * T) * 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_clip * cfg.batch_size < 0.7 * ram:
        return ""
    fits = int(0.5 * ram // per_clip)
    return (f"note: a training step at --batch_size {cfg.batch_size} holds about {per_clip * cfg.batch_size / 2 ** 30:.0f} "
            f"GB of activations ({T} tokens a clip) and this machine has {ram / 2 ** 30:.0f} GB: it would likely be "
            f"killed; " + (f"--batch_size {fits} fits" if fits else "a smaller model or --clip_len fits"))


def throughput(flops, ms, device, world=1):
    """`flops` done in `ms` milliseconds by `world` processes, as one process's share: MFU against its device's dense
    bf16 peak where known, else GFLOP/s."""
    per_s = flops * 1000 / ms / world
    peak, name = peak_flops(device)
    return f"MFU {100 * per_s / peak:.1f}% of {name}" if peak else f"{per_s / 1e9:.1f} GFLOP/s"


def train_loop(job, cfg, dist, log):
    """Run job.step(i) from job.start to job.iters; returns the final checkpoint dict (also written to job.path).

    A log line every --log_interval steps (the loss averaged over processes, checked for NaN), a checkpoint every
    --ckpt_seconds and at the end. SIGINT or SIGTERM: the step in progress finishes, the checkpoint is written and
    the run stops with exit code 128 + signal and the command that resumes it."""
    step, t0, t_log, t_ck, losses = job.start, time.time(), time.time(), time.time(), []

    def checked_loss():
        loss = dist.mean(torch.stack(losses).mean()) if losses else float("nan")
        if losses and not math.isfinite(loss):
            raise UserError(f"the loss became {loss} in {job.name} before step {step}: lower --lr (now {cfg.lr}); the "
                            f"last good checkpoint, if any, is untouched at {job.path}")
        return loss

    def save():
        checked_loss()
        ck = job.state(step, job.elapsed + time.time() - t0)
        if dist.main:
            save_checkpoint(job.path, ck)
        return ck

    bar = tqdm(total=job.iters, initial=step, desc=job.name, disable=None if dist.main else True, dynamic_ncols=True)
    with StopSignals() as stop:
        while step < job.iters:
            losses.append(job.step(step))
            step += 1
            bar.update(1)
            if step % cfg.log_interval == 0 or step == job.iters:
                ms = 1000 * (time.time() - t_log) / len(losses)
                rate = f"{throughput(job.flops, ms, dist.device, dist.world)} | " if job.flops else ""
                log(f"{job.name} step {step:5d}/{job.iters} | loss {checked_loss():.4f} | lr {job.lr(step - 1):.2e} | "
                    f"{ms:.0f} ms/iter | {job.frames * 1000 / ms:.0f} frames/s | {rate}"
                    f"ETA {(job.iters - step) * ms / 60000:.1f} min")
                t_log, losses = time.time(), []
            stopping, due = dist.any(stop.signum, time.time() - t_ck > cfg.ckpt_seconds and step < job.iters)
            if stopping or due:                                 # decided together: a save is collective (the loss)
                save()
                t_ck = time.time()
            if stopping:
                name = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
                msg = (f"{job.name} stopped by {name} at step {step}/{job.iters}; saved {job.path}. "
                       f"Continue with: {resume_command(dist)}")
                log(msg, echo=False)                            # (the terminal gets it once, as the exit message)
                raise Stopped(msg, 128 + (stop.signum or signal.SIGTERM))
    bar.close()
    return save()


# ----------------------------------------------------------------------------------------------
# the stages

@dataclass
class Job:
    """One stage's training as train_loop runs it."""
    name: str
    path: str           # its checkpoint
    start: int          # the first step to run (> 0 when resumed)
    iters: int
    elapsed: float      # seconds trained before this process
    step: object        # i -> this step's loss (a 0-d tensor, not read back: no GPU sync)
    state: object       # (step, elapsed) -> the checkpoint dict
    lr: object          # i -> learning rate at step i
    frames: int         # frames per iteration, over all processes
    flops: float        # training FLOPs per iteration, over all processes (3x the forward)


def step_flops(backbone, B, denoise_frames=1):
    """FLOPs of one training step on B clips, 3x the forward (forward + backward): the DiT predicts the frames after
    the clean prefix (loss.clean_prefix), the token model every code, its frozen tokenizer encoding forward only."""
    T = backbone.cfg.clip_len
    if isinstance(backbone, VideoGPT):
        return 3 * B * forward_flops(backbone, T) + tokenizer_flops(backbone.tokenizer, B * T * backbone.n_tok)
    return 3 * B * forward_flops(backbone, T, last=T - clean_prefix(T, denoise_frames))


def make_optimizer(params, cfg, device):
    """AdamW with weight decay on matrices only."""
    decay = [p for p in params if p.dim() >= 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                             lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")


def stage_models(stage, cfg, ck, device, init, tokenizer):
    """The world model a stage trains, started from init's backbone (or from the tokenizer weights), and its EMA copy."""
    with seeded(cfg.seed):
        model = build_model(ck).to(device)
    if init is not None:
        p = "backbone."
        model.backbone.load_state_dict({k[len(p):]: v for k, v in init["ema"].items() if k.startswith(p)})
    elif tokenizer is not None:
        model.backbone.tokenizer.load_state_dict(tokenizer)
    if stage == "finetune" and cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model, copy.deepcopy(model).requires_grad_(False)


class StageTrainer:
    """pretrain / finetune / scratch: the world model, its EMA, optimizer, clip sampler and noise generator."""

    def __init__(self, stage, cfg, desc, device, amp, dist, init=None, resume=None, tokenizer=None):
        self.cfg, self.device, self.amp, self.dist = cfg, device, amp, dist
        self.iters = cfg.pretrain_iters if stage == "pretrain" else cfg.finetune_iters
        self.ck = dict(desc, format=CKPT_FORMAT, adapter="none" if stage == "pretrain" else cfg.adapter, stage=stage,
                       config=asdict(cfg), iters=self.iters)
        self.model, self.ema = stage_models(stage, cfg, self.ck, device, init, tokenizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("nothing to train: --freeze_backbone with --adapter none leaves no trainable weights")
        self.optim = make_optimizer(self.params, cfg, device)
        self.data = load_corpus(DataConfig(**desc["data"]), labelled=stage != "pretrain", progress=dist.main)
        self.sampler = ClipSampler(self.data.train, self.model.backbone.cfg.clip_len, seed=cfg.seed + (stage == "pretrain"))
        self.g = make_generator(device, cfg.seed + 10 + (stage == "pretrain"))
        self.start, self.elapsed = 0, 0.0
        if resume is not None:
            self.model.load_state_dict(resume["model"]); self.ema.load_state_dict(resume["ema"])
            self.optim.load_state_dict(resume["optimizer"])
            self.sampler.rng.bit_generator.state = resume["sampler"]
            if "generator" in resume:                                       # (checkpoints before 2026-11-26 lack it)
                self.g.set_state(resume["generator"])
            self.start, self.elapsed = resume["step"], resume["elapsed"]
        compiled = torch.compile(self.model) if (cfg.compile and device.type == "cuda") else self.model
        self.fwd, self.part = dist.wrap(compiled), dist.part(cfg.batch_size)

    def step(self, i):
        cfg, kind = self.cfg, self.ck["backbone"]
        for group in self.optim.param_groups:
            group["lr"] = lr_at(i, cfg, self.iters)
        batch = self.sampler.sample(cfg.batch_size)                     # the global batch, the same in every process
        noise = NOISE[kind](batch["frames"].shape, self.device, self.g, cfg.denoise_frames)
        noise = noise and {k: v[self.part] if torch.is_tensor(v) else v for k, v in noise.items()}   # this process's share
        x = batch["frames"][self.part].to(self.device, non_blocking=True)
        a = batch["actions"][self.part].to(self.device) if self.model.adapter is not None else None
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = LOSSES[kind](self.fwd, x, a, cfg.motion_weight, cfg.motion_temp, cell=self.model.backbone.cell, noise=noise,
                                distance=cfg.distance)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optim.step()
        d = min(cfg.ema, (1 + i) / (10 + i))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - d)
        return loss.detach()

    def state(self, step, elapsed):
        return dict(self.ck, model=self.model.state_dict(), ema=self.ema.state_dict(), optimizer=self.optim.state_dict(),
                    step=step, elapsed=elapsed, generator=self.g.get_state(), sampler=self.sampler.rng.bit_generator.state)

    def job(self, path, log):
        m, b = self.model, self.model.backbone
        n_adapter = sum(p.numel() for p in m.adapter.parameters()) if m.adapter is not None else 0
        adapter = f"{n_adapter / 1e6:.3f}M in the '{self.ck['adapter']}' adapter" if m.adapter is not None else "no adapter"
        warmup = warmup_steps(self.cfg, self.iters)
        log(f"--- {self.ck['stage']}: {self.iters} iters, {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters "
            f"({adapter}), {len(self.data.train['frames'])} training episodes" +
            (f", warm-up {warmup} steps (--warmup {self.cfg.warmup}: at most half the stage)" if warmup < self.cfg.warmup else "") +
            (f", {self.dist.world} processes (DDP)" if self.dist.world > 1 else ""))
        if self.start:
            log(f"resumed {self.ck['stage']} from {path} at step {self.start}/{self.iters}")
        B = self.cfg.batch_size
        return Job(self.ck["stage"], path, self.start, self.iters, self.elapsed, self.step, self.state,
                   lambda i: lr_at(i, self.cfg, self.iters), B * b.cfg.clip_len, step_flops(b, B, self.cfg.denoise_frames))


class TokenizerTrainer:
    """The tokenizer stage (--backbone ar): the per-frame VQ tokenizer (model.py) on frames of the action-free corpus,
    at a constant learning rate (measured better than a decay here). Trained by the first process alone."""

    def __init__(self, cfg, desc, device, resume=None):
        self.cfg, self.desc, self.device = cfg, desc, device
        with seeded(cfg.seed):
            self.tok = make_tokenizer(ARConfig(**desc["model_args"])).to(device)
        self.optim = torch.optim.AdamW(self.tok.parameters(), lr=2e-3, weight_decay=0.0)
        self.data = load_corpus(DataConfig(**desc["data"]), labelled=False)
        self.sampler = ClipSampler(self.data.train, 1, seed=cfg.seed + 2)
        self.g = make_generator(device, cfg.seed + 12)
        self.start, self.elapsed = 0, 0.0
        if resume is not None:
            self.tok.load_state_dict(resume["tokenizer"]); self.optim.load_state_dict(resume["optimizer"])
            self.sampler.rng.bit_generator.state = resume["sampler"]
            if "generator" in resume:                                       # (checkpoints before 2026-11-26 lack it)
                self.g.set_state(resume["generator"])
            self.start, self.elapsed = resume["step"], resume["elapsed"]

    def step(self, i):
        self.tok.train()
        loss, _ = self.tok.loss(self.sampler.sample(2 * self.cfg.batch_size)["frames"][:, 0].to(self.device), generator=self.g)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        return loss.detach()

    def state(self, step, elapsed):
        return dict(self.desc, format=CKPT_FORMAT, adapter="none", stage="tokenizer", config=asdict(self.cfg), step=step,
                    iters=self.cfg.tokenizer_iters, elapsed=elapsed, tokenizer=self.tok.state_dict(),
                    optimizer=self.optim.state_dict(), generator=self.g.get_state(), sampler=self.sampler.rng.bit_generator.state)

    def job(self, path, log):
        tok, iters = self.tok, self.cfg.tokenizer_iters
        log(f"--- tokenizer: {iters} iters, {sum(p.numel() for p in tok.parameters()) / 1e6:.2f}M parameters, "
            f"{len(tok.codebook)} codes, {self.desc['model_args']['size'] // 2 ** tok.down}^2 codes per frame")
        frames = 2 * self.cfg.batch_size
        return Job("tokenizer", path, self.start, iters, self.elapsed, self.step, self.state, lambda i: 2e-3, frames, 0.0)

    @torch.no_grad()
    def held_out_psnr(self):
        self.tok.eval()
        held = ClipSampler(self.data.test, 1, seed=0).sample(256)["frames"].to(self.device)        # (256, 1, C, S, S)
        return psnr(self.tok.decode(self.tok.encode(held)), held).mean().item()


def train_tokenizer(cfg, desc, device, log, resume=None):
    """Run (or finish) the tokenizer stage; returns its checkpoint, with its PSNR on held-out frames."""
    trainer = TokenizerTrainer(cfg, desc, device, resume)
    path = os.path.join(cfg.out, "tokenizer.pt")
    ck = train_loop(trainer.job(path, log), cfg, Dist(device.type, alone=True).start(device), log)
    ck["tokenizer_psnr"] = trainer.held_out_psnr()
    save_checkpoint(path, ck)
    tok = trainer.tok
    log(f"tokenizer: held-out psnr {ck['tokenizer_psnr']:.2f} dB, {int((tok.usage >= 1).sum())}/{len(tok.usage)} codes in use")
    return ck


def tokenizer_weights(ck, path):
    """The tokenizer state dict held by a tokenizer.pt or by any checkpoint of the ar backbone."""
    if ck["backbone"] != "ar":
        raise UserError(f"--tokenizer {path} holds a '{ck['backbone']}' model, which has no tokenizer: pass tokenizer.pt "
                        f"or a checkpoint of --backbone ar")
    if "tokenizer" in ck:
        return ck["tokenizer"]
    p = "backbone.tokenizer."
    return {k[len(p):]: v for k, v in ck["ema"].items() if k.startswith(p)}


# ----------------------------------------------------------------------------------------------
# the recipe

FILES = {"tokenizer": "tokenizer.pt", "pretrain": "pretrain.pt", "finetune": "ckpt.pt", "scratch": "ckpt.pt"}


def plan_stages(cfg):
    """The stages to run, their checkpoint files, and the checkpoints they start from; every mistake in the flags
    is caught here, before any work. -> stages, files, init, tok_from"""
    stages = {"all": ["pretrain", "finetune"], "scratch": ["scratch"], "pretrain": ["pretrain"],
              "finetune": ["finetune"]}[cfg.stage]
    tok_from = read_checkpoint(cfg.tokenizer) if cfg.tokenizer else None
    if tok_from is not None:
        if cfg.backbone != "ar":
            raise UserError(f"--tokenizer is for --backbone ar (the DiT reads pixels): drop it, or pass --backbone ar")
        tokenizer_weights(tok_from, cfg.tokenizer)                            # (a checkpoint that holds one?)
    init = read_world_model(cfg.init_from, "--init_from") if cfg.init_from else None
    if cfg.backbone == "ar" and tok_from is None and init is None and stages[0] != "finetune":
        stages = ["tokenizer"] + stages
    if init is not None:
        if init["backbone"] != cfg.backbone:
            raise UserError(f"--init_from {cfg.init_from} holds the '{init['backbone']}' backbone, not '{cfg.backbone}': "
                            f"pass --backbone {init['backbone']} or another checkpoint")
        stages = [s for s in stages if s != "pretrain"]
        if not stages:
            raise UserError("--init_from starts the finetune stage: use --stage finetune or all")
    files = {s: os.path.join(cfg.out, FILES[s]) for s in stages}
    clash = [f for f in files.values() if os.path.exists(f)]
    if clash and not cfg.resume:
        raise UserError(f"{clash[0]} already exists: pass --resume to continue that run, or choose another --out")
    if cfg.resume and not clash:
        print(f"note: --resume found no checkpoint in {cfg.out}: starting the run from the beginning")
    for i, stage in enumerate(stages if cfg.resume else []):                # every mismatch before any work
        if os.path.exists(files[stage]):
            prev = same_run(cfg, files[stage], stage)
            later = [files[s] for s in stages[i + 1:] if os.path.exists(files[s])]
            unfinished = prev["step"] < stage_iters(cfg, stage)
            if unfinished and later:
                raise UserError(f"{files[stage]} ended at step {prev['step']} and {later[0]} was built on it: "
                                f"training {stage} to {stage_iters(cfg, stage)} steps would not reach it; pass the "
                                f"run's own iterations, or start another --out from it (--init_from)")
            changed = changed_flags(cfg, prev, stage)
            if changed and (unfinished or stage == stages[-1]):               # it would go on, or end the run, without them
                raise UserError(f"{files[stage]} was trained with other flags: {', '.join(changed)}: pass the run's own, "
                                f"or start another --out from it (--init_from)")
    done = os.path.join(cfg.out, "metrics.json")                            # an evaluation this run would write over
    evaluated = read_json(done).get("stages", stages) if cfg.resume and os.path.exists(done) else stages
    if evaluated != stages:
        raise UserError(f"{done} holds the evaluation of the stages {' -> '.join(evaluated)}, not "
                        f"{' -> '.join(stages)}: pass the run's own --stage, or start another --out from it (--init_from)")
    if stages == ["finetune"] and init is None:
        pre = os.path.join(cfg.out, "pretrain.pt")
        if not os.path.exists(pre):
            raise UserError(f"the finetune stage needs a pre-trained backbone: pass --init_from CKPT or run --stage pretrain first (no {pre})")
        init = read_checkpoint(pre)
        if init.get("backbone") != cfg.backbone:
            raise UserError(f"{pre} holds the '{init.get('backbone')}' backbone, not '{cfg.backbone}': pass --backbone "
                            f"{init.get('backbone')}, or another --out")
    if tok_from is not None and init is not None:                         # its weights would be dropped unread
        raise UserError(f"--tokenizer {cfg.tokenizer} would not be used: the finetune stage starts from "
                        f"{cfg.init_from or os.path.join(cfg.out, 'pretrain.pt')}, whose backbone holds its own tokenizer; drop --tokenizer")
    return stages, files, init, tok_from


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): move it away, or pass another --out") from None


def describe(cfg, init, tok_from):
    """What every checkpoint of this run records: backbone, its config, the action spec and the data config."""
    spec = action_spec(cfg)
    margs = {f.name: getattr(cfg, f.name) for f in fields(BACKBONES[cfg.backbone][1]) if getattr(cfg, f.name, None) is not None}
    if tok_from is not None:
        margs.update({k: v for k, v in tok_from["model_args"].items() if k in TOKENIZER_ARGS})
    if init is not None:
        margs = init["model_args"]
    dcfg = DataConfig(env=cfg.env, size=margs["size"], episode_len=cfg.episode_len, n_free=cfg.n_free,
                      n_labelled=cfg.n_labelled, frame_skip=cfg.frame_skip, seed=cfg.seed, data_dir=os.path.abspath(cfg.data_dir),
                      folder=os.path.abspath(cfg.data) if cfg.data else "",
                      free_folder=os.path.abspath(cfg.pretrain_data) if cfg.pretrain_data else "")
    return dict(backbone=cfg.backbone, model_args=margs, spec=spec, data=asdict(dcfg))


def action_spec(cfg):
    """The action space the adapter is built for (with the keys that play it): the environment's, or the one in
    the meta.json of the --data folder (a frames-only run has none and needs none)."""
    if not cfg.data:
        return make_env(cfg.env).spec
    meta = read_meta(cfg.data)
    spec = meta.get("spec")
    if spec is None:
        if cfg.stage != "pretrain":
            raise UserError(f"{cfg.data} holds no action spec (meta.json): fine-tuning needs labelled episodes; a folder "
                            f"of videos pre-trains (--pretrain_data, or --stage pretrain)")
        return dict(discrete=True, n_actions=1, action_dim=0, keys={})
    keys = spec.get("keys") or named_keys(meta.get("env"), spec)
    return dict(spec, keys=keys or keys_for(spec["n_actions"], None, spec["action_dim"]))


def named_keys(env, spec):
    """The keys of the environment a data folder names (meta.json "env"), where it can be made here and its actions
    are the folder's; else None (and the keys follow the convention of keys_for)."""
    try:
        own = make_env(env).spec if env else None
    except UserError:                                   # not a world or game this machine can make
        return None
    return own["keys"] if own is not None and action_space(own) == action_space(spec) else None


def stage_iters(cfg, stage):
    return cfg.tokenizer_iters if stage == "tokenizer" else cfg.pretrain_iters if stage == "pretrain" else cfg.finetune_iters


def same_run(cfg, path, stage):
    """The checkpoint at path, if it is this stage of a run of this backbone and environment (else a UserError)."""
    prev = read_checkpoint(path)
    if prev["backbone"] != cfg.backbone or prev["data"]["env"] != cfg.env:
        raise UserError(f"{path} is a '{prev['backbone']}' run on '{prev['data']['env']}', not '{cfg.backbone}' on "
                        f"'{cfg.env}': pass the same --backbone and --env, or another --out")
    if prev.get("stage", stage) != stage:                                     # finetune and scratch share ckpt.pt
        raise UserError(f"{path} holds the {prev['stage']} stage (of --stage {prev['config']['stage']}), not {stage}: "
                        f"pass --stage {prev['config']['stage']}, or another --out")
    return prev


# flags a resumed run may change: where it writes, what it runs on, how long it trains, how it is evaluated and logged
RESUME_FREE = {"out", "resume", "device", "compile", "preset", "init_from", "tokenizer", "data_dir", "stage", "max_iters",
               "tokenizer_iters", "pretrain_iters", "finetune_iters", "horizon", "eval_clips", "sample_steps",
               "temperature", "top_k", "log_interval", "ckpt_seconds"}


def changed_flags(cfg, prev, stage):
    """The training flags that differ from the ones a checkpoint was trained with ('--lr 0.01 (the run has 0.001)');
    the pre-training stage has no adapter, the tokenizer's own model flags are checked by resumable()."""
    if stage == "tokenizer":
        return []
    theirs, mine = prev.get("config", {}), asdict(cfg)
    free = RESUME_FREE | ({"adapter", "freeze_backbone"} if stage == "pretrain" else set())
    folders = dict(data=prev["data"].get("folder"), pretrain_data=prev["data"].get("free_folder"))   # (absolute)
    same = lambda k: (os.path.abspath(mine[k]) if mine[k] else "") == folders[k] if k in folders else mine[k] == theirs[k]
    changed = [f"--{k} {mine[k]} (the run has {theirs[k]})" for k in mine if k in theirs and k not in free and not same(k)]
    if changed and theirs.get("preset") not in (None, mine["preset"]):     # (a device change picks another preset)
        changed.insert(0, f"--preset {mine['preset']} (the run has {theirs['preset']}: pass --preset {theirs['preset']})")
    return changed


def resumable(cfg, path, desc):
    """This stage's own checkpoint when --resume finds one, checked against the flags."""
    if not (cfg.resume and os.path.exists(path)):
        return None
    prev = read_checkpoint(path)                                              # (plan_stages checked its flags)
    mine, theirs = desc["model_args"], prev.get("model_args", {})
    if changed := [f"--{k} {mine[k]} (the run has {theirs[k]})" for k in mine if k in theirs and mine[k] != theirs[k]]:
        raise UserError(f"{path} was trained with another model: {', '.join(changed)}: pass the run's own flags, "
                        f"or another --out")
    return prev


def run_stages(cfg, stages, files, desc, init, tok, device, amp, dist, log):
    """Each stage in turn, each started from the one before; a finished stage found by --resume is reused.
    Returns the last stage's checkpoint."""
    for stage in stages:
        prev = resumable(cfg, files[stage], desc)
        iters = stage_iters(cfg, stage)
        if prev is not None and prev["step"] >= iters and (stage != "tokenizer" or "tokenizer_psnr" in prev):
            log(f"resume: {stage} already finished in {files[stage]}, reusing it")
            ck = prev
        elif stage == "tokenizer":
            ck = train_tokenizer(cfg, desc, device, log, prev) if dist.main else None
            dist.barrier()
            ck = ck or read_checkpoint(files[stage])
        else:
            desc = {k: prev[k] for k in desc} if prev is not None else desc
            if prev is not None and prev.get("iters", iters) != iters:
                log(f"note: {stage} was planned for {prev['iters']} iterations and continues to {iters}; the learning "
                    f"rate follows the new schedule from step {prev['step']} ({lr_at(prev['step'] - 1, cfg, prev['iters']):.2e}"
                    f" -> {lr_at(prev['step'], cfg, iters):.2e})")
            trainer = StageTrainer(stage, cfg, desc, device, amp, dist, init=init, resume=prev, tokenizer=tok)
            ck = train_loop(trainer.job(files[stage], log), cfg, dist, log)
        if stage == "tokenizer":
            tok = ck["tokenizer"]
        else:
            init = ck
    return ck


def summary(m):
    """The metrics as one line a person reads."""
    line = (f"psnr {m['psnr']:.2f} dB (shuffled actions {m['psnr_shuffled']:.2f}, copy-last {m['psnr_copy_last']:.2f}) "
            f"| ssim {m['ssim']:.3f}")
    if "pos_err" in m:
        line += (f" | pos_err {m['pos_err']:.2f} px (shuffled {m['pos_err_shuffled']:.2f}, copy-last "
                 f"{m['pos_err_copy_last']:.2f}, missing {m['pos_missing']:.1%})")
    if "control_psnr" in m:
        line += (f" | control_psnr {m['control_psnr']:.2f} dB, other actions {m['control_psnr_wrong']:.2f} (gap "
                 f"{round(m['control_psnr'] - m['control_psnr_wrong'], 2) + 0.0:.2f}) on {m['control_pixels']:.1%} of the pixels")
    else:
        line += f" | {m['control']}"
    line += f" | {m['clips']} clip{'s' * (m['clips'] != 1)} from {m['episodes']} held-out episode{'s' * (m['episodes'] != 1)}"
    if m.get("clips_asked", 0) > m["clips"]:
        line += f" (of --eval_clips {m['clips_asked']}: they hold no more windows of context + --horizon frames)"
    if m.get("control_gap_by_step"):
        line += "\ncontrol gap frame by frame (dB): " + " ".join("-" if g is None else f"{g:.2f}" for g in m["control_gap_by_step"])
    return line


def report(ck, cfg, device, why, stages, t0, log):
    """Evaluate the final EMA weights on held-out episodes; write metrics.json and rollout.gif."""
    model = build_model(ck).to(device)
    model.load_state_dict(ck["ema"])
    data = load_corpus(DataConfig(**ck["data"]), labelled=True)
    log("--- evaluating on held-out episodes")
    m = evaluate(model, cfg, data, device)
    m.update(train_seconds=round(time.time() - t0, 1), device=why, env=cfg.env, backbone=cfg.backbone,
             adapter=ck["adapter"], motion_weight=cfg.motion_weight, distance=cfg.distance, stages=stages, preset=cfg.preset,
             params=sum(p.numel() for p in model.parameters()))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:                # strict JSON: NaN (no agent found) as null
        json.dump({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}, f, indent=1)
    compare_gif(model, ck, os.path.join(cfg.out, "rollout.gif"), device=device, **sampling(cfg))
    log(summary(m))
    log(f"wrote {cfg.out}/metrics.json and {cfg.out}/rollout.gif in {(time.time() - t0) / 60:.1f} min (training and "
        f"evaluation; the GIF included)")
    return m


def train(cfg):
    dist = Dist(cfg.device)
    device, amp, why = pick_device(dist.device_name)
    dist.start(device)
    expect = resolve(cfg, device)
    stages, files, init, tok_from = plan_stages(cfg)
    desc = describe(cfg, init, tok_from)
    os.makedirs(cfg.out, exist_ok=True)
    with claimed(cfg.out) if dist.main else contextlib.nullcontext():    # one run writes to a folder at a time
        log = Logger(cfg.out, dist.main)
        log(f"device: {why} | preset '{cfg.preset}' ({expect}) | world '{cfg.env or cfg.data}' | stages "
            f"{' -> '.join(stages)} | out {cfg.out}" + origins(cfg, init, tok_from) +
            (f" | DDP world size {dist.world}" if dist.world > 1 else ""))
        if device.type == "cpu" and (note := memory_note(cfg, desc["model_args"])):
            log(note)
        try:
            m = run_recipe(cfg, stages, files, desc, init, tok_from, device, amp, why, dist, log)
        except UserError as e:                        # the log says why the run stopped, as the terminal does
            if dist.main:
                with open(log.path, "a") as f:
                    f.write(f"error: {e}\n")
            raise
    dist.close()
    return m


def check_lengths(data, clip_len, horizon, clip_fixed=False, longer="record longer episodes"):
    """Whether the labelled corpus holds training clips of clip_len frames and held-out clips of the context and
    `horizon` frames; else a UserError naming a --clip_len and --horizon that fit together (clip_fixed: the clip
    length comes with --init_from, so only the horizon may change), or, where none fit, saying `longer`."""
    train, held = int(data.train["lengths"].max()), int(data.test["lengths"].max())
    if train >= clip_len + 1 and held >= clip_len + horizon:                 # (a clip starts after frame 0)
        return
    c = clip_len if clip_fixed else min(clip_len, train - 1, held - 1)
    most, half = held - c, int(np.median(data.test["lengths"])) - c       # horizons that fit after c - 1 context frames
    why = (f"training clips of --clip_len {clip_len} need episodes of {clip_len + 1} frames, and evaluating --horizon "
           f"{horizon} after {clip_len - 1} context frames needs {clip_len + horizon} (a clip starts after an episode's "
           f"first frame); the longest training episode holds {train}, the longest held-out {held}")
    if c < 2 or c > train - 1 or most < 1:
        raise UserError(f"{why}: {longer}" + (" (the --init_from model fixes --clip_len)" if clip_fixed else ""))
    h = horizon if horizon <= most else half if half >= 1 else most
    flags = " ".join(([f"--clip_len {c}"] if c != clip_len else []) + ([f"--horizon {h}"] if h != horizon else []))
    note = f" (half the held-out episodes fit it; at most {most})" if h == half and h != horizon else ""
    raise UserError(f"{why}: pass {flags}{note}, or {longer}")


def longer(data, cfg, desc):
    """What makes longer episodes: another folder, a larger --episode_len if it cut them, else another game."""
    most = int(max(data.train["lengths"].max(), data.test["lengths"].max())) - 1           # steps
    if cfg.data:
        return "record longer episodes"
    if most >= desc["data"]["episode_len"]:
        return "raise --episode_len"
    return f"choose a game with longer episodes ({cfg.env} ended all of these within {most} steps by itself)"


def origins(cfg, init, tok_from):
    """Where the run's weights start (--init_from, --tokenizer) and what they were trained on, for the first log line;
    one trained on another world or folder is said to be so (a starting point, not a model of these frames)."""
    mine, note = cfg.env or os.path.abspath(cfg.data), ""
    for flag, path, ck in (("--init_from", cfg.init_from, init), ("--tokenizer", cfg.tokenizer, tok_from)):
        if path and ck is not None:
            theirs = ck["data"]["env"] or ck["data"].get("folder") or "?"
            note += f" | {flag} {path}, trained on '{theirs}'" + (" (another world)" if theirs != mine else "")
    return note


def run_recipe(cfg, stages, files, desc, init, tok_from, device, amp, why, dist, log):
    """Data (built once, by the first process), the stages, the evaluation -> metrics (None on other processes)."""
    if dist.main:                                     # the first process builds the corpora, the others read them
        frames_only = bool(cfg.data) and read_meta(cfg.data).get("spec") is None        # (read with no-op actions)
        for labelled in sorted({s not in ("tokenizer", "pretrain") for s in stages} | {True}):   # labelled last
            t0 = time.time()
            data = load_corpus(DataConfig(**desc["data"]), labelled, log=log)
            kind = "labelled" if labelled and not frames_only else "action-free"
            log(f"{kind} corpus: {len(data.train['frames'])} episodes to train on, "
                f"{len(data.test['frames'])} held out ({time.time() - t0:.0f} s)")
        check_lengths(data, desc["model_args"]["clip_len"], cfg.horizon, bool(cfg.init_from), longer(data, cfg, desc))
    dist.barrier()
    t0 = time.time()
    tok = tokenizer_weights(tok_from, cfg.tokenizer) if tok_from is not None else None
    ck = run_stages(cfg, stages, files, desc, init, tok, device, amp, dist, log)
    m = report(ck, cfg, device, why, stages, t0, log) if dist.main else None
    dist.barrier()
    return m


if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
