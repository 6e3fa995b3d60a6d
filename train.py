"""train.py — the DWS recipe: pre-train a video model on action-free clips, attach the action adapter,
fine-tune on action-labelled clips, evaluate, save.

    python train.py --backbone dit                  # the whole recipe, preset picked by device
    python train.py --backbone ar                   # the same with the VQ tokenizer + video GPT
    python train.py --env pusher --adapter input    # another world, the input-level baseline
    python train.py --stage scratch                 # no pre-training: adapter from the start
    python train.py --resume --out out              # continue a stopped run

Stages and the files they write in --out:
    tokenizer  (--backbone ar) the per-frame VQ tokenizer on action-free frames -> tokenizer.pt
    pretrain   action-free corpus, no adapter                     -> pretrain.pt
    finetune   action-labelled corpus, adapter attached to the    -> ckpt.pt, metrics.json, rollout.gif
               pre-trained backbone (from pretrain.pt or --init_from)
    scratch    action-labelled corpus, adapter from step 0        -> ckpt.pt, metrics.json, rollout.gif
    all        pretrain, then finetune (the default)
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from tqdm import tqdm

from data import ClipSampler, DataConfig, UserError, locate_agent, load_corpus, make_world, run_cli, to_uint8, WORLDS
from model import ARConfig, BACKBONES, VideoGPT, flops_per_token, make_tokenizer, pick_device
from adapter import ADAPTERS
from loss import LOSSES
from sample import CKPT_FORMAT, build_model, compare_gif, read_checkpoint, rollout


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    backbone: str = opt("dit", "the video backbone: " + ", ".join(BACKBONES))
    env: str = opt("coin", "the built-in world: " + ", ".join(WORLDS))
    stage: str = opt("all", "pretrain | finetune | scratch | all (pretrain then finetune)")
    adapter: str = opt("film", "action conditioning: film (DWS) | input (input-level baseline) | none")
    freeze_backbone: bool = opt(False, "fine-tune the adapter only, the backbone frozen")
    motion_weight: float = opt(0.0, "strength c of the motion-reinforced loss (0 turns it off; README: why 0)")
    motion_temp: float = opt(0.05, "softmax temperature of the motion weights")
    preset: str = opt("auto", "size preset: tiny (CPU) | gpu (one GPU) | auto (picked by device)")
    init_from: str = opt("", "a checkpoint whose backbone starts the finetune stage")
    tokenizer: str = opt("", "--backbone ar: reuse the tokenizer of this checkpoint (tokenizer.pt or any ar checkpoint) "
                             "instead of training one")
    out: str = opt("out", "output folder: checkpoints, metrics.json, rollout.gif, train.log")
    resume: bool = opt(False, "continue the run in --out from its checkpoints")
    seed: int = opt(0, "random seed (data, initialisation, noise)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = opt(True, "torch.compile the training step (CUDA only)")
    max_iters: int = opt(0, "iterations per stage (0: the preset's)")
    # --- filled in by the preset unless given
    size: int = opt(None, "frame size in pixels")
    patch: int = opt(None, "dit: patch size")
    margin: int = opt(None, "dit: pixels around its patch each token also sees")
    down: int = opt(None, "ar: the tokenizer halves each frame this many times")
    codes: int = opt(None, "ar: codebook size")
    reach: int = opt(None, "ar: each code also sees this many cells around it in the frame before")
    tokenizer_iters: int = opt(None, "ar: iterations of the tokenizer stage")
    width: int = opt(None, "transformer width")
    depth: int = opt(None, "transformer blocks")
    heads: int = opt(None, "attention heads")
    clip_len: int = opt(None, "frames per training clip (context + denoised)")
    batch_size: int = opt(None, "clips per batch")
    lr: float = opt(None, "peak learning rate")
    pretrain_iters: int = opt(None, "iterations of the pretrain stage")
    finetune_iters: int = opt(None, "iterations of the finetune / scratch stage")
    n_free: int = opt(None, "episodes in the action-free corpus")
    n_labelled: int = opt(None, "episodes in the action-labelled corpus")
    # --- the rest
    warmup: int = opt(100, "learning-rate warm-up iterations")
    min_lr_frac: float = opt(0.1, "cosine decay ends at lr * this")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    ema: float = opt(0.999, "EMA decay of the evaluation weights")
    horizon: int = opt(8, "frames rolled out in evaluation")
    eval_clips: int = opt(96, "held-out clips in evaluation")
    sample_steps: int = opt(4, "dit: Euler steps per generated frame")
    temperature: float = opt(None, "ar: sampling temperature (0: the most likely code)")
    top_k: int = opt(None, "ar: sample from the k most likely codes (0: all)")
    log_interval: int = opt(50, "iterations between log lines")
    ckpt_seconds: float = opt(60.0, "seconds between checkpoints")
    data_dir: str = opt("data_cache", "where generated corpora are cached")


PRESETS = {   # shared fields, then each backbone's own
    "tiny": dict(size=32, width=128, depth=4, heads=4, clip_len=2, batch_size=32, lr=1e-3, n_free=1024, n_labelled=1536,
                 dit=dict(patch=4, margin=4, pretrain_iters=1000, finetune_iters=2000, expect="about 12 min on a 2-core CPU"),
                 ar=dict(down=2, codes=512, reach=1, tokenizer_iters=2000, pretrain_iters=800, finetune_iters=3000,
                         temperature=0.0, top_k=0, expect="about 16 min on a 2-core CPU")),
    "gpu": dict(size=64, width=384, depth=8, heads=6, clip_len=6, batch_size=64, lr=5e-4, n_free=8192, n_labelled=2048,
                dit=dict(patch=4, margin=4, pretrain_iters=8000, finetune_iters=8000, expect="see README for the time on one GPU"),
                ar=dict(down=2, codes=1024, reach=2, tokenizer_iters=5000, pretrain_iters=8000, finetune_iters=8000,
                        temperature=1.0, top_k=0, expect="see README for the time on one GPU")),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes", "on"), nargs="?",
                           const=True, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f.metadata["help"] + (" (default: the preset's)" if f.default is None else f" (default {f.default!r})"))
    return TrainConfig(**vars(p.parse_args(argv)))


def resolve(cfg, device):
    """Check the names and fill the preset's fields; returns the expected-time note."""
    if cfg.backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{cfg.backbone}': choose one of {', '.join(BACKBONES)}")
    make_world(cfg.env)
    if cfg.adapter not in ADAPTERS:
        raise UserError(f"unknown adapter '{cfg.adapter}': choose one of {', '.join(ADAPTERS)}")
    if cfg.stage not in ("pretrain", "finetune", "scratch", "all"):
        raise UserError(f"unknown stage '{cfg.stage}': choose pretrain, finetune, scratch or all")
    name = cfg.preset if cfg.preset != "auto" else ("gpu" if device.type == "cuda" else "tiny")
    if name not in PRESETS:
        raise UserError(f"unknown preset '{cfg.preset}': choose one of auto, {', '.join(PRESETS)}")
    cfg.preset = name
    preset = {k: v for k, v in PRESETS[name].items() if not isinstance(v, dict)} | PRESETS[name][cfg.backbone]
    for k, v in preset.items():
        if k != "expect" and getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.max_iters:
        cfg.pretrain_iters = cfg.finetune_iters = cfg.max_iters
        cfg.tokenizer_iters = cfg.tokenizer_iters and cfg.max_iters
    return preset["expect"]


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
    g = torch.exp(-(torch.arange(win) - win // 2).float() ** 2 / (2 * sigma ** 2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2).to(x)[None, None].repeat(C, 1, 1, 1)
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


def heldout_eval_clips(split, length, n):
    """Deterministic held-out clips: consecutive non-overlapping windows of each held-out episode."""
    e, s = [], []
    for i, L in enumerate(split["lengths"]):
        for start in range(1, L - length + 1, length):
            e.append(i); s.append(start)
    order = np.argsort(np.arange(len(e)) % max(1, len(split["lengths"])), kind="stable")[:n]   # spread over episodes
    return np.array(e)[order], np.array(s)[order]


@torch.no_grad()
def evaluate(model, cfg, data, device):
    """Roll out `horizon` frames from held-out contexts; compare with the truth under recorded and shuffled actions."""
    model.eval()
    k = model.backbone.cfg.clip_len - 1
    sampler = ClipSampler(data.test, k + cfg.horizon)
    e, s = heldout_eval_clips(data.test, k + cfg.horizon, cfg.eval_clips)
    clips = sampler.clips(e, s)
    x, a = clips["frames"].to(device), clips["actions"].to(device)
    true = x[:, k:]
    shuffled = torch.cat([a[:, :k], a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0)), k:]], 1)
    runs = {}
    for name, acts in (("", a), ("_shuffled", shuffled)):
        g = torch.Generator(device).manual_seed(cfg.seed)                   # same noise for both: only actions differ
        runs[name] = rollout(model, x[:, :k], acts, generator=g, **sampling(cfg))
    runs["_copy_last"] = x[:, k - 1:k].expand_as(true)
    m = {}
    agent = make_world(cfg.env).agent_size
    for name, pred in runs.items():
        m["psnr" + name] = psnr(pred, true).mean().item()
        m["ssim" + name] = ssim(pred.cpu(), true.cpu()).mean().item()
        m["pos_err" + name], m["pos_missing" + name] = position_error(pred, true, agent)
    if isinstance(model.backbone, VideoGPT):
        tok = model.backbone.tokenizer
        m["tokenizer_psnr"] = psnr(tok.decode(tok.encode(true)), true).mean().item()
    m.update(horizon=cfg.horizon, clips=len(x), context=k, **sampling(cfg))
    return m


def sampling(cfg):
    """The sampler's settings, as rollout() takes them."""
    return dict(steps=cfg.sample_steps, temperature=1.0 if cfg.temperature is None else cfg.temperature,
                top_k=cfg.top_k or 0)


# ----------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, obj):
    """Write to a temporary file, then rename into place: a crash mid-write never spoils the previous checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states():
    st = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st):
    torch.set_rng_state(st["torch"]); np.random.set_state(st["numpy"]); random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------
# one stage

class Logger:
    def __init__(self, out):
        self.path = os.path.join(out, "train.log")

    def __call__(self, msg):
        tqdm.write(msg)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def lr_at(step, cfg, iters):
    """Linear warm-up, then cosine decay to lr * min_lr_frac."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, iters - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def run_stage(stage, cfg, desc, device, amp, log, init=None, resume=None, tokenizer=None):
    """Train one stage; returns its final checkpoint dict. desc holds backbone, model_args, spec, data.

    init: a checkpoint whose backbone weights start this stage; resume: this stage's own unfinished checkpoint;
    tokenizer: the (frozen) tokenizer weights a video GPT starts from, when init does not bring them."""
    path = os.path.join(cfg.out, "pretrain.pt" if stage == "pretrain" else "ckpt.pt")
    iters = cfg.pretrain_iters if stage == "pretrain" else cfg.finetune_iters
    adapter = "none" if stage == "pretrain" else cfg.adapter
    ck = dict(desc, format=CKPT_FORMAT, adapter=adapter, stage=stage, config=asdict(cfg), iters=iters)
    model, ema = build_model(ck).to(device), build_model(ck).to(device)
    if init is not None:
        model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in init["ema"].items() if k.startswith("backbone.")})
    elif tokenizer is not None:
        model.backbone.tokenizer.load_state_dict(tokenizer)
    if stage == "finetune" and cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: --freeze_backbone with --adapter none leaves no trainable weights")
    decay = [p for p in params if p.dim() >= 2]
    optim = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                               dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                              lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    data = load_corpus(DataConfig(**desc["data"]), labelled=stage != "pretrain")
    sampler = ClipSampler(data.train, model.backbone.cfg.clip_len, seed=cfg.seed + (stage == "pretrain"))
    step, elapsed = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"]); ema.load_state_dict(resume["ema"])
        optim.load_state_dict(resume["optimizer"])
        step, elapsed = resume["step"], resume["elapsed"]
        set_rng_states(resume["rng"]); sampler.rng.bit_generator.state = resume["sampler"]
        log(f"resumed {stage} from {path} at step {step}/{iters}")

    def checkpoint():
        ck.update(model=model.state_dict(), ema=ema.state_dict(), optimizer=optim.state_dict(), step=step,
                  iters=iters, elapsed=elapsed, rng=rng_states(), sampler=sampler.rng.bit_generator.state)
        save_checkpoint(path, ck)

    n_params = sum(p.numel() for p in model.parameters())
    n_adapter = sum(p.numel() for p in model.adapter.parameters()) if model.adapter is not None else 0
    log(f"--- {stage}: {iters} iters, {n_params / 1e6:.2f}M parameters ({n_adapter / 1e6:.3f}M in the "
        f"'{adapter}' adapter), {len(data.train['frames'])} training episodes")
    fwd = torch.compile(model) if (cfg.compile and device.type == "cuda") else model
    mcfg = model.backbone.cfg
    frames_per_iter = cfg.batch_size * mcfg.clip_len
    tokens = frames_per_iter * model.backbone.n_tok
    flops_iter = 3 * flops_per_token(mcfg, mcfg.clip_len * model.backbone.n_tok) * tokens
    model.train()
    t_last, t_ck, loss_acc, n_acc = time.time(), time.time(), 0.0, 0
    bar = tqdm(total=iters, initial=step, desc=stage, disable=None, dynamic_ncols=True)
    while step < iters:
        for g in optim.param_groups:
            g["lr"] = lr_at(step, cfg, iters)
        batch = sampler.sample(cfg.batch_size)
        x = batch["frames"].to(device, non_blocking=True)
        a = batch["actions"].to(device) if model.adapter is not None else None
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = LOSSES[desc["backbone"]](fwd, x, a, cfg.motion_weight, cfg.motion_temp, cell=model.backbone.cell)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at {stage} step {step}: lower --lr (now {cfg.lr}); "
                            f"the last good checkpoint, if any, is untouched at {path}")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        step += 1
        loss_acc += loss.item(); n_acc += 1
        bar.update(1)
        if step % cfg.log_interval == 0 or step == iters:
            dt = time.time() - t_last
            elapsed += dt
            ms = 1000 * dt / n_acc
            line = (f"{stage} step {step:5d}/{iters} | loss {loss_acc / n_acc:.4f} | lr {optim.param_groups[0]['lr']:.2e} | "
                    f"{ms:.0f} ms/iter | {frames_per_iter * 1000 / ms:.0f} frames/s | ETA {(iters - step) * ms / 60000:.1f} min")
            if device.type == "cuda":
                line += f" | MFU {100 * flops_iter / (ms / 1000) / 989e12:.1f}% of H100 bf16 peak"
            log(line)
            t_last, loss_acc, n_acc = time.time(), 0.0, 0
        if time.time() - t_ck > cfg.ckpt_seconds and step < iters:
            checkpoint(); t_ck = time.time()
    bar.close()
    checkpoint()
    return ck


def train_tokenizer(cfg, desc, device, log):
    """The tokenizer stage (--backbone ar): fit the per-frame VQ tokenizer (model.py) to frames of the
    action-free corpus; returns its checkpoint, with its PSNR on held-out frames."""
    path = os.path.join(cfg.out, "tokenizer.pt")
    tok = make_tokenizer(ARConfig(**desc["model_args"])).to(device)
    optim = torch.optim.AdamW(tok.parameters(), lr=2e-3, weight_decay=0.0)      # constant: measured better than a decay here
    data = load_corpus(DataConfig(**desc["data"]), labelled=False)
    sampler = ClipSampler(data.train, 1, seed=cfg.seed + 2)
    iters = cfg.tokenizer_iters
    log(f"--- tokenizer: {iters} iters, {sum(p.numel() for p in tok.parameters()) / 1e6:.2f}M parameters, "
        f"{len(tok.codebook)} codes, {desc['model_args']['size'] // 2 ** tok.down}^2 codes per frame")
    tok.train()
    t_last, loss_acc = time.time(), 0.0
    for step in tqdm(range(iters), desc="tokenizer", disable=None, dynamic_ncols=True):
        loss, _ = tok.loss(sampler.sample(2 * cfg.batch_size)["frames"][:, 0].to(device))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        loss_acc += loss.item()
        if (step + 1) % cfg.log_interval == 0 or step + 1 == iters:
            n = cfg.log_interval if (step + 1) % cfg.log_interval == 0 else (step + 1) % cfg.log_interval
            log(f"tokenizer step {step + 1:5d}/{iters} | loss {loss_acc / n:.4f} | {1000 * (time.time() - t_last) / n:.0f} ms/iter")
            t_last, loss_acc = time.time(), 0.0
    tok.eval()
    held = ClipSampler(data.test, 1, seed=0).sample(256)["frames"].to(device)        # (256, 1, C, S, S)
    tok_psnr = psnr(tok.decode(tok.encode(held)), held).mean().item()
    log(f"tokenizer: held-out psnr {tok_psnr:.2f} dB, {int((tok.usage >= 1).sum())}/{len(tok.usage)} codes in use")
    ck = dict(desc, format=CKPT_FORMAT, adapter="none", stage="tokenizer", config=asdict(cfg), step=iters, iters=iters,
              tokenizer=tok.state_dict(), tokenizer_psnr=tok_psnr)
    save_checkpoint(path, ck)
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


def train(cfg):
    device, amp, why = pick_device(cfg.device)
    expect = resolve(cfg, device)
    stages = {"all": ["pretrain", "finetune"], "scratch": ["scratch"], "pretrain": ["pretrain"],
              "finetune": ["finetune"]}[cfg.stage]
    tok_from = read_checkpoint(cfg.tokenizer) if cfg.tokenizer else None
    if cfg.backbone == "ar" and tok_from is None and not cfg.init_from and stages[0] != "finetune":
        stages = ["tokenizer"] + stages
    files = {s: os.path.join(cfg.out, {"pretrain": "pretrain.pt", "tokenizer": "tokenizer.pt"}.get(s, "ckpt.pt"))
             for s in stages}
    if not cfg.resume:
        clash = [f for f in files.values() if os.path.exists(f)]
        if clash:
            raise UserError(f"{clash[0]} already exists: pass --resume to continue that run, or choose another --out")
    init = read_checkpoint(cfg.init_from) if cfg.init_from else None
    if init is not None:
        if init["backbone"] != cfg.backbone:
            raise UserError(f"--init_from {cfg.init_from} holds a '{init['backbone']}' backbone, not '{cfg.backbone}': "
                            f"pass --backbone {init['backbone']} or another checkpoint")
        stages = [s for s in stages if s != "pretrain"]
        if not stages:
            raise UserError("--init_from starts the finetune stage: use --stage finetune or all")
    if stages == ["finetune"] and init is None:
        pre = os.path.join(cfg.out, "pretrain.pt")
        if not os.path.exists(pre):
            raise UserError(f"the finetune stage needs a pre-trained backbone: pass --init_from CKPT or run --stage pretrain first (no {pre})")
        init = read_checkpoint(pre)
    os.makedirs(cfg.out, exist_ok=True)
    log = Logger(cfg.out)
    world = make_world(cfg.env)
    spec = dict(discrete=world.discrete, n_actions=world.n_actions, action_dim=world.action_dim)
    cls, mcls = BACKBONES[cfg.backbone]
    margs = {f.name: getattr(cfg, f.name) for f in fields(mcls) if getattr(cfg, f.name, None) is not None}
    if tok_from is not None:
        tok_args = ("size", "channels", "down", "codes", "code_dim", "tok_width")
        margs.update({k: v for k, v in tok_from["model_args"].items() if k in tok_args})
    if init is not None:
        margs = init["model_args"]
    dcfg = DataConfig(env=cfg.env, size=margs["size"], n_free=cfg.n_free, n_labelled=cfg.n_labelled,
                      seed=cfg.seed, data_dir=cfg.data_dir)
    desc = dict(backbone=cfg.backbone, model_args=margs, spec=spec, data=asdict(dcfg))
    log(f"device: {why} | preset '{cfg.preset}' ({expect}) | world '{cfg.env}' | stages {' -> '.join(stages)} | out {cfg.out}")
    torch.manual_seed(cfg.seed); np.random.seed(cfg.seed); random.seed(cfg.seed)
    t0 = time.time()
    tok = tokenizer_weights(tok_from, cfg.tokenizer) if tok_from is not None else None
    for stage in stages:
        prev = read_checkpoint(files[stage]) if cfg.resume and os.path.exists(files[stage]) else None
        if prev is not None and (prev["backbone"] != cfg.backbone or prev["data"]["env"] != cfg.env):
            raise UserError(f"{files[stage]} is a '{prev['backbone']}' run on '{prev['data']['env']}', not "
                            f"'{cfg.backbone}' on '{cfg.env}': pass the same --backbone and --env, or another --out")
        if stage == "tokenizer":
            if prev is None:
                prev = train_tokenizer(cfg, desc, device, log)
            else:
                log(f"resume: tokenizer already trained in {files[stage]}, reusing it")
            tok = prev["tokenizer"]
            continue
        iters = cfg.pretrain_iters if stage == "pretrain" else cfg.finetune_iters
        if prev is not None and prev["step"] >= iters:
            log(f"resume: {stage} already finished in {files[stage]}, skipping it")
            ck = prev
        else:
            if prev is not None:
                desc = {k: prev[k] for k in desc}
            ck = run_stage(stage, cfg, desc, device, amp, log, init=init, resume=prev, tokenizer=tok)
        init = ck
    model = build_model(ck).to(device)
    model.load_state_dict(ck["ema"])
    data = load_corpus(DataConfig(**ck["data"]), labelled=True)
    log("--- evaluating on held-out episodes")
    m = evaluate(model, cfg, data, device)
    m.update(train_seconds=round(time.time() - t0, 1), device=why, env=cfg.env, backbone=cfg.backbone,
             adapter=ck["adapter"], motion_weight=cfg.motion_weight, stages=stages, preset=cfg.preset,
             params=sum(p.numel() for p in model.parameters()))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    compare_gif(model, ck, os.path.join(cfg.out, "rollout.gif"), device=device, **sampling(cfg))
    log(f"psnr {m['psnr']:.2f} dB (shuffled actions {m['psnr_shuffled']:.2f}, copy-last {m['psnr_copy_last']:.2f}) | "
        f"ssim {m['ssim']:.3f} | pos_err {m['pos_err']:.2f} px (shuffled {m['pos_err_shuffled']:.2f}, "
        f"copy-last {m['pos_err_copy_last']:.2f}) | missing {m['pos_missing']:.1%}")
    log(f"wrote {cfg.out}/metrics.json and {cfg.out}/rollout.gif in {m['train_seconds'] / 60:.1f} min")
    return m


if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
