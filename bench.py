"""bench.py — how fast each part runs, against what this machine can do.

    python bench.py                  # the table for the tiny and games presets (gpu too on CUDA); JSON in bench.json
    python bench.py --curves         # also cost curves as PNG: training cost against clip length, rollout ms per
                                     # frame against its position (with and without caching), MPC time against candidates
    python bench.py --profile train  # only where one DiT training step spends its time: the top operators, then
                                     # matrix products (their FLOP/s against the peak), attention, convolutions, the rest
    python bench.py --profile mpc    # ... or one MPC decision at the mbrl.py defaults

Every rate is set against a peak measured in the same run, on the same device, in the same dtype: a large matmul
(2048^3 fp32 on a CPU, 8192^3 bf16 on CUDA). So "% of peak" means the same on a laptop, a 2-core CPU and an H100.
On CUDA the MFU against the device's nominal dense bf16 peak (model.peak_flops) is shown too. Weights are untrained:
the cost of a step does not depend on them. Last in the data flow: it may import any file before it (it uses envs,
model, adapter, loss, sample, train and mbrl).
"""
import argparse
import json
import resource
import time

import numpy as np
import torch

from envs import UserError, check_out_file, make_env
from model import BACKBONES, make_generator, peak_flops, pick_device, seeded
from adapter import WorldModel
from loss import LOSSES, NOISE
from sample import rollout
from train import PRESETS, make_optimizer, step_flops
from mbrl import Agent, MBRLConfig, mpc_policy

SPEC = make_env("coin").spec                                                # discrete actions, 5 of them


def timed(fn, device, repeat, warmup=2, stat=np.median):
    """Median (or `stat`) seconds of fn() over `repeat` calls after `warmup` calls, the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(); t = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t)
    return float(stat(times))


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul: what this device reaches on the work it does best (the fastest of 10 calls:
    a shared machine's slow moments are not its peak)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeat=10, stat=min)


def preset_model(kind, preset, device, clip_len=None):
    """A world model (film adapter) at a preset's size."""
    p = {k: v for k, v in PRESETS[preset].items() if not isinstance(v, dict)} | PRESETS[preset][kind]
    cls, mcls = BACKBONES[kind]
    args = {f: p[f] for f in mcls.__dataclass_fields__ if f in p} | ({"clip_len": clip_len} if clip_len else {})
    with seeded(0):
        return WorldModel(cls(mcls(**args)), "film", SPEC).to(device), p


def train_step(kind, preset, device, amp, clip_len=None, repeat=5):
    """One training iteration (forward, backward, AdamW) at the preset's batch -> (seconds, frames, tokens, FLOPs)."""
    step, frames, tokens, flops = make_train_step(kind, preset, device, amp, clip_len)
    return timed(step, device, repeat, warmup=3), frames, tokens, flops


def make_train_step(kind, preset, device, amp, clip_len=None):
    """-> (a function running one training iteration, frames, tokens, FLOPs per iteration)."""
    model, p = preset_model(kind, preset, device, clip_len)
    bb, B = model.backbone, p["batch_size"]
    T = bb.cfg.clip_len
    params = [q for q in model.parameters() if q.requires_grad]
    opt, g = make_optimizer(params, argparse.Namespace(weight_decay=0.01, lr=1e-4), device), make_generator(device, 0)
    fwd = torch.compile(model) if device.type == "cuda" else model
    x = torch.rand(B, T, 3, bb.cfg.size, bb.cfg.size, device=device, generator=g) * 2 - 1
    a = torch.randint(0, SPEC["n_actions"], (B, T), device=device, generator=g)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = LOSSES[kind](fwd, x, a, 0.0, cell=bb.cell, noise=NOISE[kind](x.shape, device, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, B * T, B * T * bb.n_tok, step_flops(bb, B)


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")    # the matrix products the profiler counts
KINDS = {"attention": "scaled_dot_product", "convolutions": "convolution"}     # by name, forward and backward


def profile(what, step, device, dtype, rest_is, top=8):
    """Where step() spends its time: the operators with the largest self time, as shares; then the time of the
    matrix products, of attention, convolutions and everything else, the products' FLOP/s against the device's peak."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, with_flops=True) as prof:
        for _ in range(3):
            step()
    ev = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]   # operators (on CUDA: not their kernels too)
    self_t = lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
    total = sum(self_t(e) for e in ev)
    print(f"\nwhere {what} spends its time ({device.type}, self time per operator, under the profiler):")
    for e in sorted(ev, key=self_t, reverse=True)[:top]:
        print(f"  {100 * self_t(e) / total:5.1f}%  {e.key}")
    mm = [e for e in ev if e.key in PRODUCTS]
    t_mm = sum(self_t(e) for e in mm)
    kinds = {k: sum(self_t(e) for e in ev if name in e.key) for k, name in KINDS.items()}
    rate, peak = sum(e.flops for e in mm) / max(t_mm * 1e-6, 1e-9), matmul_peak(device, dtype)
    rest = ", ".join(f"{k} {100 * t / total:.1f}%" for k, t in kinds.items())
    print(f"matrix products {100 * t_mm / total:.1f}% of the time, at {rate / 1e9:.1f} GFLOP/s, {100 * rate / peak:.0f}% "
          f"of the peak measured now ({peak / 1e9:.1f}); {rest}; everything else ({rest_is}) "
          f"{100 * (total - t_mm - sum(kinds.values())) / total:.1f}%")


def rollout_rates(kind, preset, device, batch, frames=8, caches=(True,), rounds=1):
    """Frames per second of a rollout of `frames` frames for `batch` worlds at once (default sampler: 4 Euler steps
    for the DiT, greedy codes for the GPT), with and/or without the context cache: one rate per entry of `caches`.
    With several, the variants are timed in turn, `rounds` times each, and each keeps its fastest round: a machine
    whose speed drifts (a shared virtual machine's can move by half from minute to minute) then slows them alike,
    and their ratio is the cache's own."""
    model, p = preset_model(kind, preset, device)
    model.eval()
    k, S = model.backbone.cfg.clip_len - 1, model.backbone.cfg.size
    ctx = torch.zeros(batch, k, 3, S, S, device=device)
    acts = torch.zeros(batch, k + frames, dtype=torch.long, device=device)
    runs = [lambda c=c: rollout(model, ctx, acts, temperature=0.0, use_cache=c) for c in caches]
    times = [[] for _ in runs]
    for r in range(rounds):
        for go, t in zip(runs, times):
            t.append(timed(go, device, repeat=2, warmup=int(r == 0)))
    return [batch * frames / min(t) for t in times]


def mpc_decision(device, candidates, horizon, repeat=3, compile=True):
    """Seconds of one MPC decision for one world (mbrl.py's planner, defaults otherwise)."""
    return timed(make_decision(device, candidates, horizon, compile), device, repeat=repeat, warmup=2)


def make_decision(device, candidates=32, horizon=5, compile=True):
    """-> a function making one MPC decision for one world of coin (mbrl.py's planner and defaults)."""
    cfg = MBRLConfig(candidates=candidates, horizon=horizon, compile=compile)
    agent = Agent(cfg, SPEC, device, seed=0)
    w = make_env("coin", num=1, size=agent.size, seed=0)
    obs, _ = w.reset()
    act, _ = mpc_policy(w, agent.plan_scores, SPEC, cfg, agent.g)
    return lambda: act(obs, 0)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024                # Linux: KiB


def table(device, why, presets, save):
    """Every measurement of one run -> rows for the table and the JSON; save(rows) after each one, so a run stopped
    part way keeps what it measured."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    peak = matmul_peak(device, amp or torch.float32)
    nominal, nominal_name = peak_flops(device)
    rows = dict(device=why, matmul_peak_gflops=round(peak / 1e9, 1), nominal=nominal_name, finished=False, runs={})
    rows["mpc_ms_default"] = round(1000 * mpc_decision(device, 32, 5), 1); save(rows)
    rows["mpc_ms_256x8"] = round(1000 * mpc_decision(device, 256, 8, repeat=2), 1); save(rows)
    print(f"  one MPC decision: {rows['mpc_ms_default']} ms (32 x 5), {rows['mpc_ms_256x8']} ms (256 x 8)", flush=True)
    for preset in presets:
        for kind in BACKBONES:
            rows["runs"][f"{kind}/{preset}"] = r = preset_rates(kind, preset, device, amp, peak, nominal)
            rows["peak_memory_mb"] = round(peak_memory(device), 1); save(rows)
            print(f"  {kind}/{preset}: {r}", flush=True)
    rows["finished"] = True; save(rows)                                # a stopped run's JSON keeps finished: false
    return rows


def preset_rates(kind, preset, device, amp, peak, nominal):
    """Training, rollout and play rates of one backbone at one preset."""
    s, frames, tokens, flops = train_step(kind, preset, device, amp)
    r = dict(train_ms=round(1000 * s, 1), frames_per_s=round(frames / s, 1), tokens_per_s=round(tokens / s),
             gflops=round(flops / s / 1e9, 1), pct_of_peak=round(100 * flops / s / peak, 1))
    if nominal:
        r["mfu"] = round(100 * flops / s / nominal, 1)
    dit = kind == "dit"                                                 # the DiT's cache against none, timed in turn
    for b, rounds in ((1, 4), (32, 2)):
        rates = rollout_rates(kind, preset, device, b, caches=(True, False) if dit else (True,), rounds=rounds if dit else 1)
        r.update(zip([f"rollout_fps_b{b}", f"rollout_fps_b{b}_nocache"], rates))
    r["play_fps"], = rollout_rates(kind, preset, device, 1, frames=1)
    for b in (1, 32) if dit else ():
        r[f"cache_gain_b{b}"] = r[f"rollout_fps_b{b}"] / r[f"rollout_fps_b{b}_nocache"]
    return {c: round(v, 2 if c.startswith("cache_gain") else 1) for c, v in r.items()}


def show(rows):
    cols = ["train_ms", "frames_per_s", "tokens_per_s", "gflops", "pct_of_peak"] + (["mfu"] if rows["nominal"] else []) + \
           ["rollout_fps_b1", "rollout_fps_b1_nocache", "rollout_fps_b32", "rollout_fps_b32_nocache", "play_fps"]
    print(f"\n{rows['device']} | matmul peak {rows['matmul_peak_gflops']} GFLOP/s (measured) | {rows['nominal']}")
    print(f"{'model/preset':14s}" + "".join(f"{c:>{max(len(c), 8) + 2}s}" for c in cols))
    for name, r in rows["runs"].items():
        print(f"{name:14s}" + "".join(f"{r.get(c, '-')!s:>{max(len(c), 8) + 2}s}" for c in cols))
    gains = [f"{name} {r[f'cache_gain_b{b}']:.2f}x at batch {b}"
             for name, r in rows["runs"].items() for b in (1, 32) if f"cache_gain_b{b}" in r]
    if gains:
        print("the DiT's context cache (rollouts, frames/s with it over without): " + ", ".join(gains))
    print(f"one MPC decision (one world, mbrl.py defaults, 32 candidates x horizon 5): {rows['mpc_ms_default']} ms | "
          f"256 candidates x horizon 8: {rows['mpc_ms_256x8']} ms | peak memory {rows['peak_memory_mb']} MB")


def curves(device, path, why):
    """Three cost curves as one PNG (see the module docstring), titled with the device they were measured on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    lens = [2, 3, 4, 6]
    for kind in BACKBONES:
        ms = [1000 * (lambda s, frames, *_: s / frames)(*train_step(kind, "tiny", device, None, clip_len=T, repeat=3))
              for T in lens]
        ax[0].plot(lens, ms, "o-", label=kind)
    ax[0].set(xlabel="clip length (frames)", ylabel="training ms per frame", title="training cost per frame")
    for kind in BACKBONES:
        for cache in (True, False):
            ms = position_costs(kind, device, cache)
            ax[1].plot(range(2, len(ms) + 2), ms, "o-" if cache else "x--", label=f"{kind}, {'cache' if cache else 'no cache'}")
    ax[1].set(xlabel="frame position in the window", ylabel="ms per new frame (batch 1)", title="rollout cost per frame")
    cands = [16, 32, 64, 128, 256]
    ax[2].plot(cands, [1000 * mpc_decision(device, n, 5, repeat=2) for n in cands], "o-")
    ax[2].set(xlabel="candidates", ylabel="ms per decision (one world)", title="MPC decision time (horizon 5)")
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(); ax[1].legend(fontsize=7)
    fig.suptitle(f"bench.py --curves: the tiny preset's untrained models, mbrl.py's planner (coin) | {why}", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def position_costs(kind, device, use_cache, frames=8):
    """ms to generate each new frame of an 8-frame rollout whose window holds all of it (1 context frame + 8)."""
    model, _ = preset_model(kind, "tiny", device, clip_len=frames + 1)
    model.eval()
    S = model.backbone.cfg.size
    stamps = [time.perf_counter()]
    ctx, acts = torch.zeros(1, 1, 3, S, S, device=device), torch.zeros(1, frames + 1, dtype=torch.long, device=device)
    chunk = dict(chunk=1) if kind == "dit" else {}
    rollout(model, ctx, acts, temperature=0.0, use_cache=use_cache, on_frame=lambda f: stamps.append(time.perf_counter()), **chunk)
    return list(1000 * np.diff(stamps))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--curves", action="store_true", help="also draw the cost curves into --png")
    p.add_argument("--profile", choices=["train", "mpc"], help="only profile one DiT training step of the CPU preset "
                   "(the GPU preset on CUDA), or one MPC decision at the mbrl.py defaults: the top operators, then the time of "
                   "matrix products (their FLOP/s against the peak), attention, convolutions and the rest")
    p.add_argument("--json", help="where the table goes as JSON (default: bench.json)")
    p.add_argument("--png", help="where --curves draws (default: bench.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--presets", help="comma-separated presets to measure (default: tiny,games, and gpu on CUDA)")
    a = p.parse_args()
    if a.png and not a.curves:
        raise UserError(f"--png {a.png} is where --curves draws: add --curves, or drop --png")
    if a.profile and (idle := [f"--{k}" for k in ("curves", "json", "presets") if getattr(a, k)]):
        raise UserError(f"--profile prints one profile and measures no table: drop {', '.join(idle)}")
    a.png, a.json = a.png or "bench.png", a.json or "bench.json"
    device, _, why = pick_device(a.device)
    amp = torch.bfloat16 if device.type == "cuda" else None                 # the training step's and planner's dtype
    if a.profile == "train":
        preset = "gpu" if device.type == "cuda" else "tiny"
        return profile(f"a dit/{preset} training step", make_train_step("dit", preset, device, amp)[0], device,
                       amp or torch.float32, "element-wise work, copies, norms, the optimizer, dispatch")
    if a.profile == "mpc":
        return profile("one MPC decision (coin, mbrl.py defaults)", make_decision(device), device, amp or torch.float32,
                       "element-wise work, copies, norms, the compiled graph's own kernels, the tree's Python, dispatch")
    presets = a.presets.split(",") if a.presets else ["tiny", "games"] + (["gpu"] if device.type == "cuda" else [])
    if unknown := [n for n in presets if n not in PRESETS]:
        raise UserError(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if "gpu" in presets and device.type != "cuda":
        raise UserError("--presets gpu needs a CUDA GPU (on a 2-core CPU with 24 GB it ran out of memory): "
                        "measure tiny or games here")
    check_out_file(a.json, "--json", ".json")
    if a.curves:
        check_out_file(a.png, "--png", ".png")
    t0 = time.time()
    print(f"measuring on {why} ...", flush=True)

    def save(rows):
        rows["seconds"] = round(time.time() - t0, 1)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    rows = table(device, why, presets, save)
    show(rows)
    print(f"wrote {a.json} ({rows['seconds']:.0f} s)")
    if a.curves:
        curves(device, a.png, why)


if __name__ == "__main__":
    from envs import run_cli
    run_cli(main)
