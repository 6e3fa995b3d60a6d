"""test_all.py — the test suite: `python -m pytest -q test_all.py` (CPU, a few minutes)."""
import contextlib
import copy
import importlib.util
import io
import json
import re
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from envs import UserError, WORLDS, keys_for, locate_agent, make_env
from data import DataConfig, generate_episodes, play_episodes
from model import ARConfig, DiT, DiTConfig, VideoGPT, per_frame, per_token, pick_device
from adapter import WorldModel
from loss import LOSSES, flow_matching_loss, flow_matching_noise, motion_weights
from sample import read_checkpoint, rollout

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = DiTConfig(size=16, patch=4, clip_len=3, width=32, depth=2, heads=2)
SMALL_AR = ARConfig(size=16, clip_len=3, width=32, depth=2, heads=2, codes=16, tok_width=8)
BACKBONE_KINDS = ["dit", "ar"]
SPECS = {"coin": dict(discrete=True, n_actions=5, action_dim=0), "pusher": dict(discrete=False, n_actions=0, action_dim=2)}
TINY_MODEL = ["--size", "16", "--width", "32", "--depth", "2", "--heads", "2", "--batch_size", "8", "--horizon", "3",
              "--eval_clips", "4", "--log_interval", "2"]                  # (runs on a --data folder)
TINY_FLAGS = TINY_MODEL + ["--n_free", "24", "--n_labelled", "24"]           # (runs on generated corpora)


def actions_for(spec, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    if spec["discrete"]:
        return torch.randint(0, spec["n_actions"], (B, T), generator=g)
    return torch.rand(B, T, spec["action_dim"], generator=g) * 2 - 1


def new_backbone(kind):
    torch.manual_seed(0)
    return DiT(SMALL) if kind == "dit" else VideoGPT(SMALL_AR)


def backbone_input(kind, B=2, seed=0):
    """A clip as each backbone takes it, 3 frames: (noisy frames, noise levels) or (codes,)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "dit":
        return torch.randn(B, 3, 3, 16, 16, generator=g), torch.rand(B, 3, generator=g)
    return (torch.randint(0, SMALL_AR.codes, (B, 3, 16), generator=g),)


def frames_of(y):
    """A backbone's output split by frame: (B, T, ...) frames stay; GPT logits (B, T*N, K) -> (B, T, N, K)."""
    return y if y.dim() == 5 else y.view(y.shape[0], 3, -1, y.shape[-1])


def trained_backbone(kind="dit", steps=10):
    """A small backbone whose weights have moved away from their (partly zero) initialisation."""
    bb = new_backbone(kind)
    opt = torch.optim.Adam([p for p in bb.parameters() if p.requires_grad], 1e-2)
    x = torch.rand(4, 3, 3, 16, 16) * 2 - 1
    for _ in range(steps):
        loss = LOSSES[kind](WorldModel(bb), x, motion_c=0.0, cell=bb.cell)
        opt.zero_grad(); loss.backward(); opt.step()
    return bb


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], cwd=cwd or HERE, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------------------------
# worlds and data

@pytest.mark.parametrize("name", list(WORLDS))
def test_world_is_deterministic_and_state_round_trips(name):
    w1, w2 = make_env(name, num=3, seed=1), make_env(name, num=3, seed=1)
    o1, _ = w1.reset(); o2, _ = w2.reset()
    assert o1.dtype == np.uint8 and o1.shape == (3, 32, 32, 3) and np.array_equal(o1, o2)
    rng = np.random.default_rng(0)
    acts = [w1.random_action(rng) for _ in range(20)]
    for a in acts[:10]:
        w1.step(a); w2.step(a)
    saved = w1.get_state()
    after = [w1.step(a) for a in acts[10:]]
    w2.set_state(saved)
    again = [w2.step(a) for a in acts[10:]]
    for (oa, ra, ta, *_), (ob, rb, tb, *_) in zip(after, again):
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb) and np.array_equal(ta, tb)
    assert len({o.tobytes() for o, *_ in after}) > 1                    # the world actually moves


@pytest.mark.parametrize("name", list(WORLDS))
def test_agent_position_is_readable_and_follows_actions(name):
    w = make_env(name, num=4, size=64, seed=0)
    w.reset()
    right = np.full(4, 4) if w.discrete else np.tile([[1.0, 0.0]], (4, 1)).astype(np.float32)
    p0, f0 = locate_agent(w.render(), w.agent_size)
    w.step(right)
    p1, f1 = locate_agent(w.render(), w.agent_size)
    assert f0.all() and f1.all()
    assert np.all(p1[:, 0] >= p0[:, 0]) and np.any(p1[:, 0] > p0[:, 0] + 2)
    # a frame without the agent is reported as not found, not as position (0, 0)
    _, found = locate_agent(np.zeros((2, 32, 32, 3), np.uint8), w.agent_size)
    assert not found.any()


def test_edges_are_antialiased_so_a_frame_fixes_sub_pixel_positions():
    w = make_env("pusher", size=16)
    img = np.zeros((1, 16, 16, 3), np.uint8)
    centre = np.array([[0.503, 0.271]])                                   # not on the pixel grid
    w._paint(img, centre, 0.18, (255, 255, 255))
    m = img[0, :, :, 0].astype(float)
    ys, xs = np.mgrid[0:16, 0:16] + 0.5
    found = np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum() / 16
    assert np.abs(found - centre[0]).max() < 0.1 / 16                     # within a tenth of a pixel
    moved = np.zeros_like(img)
    w._paint(moved, centre + 0.01, 0.18, (255, 255, 255))                  # a sixth of a pixel
    assert not np.array_equal(img, moved)


def test_bad_actions_and_names_are_user_errors():
    w = make_env("coin", num=2); w.reset()
    with pytest.raises(UserError, match="shape"):
        w.step(np.zeros(3, int))
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        w.step(np.array([0, 7]))
    with pytest.raises(UserError, match="unknown environment"):
        make_env("no_such_world")
    p = make_env("pusher", num=2); p.reset()
    with pytest.raises(UserError, match="size 2"):
        p.step(np.zeros((2, 3), np.float32))


def test_episodes_have_the_documented_layout():
    ep = generate_episodes(DataConfig(env="pusher", size=16, episode_len=10), 5, seed=0)
    assert ep["frames"].shape == (5, 11, 16, 16, 3) and ep["actions"].shape == (5, 10, 2)
    assert ep["rewards"].shape == (5, 10) and (ep["lengths"] <= 11).all()
    assert np.abs(ep["actions"]).max() <= 1


def test_a_corpus_is_cached_by_what_makes_its_episodes():
    """The labelled corpus's cache does not depend on the action-free corpus's size (nor the other way round), on
    the held-out fraction, or on where it is cached; it does on its own size and on the world's settings."""
    from data import cache_path
    base = DataConfig()
    for labelled, other, own in ((True, "n_free", "n_labelled"), (False, "n_labelled", "n_free")):
        name = os.path.basename(cache_path(base, labelled))
        for change in ({other: 7}, {"heldout": 0.5}, {"data_dir": "elsewhere"}):
            assert os.path.basename(cache_path(replace(base, **change), labelled)) == name
        for change in ({own: 7}, {"size": 16}, {"seed": 1}, {"sticky": 0.5}):
            assert os.path.basename(cache_path(replace(base, **change), labelled)) != name


def test_evaluation_clips_are_spread_over_every_held_out_episode():
    """154 held-out episodes, 3 windows each, 96 clips: 96 different episodes from the first to the last, every window
    used; more clips than episodes: every episode, several windows each."""
    from data import spread_clips
    lengths = np.full(154, 33)
    e, s = spread_clips(lengths, 9, 96)
    assert len(set(e.tolist())) == 96 and e.min() == 0 and e.max() >= 150
    assert set(s.tolist()) == {1, 10, 19} and len(set(zip(e.tolist(), s.tolist()))) == 96
    e, s = spread_clips(lengths, 9, 300)
    assert set(e.tolist()) == set(range(154)) and len(set(zip(e.tolist(), s.tolist()))) == 300
    e, _ = spread_clips(np.array([33, 5, 33]), 9, 10)                   # an episode too short for a clip is skipped
    assert set(e.tolist()) == {0, 2} and len(e) == 6                    # and the clips are capped at the 6 windows
    e, s = spread_clips(np.array([33, 10]), 9, 10)                      # episodes of different lengths: no clip twice
    assert sorted(zip(e.tolist(), s.tolist())) == [(0, 1), (0, 10), (0, 19), (1, 1)]


# ----------------------------------------------------------------------------------------------
# the backbone and the adapter

@pytest.mark.parametrize("kind", BACKBONE_KINDS)
@pytest.mark.parametrize("adapter", ["film", "input", "none"])
@pytest.mark.parametrize("world", list(SPECS))
def test_shapes(kind, adapter, world):
    m = WorldModel(new_backbone(kind), adapter, SPECS[world])
    args = backbone_input(kind)
    y = m(*args, actions=actions_for(SPECS[world], 2, 3))
    assert y.shape == ((2, 3, 3, 16, 16) if kind == "dit" else (2, 3 * 16, SMALL_AR.codes))
    y2 = m(*(a[:, :2] for a in args), actions=actions_for(SPECS[world], 2, 2))
    assert y2.shape[1] == y.shape[1] * 2 // 3


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
@pytest.mark.parametrize("adapter", ["film", "input"])
@pytest.mark.parametrize("world", list(SPECS))
def test_attached_adapter_leaves_a_trained_backbone_unchanged(kind, adapter, world):
    bb = trained_backbone(kind)
    args = backbone_input(kind)
    with torch.no_grad():
        before = bb(*args)
        after = WorldModel(bb, adapter, SPECS[world])(*args, actions=actions_for(SPECS[world], 2, 3))
    assert before.abs().mean() > 1e-3                                  # the backbone is not trivially zero
    assert torch.equal(before, after)


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_adapter_changes_output_once_trained_and_is_per_frame(kind):
    """After a few steps of training the adapter responds to actions, and only in the frame they lead into:
    a token never sees an action that comes after its frame."""
    m = WorldModel(trained_backbone(kind), "film", SPECS["coin"])
    opt = torch.optim.Adam(m.adapter.parameters(), 1e-2)
    x = torch.rand(4, 3, 3, 16, 16) * 2 - 1
    for _ in range(3):
        loss = LOSSES[kind](m, x, actions_for(SPECS["coin"], 4, 3), motion_c=0.0, cell=m.backbone.cell)
        opt.zero_grad(); loss.backward(); opt.step()
    a = torch.zeros(2, 3, dtype=torch.long)
    b = a.clone(); b[:, 2] = 4                                          # change only the action into frame 2
    args = backbone_input(kind)
    with torch.no_grad():
        ya, yb = frames_of(m(*args, actions=a)), frames_of(m(*args, actions=b))
    assert torch.equal(ya[:, :2], yb[:, :2])                            # earlier frames never see a later action
    assert not torch.allclose(ya[:, 2], yb[:, 2])


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_causality_later_frames_do_not_change_earlier_outputs(kind):
    m = WorldModel(trained_backbone(kind), "film", SPECS["coin"]).eval()
    args, a = backbone_input(kind), actions_for(SPECS["coin"], 2, 3)
    other = backbone_input(kind, seed=1)
    args2 = tuple(torch.cat([u[:, :2], v[:, 2:]], 1) for u, v in zip(args, other))   # only frame 2 differs
    with torch.no_grad():
        y, y2 = frames_of(m(*args, actions=a)), frames_of(m(*args2, actions=a))
    assert torch.allclose(y[:, :2], y2[:, :2], atol=1e-6)
    assert not torch.allclose(y[:, 2], y2[:, 2])


def test_gpt_codes_are_causal_inside_a_frame_too():
    """The logits of slot (i, p) depend on codes strictly before it in sampling order, never on (i, p) or later."""
    m = WorldModel(trained_backbone("ar"), "film", SPECS["coin"]).eval()
    (z,), a = backbone_input("ar"), actions_for(SPECS["coin"], 2, 3)
    z2 = z.clone()
    z2[:, 1, 5:] = (z2[:, 1, 5:] + 1) % SMALL_AR.codes                 # change frame 1 from code 5 on
    with torch.no_grad():
        y, y2 = m(z, actions=a), m(z2, actions=a)
    cut = 16 + 5                                                        # slot (1, 5)
    assert torch.allclose(y[:, :cut + 1], y2[:, :cut + 1], atol=1e-6)  # slot (1, 5) itself reads only codes < 5
    assert not torch.allclose(y[:, cut + 1:], y2[:, cut + 1:])


def test_kv_cache_gives_the_logits_of_a_full_forward_pass():
    m = WorldModel(trained_backbone("ar"), "film", SPECS["pusher"]).eval()
    (z,), a = backbone_input("ar"), actions_for(SPECS["pusher"], 2, 3)
    for g in m.adapter.g:                                               # a non-trivial adapter
        torch.nn.init.normal_(g[-1].weight, std=0.1)
    with torch.no_grad():
        full = m(z, actions=a)
        cache = m.backbone.new_cache()
        parts = [m(z, cache=cache, stop=20, actions=a)]                 # a prefill, then one slot at a time
        parts += [m(z, cache=cache, stop=s, actions=a) for s in range(21, 49)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    x, acts = torch.rand(2, 1, 3, 16, 16) * 2 - 1, actions_for(SPECS["pusher"], 2, 6)
    g = lambda: torch.Generator().manual_seed(0)
    r1 = rollout(m, x, acts, temperature=1.0, generator=g())
    r2 = rollout(m, x, acts, temperature=1.0, generator=g(), use_cache=False)
    assert r1.shape == (2, 5, 3, 16, 16) and torch.equal(r1, r2)       # same samples with and without the cache


def test_per_frame_modulation_equals_the_gathered_one():
    """The DiT's adaLN broadcasts each frame's (scale, shift) over its tokens instead of copying them to every
    token (per_token): the same values, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x, scale, shift = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 3 * 5, 4), (2, 3, 4), (2, 3, 4)))
    frames = torch.arange(3).repeat_interleave(5)                        # 3 frames of 5 tokens each
    fast, gathered = per_frame(x, 5, scale, shift), x * per_token(scale, frames) + per_token(shift, frames)
    assert torch.allclose(fast, gathered, atol=1e-6) and torch.equal(per_frame(x, 5, scale), x * per_token(scale, frames))
    grads = [torch.autograd.grad(y.square().sum(), (x, scale, shift)) for y in (fast, gathered)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


@pytest.mark.parametrize("clip_len", [2, 3])
def test_dit_context_cache_gives_the_frames_of_full_forward_passes(clip_len):
    """The DiT's context keys and values, computed once per chunk instead of at every Euler step, change no frame;
    a context shared by several action sequences (a planner's candidates) gives each the frames it would give alone,
    with the noise of its first sequence."""
    torch.manual_seed(0)
    m = WorldModel(DiT(replace(SMALL, clip_len=clip_len)), "film", SPECS["pusher"]).eval()
    for prm in m.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    ctx, acts = torch.rand(2, 1, 3, 16, 16) * 2 - 1, actions_for(SPECS["pusher"], 2, 6)
    g = lambda: torch.Generator().manual_seed(0)
    for chunk in range(1, clip_len):
        cached, full = (rollout(m, ctx, acts, chunk=chunk, generator=g(), use_cache=c) for c in (True, False))
        assert cached.shape == (2, 5, 3, 16, 16) and torch.allclose(cached, full, atol=1e-5)
    futures = actions_for(SPECS["pusher"], 6, 6, seed=1)
    futures[:, 0] = acts[:, 0].repeat_interleave(3, 0)                 # 3 futures per context share its own action
    futures[::3] = acts
    shared = rollout(m, ctx, futures, generator=g())
    assert torch.allclose(shared[::3], rollout(m, ctx, acts, generator=g()), atol=1e-5)
    assert not torch.allclose(shared[0], shared[1])
    with pytest.raises(UserError, match="agree on the context"):
        rollout(m, ctx, actions_for(SPECS["pusher"], 6, 6, seed=2))


@pytest.mark.parametrize("depth", [1, 2])
def test_dit_predicting_only_the_last_frames_changes_no_output(depth):
    """DiT.forward(last=n) returns the last n frames of the full forward pass (the earlier frames are keys and values
    only in the final block), with a cache too; the flow-matching loss, which asks only for the frames it scores,
    equals the loss on the full output; forward_flops counts what runs then."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from model import forward_flops
    torch.manual_seed(0)
    m = WorldModel(DiT(replace(SMALL, depth=depth)), "film", SPECS["coin"]).eval()
    for prm in m.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    (x, tau), a = backbone_input("dit"), actions_for(SPECS["coin"], 2, 3)
    with torch.no_grad():
        full = m(x, tau, actions=a)
        for n in (1, 2, 3):
            assert torch.allclose(m(x, tau, actions=a, last=n), full[:, -n:], atol=1e-6)
        cache = m.backbone.new_cache()
        m(x[:, :1], tau[:, :1], cache=cache, actions=a[:, :1])
        assert torch.allclose(m(x, tau, cache=cache, last=1, actions=a), full[:, -1:], atol=1e-6)
        for n in (1, 2):                              # n = 2: a clip may hold a clean frame that is predicted, not scored
            noise = flow_matching_noise(x.shape, "cpu", torch.Generator().manual_seed(n), denoise_frames=n)
            t = noise["tau"][:, :, None, None, None]
            per_frame = (m((1 - t) * x + t * noise["eps"], noise["tau"], actions=a) - x).pow(2).mean((2, 3, 4))
            scored = (noise["tau"] > 0).float()
            want = (per_frame * scored).sum() / scored.sum()
            assert flow_matching_loss(m, x, a, noise=noise).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ask for 1 to 3"):
        m(x, tau, actions=a, last=4)
    bb = DiT(replace(SMALL, depth=depth))
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        bb(x[:1], tau[:1], last=1)
    assert forward_flops(bb, 3, last=1) == pytest.approx(fc.get_total_flops(), rel=1e-6)
    assert forward_flops(bb, 3, last=1) < forward_flops(bb, 3)


def test_bench_times_the_cache_and_no_cache_in_turn_and_keeps_each_ones_best(monkeypatch, capsys):
    """bench.py's rollout columns (timings stubbed): the DiT's cached and uncached rollouts are timed round by round
    and each keeps its fastest round, so a machine that slows down midway slows both; the GPT has no uncached column."""
    import bench
    rounds = {True: iter([4.0, 1.0, 3.0, 2.0] * 3), False: iter([5.0, 2.0, 6.0, 9.0] * 3)}
    timed = lambda fn, device, repeat, warmup=2: next(rounds[fn.__defaults__[0]]) if fn.__defaults__ else 1.0
    monkeypatch.setattr(bench, "timed", timed)
    monkeypatch.setattr(bench, "train_step", lambda *a, **kw: (0.5, 10, 100, 1e9))
    dev = torch.device("cpu")
    dit, ar = (bench.preset_rates(kind, "tiny", dev, None, 1e10, None) for kind in ("dit", "ar"))
    assert dit["rollout_fps_b1"] == 8.0 and dit["rollout_fps_b1_nocache"] == 4.0 and dit["cache_gain_b1"] == 2.0
    assert dit["cache_gain_b32"] == 2.0 and not any("nocache" in c or "gain" in c for c in ar)
    bench.show(dict(device="cpu", matmul_peak_gflops=10.0, nominal=None, runs={"dit/tiny": dit, "ar/tiny": ar},
                    mpc_ms_default=1.0, mpc_ms_256x8=2.0, peak_memory_mb=3.0))
    assert "dit/tiny 2.00x at batch 1, dit/tiny 2.00x at batch 32" in capsys.readouterr().out


def test_tokenizer_round_trip():
    """A few hundred steps on a handful of frames: the codes decode back to the frames (above 20 dB; an untrained
    tokenizer scores about 9 dB), and the codebook is used."""
    from model import make_tokenizer
    torch.manual_seed(0)
    ep = generate_episodes(DataConfig(env="pusher", size=16), 2, seed=0)
    x = torch.from_numpy(ep["frames"][:, ::4]).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1   # (18, 3, 16, 16)
    tok = make_tokenizer(ARConfig(size=16, codes=64, tok_width=16))
    opt = torch.optim.Adam(tok.parameters(), 3e-3)
    for _ in range(300):
        loss, _ = tok.loss(x)
        opt.zero_grad(); loss.backward(); opt.step()
    tok.eval()
    ids = tok.encode(x)
    assert ids.shape == (18, 16) and ids.dtype == torch.long and ids.unique().numel() > 8
    mse = ((tok.decode(ids) - x) / 2).pow(2).mean()
    assert -10 * torch.log10(mse) > 20, f"round trip psnr {-10 * torch.log10(mse):.1f} dB"
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # as the GPT's loss runs it on CUDA: the same
        assert torch.equal(tok.encode(x), ids) and tok.decode(ids).dtype == torch.float32     # codes, float32 frames


def test_sample_py_samples_as_the_checkpoint_was_evaluated_unless_told(capsys):
    from argparse import Namespace
    from sample import sampling_args
    ck = dict(backbone="dit", config=dict(sample_steps=2, temperature=None, top_k=None))
    unset = Namespace(ckpt="c.pt", steps=None, temperature=None, top_k=None)
    assert sampling_args(unset, ck) == dict(steps=2, temperature=0.0, top_k=0)
    assert sampling_args(Namespace(ckpt="c.pt", steps=8, temperature=None, top_k=None), ck)["steps"] == 8
    gpt = dict(backbone="ar", config=dict(temperature=0.7, top_k=5))
    got = sampling_args(Namespace(ckpt="c.pt", steps=3, temperature=None, top_k=None), gpt)   # (the GPT reads no steps)
    assert (got["temperature"], got["top_k"]) == (0.7, 5)
    assert "samples without --steps: ignored" in capsys.readouterr().out


def test_wrong_action_shapes_are_user_errors():
    m = WorldModel(DiT(SMALL), "film", SPECS["coin"])
    x, tau = torch.randn(2, 3, 3, 16, 16), torch.rand(2, 3)
    with pytest.raises(UserError, match="discrete actions of shape"):
        m(x, tau, actions=torch.zeros(2, 3, 2))
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        rollout(m, x[:, :1], torch.full((2, 3), 9))                        # values are checked once per rollout
    mp = WorldModel(VideoGPT(SMALL_AR), "film", SPECS["pusher"])
    with pytest.raises(UserError, match="continuous actions of shape"):
        mp(*backbone_input("ar"), actions=torch.zeros(2, 3, 5))


@pytest.mark.parametrize("adapter", ["film", "input"])
def test_deepcopy_is_an_independent_model_and_stale_actions_fail_loudly(adapter):
    """An EMA copy made with copy.deepcopy applies its own actions through its own weights; a backbone called on its
    own after a WorldModel forward raises instead of reusing that forward's actions."""
    m = WorldModel(trained_backbone("dit"), adapter, SPECS["coin"]).eval()
    for prm in m.adapter.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    twin = copy.deepcopy(m)
    args, a, b = backbone_input("dit"), torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 4)
    with torch.no_grad():
        ya, yb = m(*args, actions=a), m(*args, actions=b)
        assert torch.equal(twin(*args, actions=b), yb) and not torch.allclose(ya, yb)
        for prm in twin.adapter.parameters():
            prm.add_(0.5)
        assert not torch.allclose(twin(*args, actions=b), yb)          # the copy reads its own adapter...
        assert torch.equal(m(*args, actions=b), yb)                    # ...and the original is untouched
        with pytest.raises(RuntimeError, match="call its WorldModel"):
            m.backbone(*args)


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_rollout_rejects_bad_inputs_by_name(kind):
    """NaN context frames, NaN or mis-sized actions, wrong shapes: a UserError that names the problem; a model whose
    weights are not finite: an error, never NaN frames."""
    m = WorldModel(new_backbone(kind), "film", SPECS["pusher"]).eval()
    ctx, good = torch.zeros(2, 1, 3, 16, 16), torch.zeros(2, 4, 2)
    nan = float("nan")
    for bad_ctx, acts, match in [(torch.full_like(ctx, nan), good, "context frames hold NaN"),
                                 (ctx, torch.full_like(good, nan), "actions hold NaN"),
                                 (ctx, torch.zeros(2, 4, 3), "continuous actions of shape"),
                                 (ctx, torch.zeros(2, 4, 2, dtype=torch.long), "floats"),
                                 (ctx, good[:, :1], "at least one new frame"),
                                 (torch.zeros(2, 1, 3, 32, 32), good, "context must be frames"),
                                 (ctx, good[:1], "action sequences"),
                                 (ctx, torch.zeros(4), "actions must be"),
                                 (ctx, good.tolist(), "actions must be a torch tensor"),
                                 (ctx.numpy(), good, "context must be a torch tensor")]:
        with pytest.raises(UserError, match=match):
            rollout(m, bad_ctx, acts)
    assert torch.isfinite(rollout(m, ctx, good)).all()
    with torch.no_grad():
        for prm in m.backbone.parameters():
            prm.fill_(nan)
    with pytest.raises(UserError, match="not finite"):
        rollout(m, ctx, good, temperature=1.0)


# ----------------------------------------------------------------------------------------------
# the loss and the sampler

def test_motion_weights_uniform_without_motion_and_peaked_where_pixels_change():
    still = torch.rand(1, 1, 3, 16, 16).expand(2, 3, 3, 16, 16) * 2 - 1
    w = motion_weights(still, 4)
    assert w.shape == (2, 3, 4, 4) and torch.allclose(w, torch.ones_like(w))
    moving = still.clone()
    moving[:, 2, :, 0:4, 8:12] = -moving[:, 2, :, 0:4, 8:12] + 0.5       # one cell changes in frame 2
    w = motion_weights(moving, 4, c=1.0)
    assert torch.allclose(w[:, :2], torch.ones_like(w[:, :2]))
    assert w[0, 2, 0, 2] == w[0, 2].max() and w[0, 2, 0, 2] > 2 * w[0, 2, 3, 3]
    assert torch.allclose(w[:, 2].mean((1, 2)), torch.ones(2))        # the mean weight of a frame stays 1
    assert w.max() <= 8.0 + 1e-5                                        # bounded
    panning = still.clone()
    panning[:, 2] = still[:, 1].roll(4, -1)                              # frame 2: the whole view shifts (a camera)
    panning[:, 2, :, 0:4, 8:12] += 0.5                                   # and one cell changes more than the rest
    w = motion_weights(panning, 4, c=1.0)
    assert torch.allclose(w[:, 2], torch.ones_like(w[:, 2]))            # every cell moved: no reweighting


def test_training_clips_denoise_the_next_frame_unless_told_more():
    """By default every clip keeps all but its last frame clean (next-frame prediction, what rollouts ask);
    denoise_frames n noises the last 1..n frames, each at its own level."""
    g = lambda: torch.Generator().manual_seed(0)
    tau = flow_matching_noise((256, 4, 3, 16, 16), "cpu", g())["tau"]
    assert (tau[:, :3] == 0).all() and (tau[:, 3] > 0).all()
    tau = flow_matching_noise((256, 4, 3, 16, 16), "cpu", g(), denoise_frames=2)["tau"]
    noised = (tau > 0).sum(1)
    assert set(noised.tolist()) == {1, 2} and (tau[:, :2] == 0).all()
    assert not torch.equal(tau[noised == 2, 2], tau[noised == 2, 3])            # independent levels
    many = flow_matching_noise((256, 4, 3, 16, 16), "cpu", g(), denoise_frames=9)["tau"]
    assert set((many > 0).sum(1).tolist()) == {1, 2, 3}                         # one clean frame kept at least


def test_sampler_recovers_a_known_answer():
    """Data: one of two fixed frames a, b, equally likely. The exact clean-frame predictor is the posterior mean
    E[x0 | x_t] (a Gaussian likelihood N(x_t; (1 - t) x0, t^2)); integrating its velocity must land on a or b."""
    a, b = torch.full((3, 16, 16), 0.5), torch.full((3, 16, 16), -0.5)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.spec = DiT(DiTConfig(size=16, patch=4, clip_len=3, width=8, depth=1, heads=1)), None

        def forward(self, x, tau, actions=None, last=None, **cache):   # computes every frame: no cache
            t = tau[:, :, None, None, None].clamp(min=1e-4)
            la, lb = (-(x - (1 - t) * c).pow(2).sum((2, 3, 4), keepdim=True) / (2 * t ** 2) for c in (a, b))
            wa = torch.sigmoid(la - lb)
            return (wa * a + (1 - wa) * b)[:, -(last or x.shape[1]):]

    for chunk in (1, 2):                                                # frame by frame, and two frames at once
        g = torch.Generator().manual_seed(0)
        out = rollout(Oracle(), torch.zeros(16, 1, 3, 16, 16), torch.zeros(16, 5, dtype=torch.long), steps=10,
                      chunk=chunk, generator=g)
        assert out.shape == (16, 4, 3, 16, 16)
        err_a, err_b = ((out - a).abs().amax((2, 3, 4)), (out - b).abs().amax((2, 3, 4)))
        assert torch.all(torch.minimum(err_a, err_b) < 1e-3)            # every frame is one of the two
        assert (err_a < 1e-3).any() and (err_b < 1e-3).any()           # and both are found


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = WorldModel(DiT(SMALL), "film", SPECS["coin"])
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    x = (torch.rand(4, 1, 3, 16, 16) * 2 - 1).repeat(1, 3, 1, 1, 1)    # still backgrounds and a block moving across
    for t in range(3):                                                   # (so that the motion weights are not uniform)
        x[:, t, :, 4:8, 2 + 3 * t:6 + 3 * t] = 1.0
    a = actions_for(SPECS["coin"], 4, 3)
    losses = []
    for _ in range(150):
        loss = flow_matching_loss(m, x, a, motion_c=1.0, generator=torch.Generator().manual_seed(0))   # same noise every step
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_psnr_and_ssim_on_known_answers():
    from train import psnr, ssim
    x = torch.rand(3, 2, 3, 16, 16) * 2 - 1
    assert torch.allclose(psnr(x, x), torch.full((3,), 20 * np.log10(510.0)))     # error floored at half a grey level
    assert torch.allclose(ssim(x, x), torch.ones(3))
    shifted = (x.clamp(-0.8, 0.8) + 0.2)                               # +0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(shifted, x.clamp(-0.8, 0.8)), torch.full((3,), 20.0), atol=1e-4)
    a, b = (torch.full((1, 1, 3, 16, 16), v, dtype=torch.float64) for v in (0.2, -0.4))   # 0.6 and 0.3 on [0, 1]
    c1 = 0.01 ** 2                                                      # constant images: the luminance term alone
    assert ssim(a, b).item() == pytest.approx((2 * 0.6 * 0.3 + c1) / (0.6 ** 2 + 0.3 ** 2 + c1), rel=1e-9)
    y = x.clone(); y[:, :, :, :8] = -y[:, :, :, :8]                   # a structural change scores lower
    assert (ssim(y, x) < 0.9).all()


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_flop_formula_counts_what_runs(kind):
    """forward_flops (the MFU numerator) matches torch's own FLOP counter on a clip, attention included."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from model import forward_flops, tokenizer_flops
    bb = new_backbone(kind)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        bb(*backbone_input(kind, B=1))
    assert forward_flops(bb, 3) == pytest.approx(fc.get_total_flops(), rel=1e-6)
    if kind == "ar":
        with FlopCounterMode(display=False) as fc:
            bb.tokenizer.encode(torch.zeros(3, 3, 16, 16))
        assert tokenizer_flops(bb.tokenizer, 3 * bb.n_tok) == pytest.approx(fc.get_total_flops(), rel=1e-6)


def test_mfu_reads_the_device_by_name_and_counts_one_process_share(monkeypatch):
    """The peak table matches a GPU's name word for word ('L4' is not an 'L40S', 'A100' not an 'RTX A1000'), and under
    torchrun each process is credited with its share of the global batch's FLOPs."""
    from model import gpu_peak
    from train import throughput
    assert gpu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12 and gpu_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12 and gpu_peak("NVIDIA L4")[0] == 121e12
    assert gpu_peak("NVIDIA L40S")[0] == 362e12
    assert gpu_peak("NVIDIA RTX A1000")[0] is None and gpu_peak("NVIDIA L40")[0] is None
    assert throughput(4e9, 1000, "cpu", world=2) == "2.0 GFLOP/s"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert throughput(2 * 989e12, 1000, "cuda", world=2).startswith("MFU 100.0% of H200")


def test_a_training_step_too_big_for_the_cpu_memory_is_said_before_it_is_killed(monkeypatch):
    """The gpu preset at batch 64 needs ~50 GB of activations on a CPU: the kernel killed it without a word on a
    24 GB machine; now the first lines say so and name a batch size that fits. The tiny preset says nothing."""
    import train
    monkeypatch.setattr(train.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 24 * 2 ** 30 // 4096)
    notes = []
    for argv in (["--preset", "gpu"], []):
        cfg = train.parse_args(argv)
        train.resolve(cfg, torch.device("cpu"))
        notes.append(train.memory_note(cfg, train.describe(cfg, None, None)["model_args"]))
    fits = int(re.search("--batch_size ([0-9]+) fits", notes[0]).group(1))
    assert "would likely be killed" in notes[0] and 1 <= fits < 64 and notes[1] == ""
    cfg = train.parse_args(["--preset", "gpu", "--batch_size", str(fits)])
    train.resolve(cfg, torch.device("cpu"))
    assert train.memory_note(cfg, train.describe(cfg, None, None)["model_args"]) == ""


def test_a_short_stage_still_reaches_the_peak_learning_rate():
    """--max_iters 50 with the default 100 warm-up steps once trained at half the learning rate at most."""
    from train import lr_at, parse_args
    cfg = parse_args(["--lr", "0.001"])
    for iters in (50, 1000):
        lrs = [lr_at(i, cfg, iters) for i in range(iters)]
        assert max(lrs) == pytest.approx(0.001) and lrs[0] < 0.001 / 10 and lrs[-1] < 0.001 / 5
    assert lr_at(0, cfg, 1) > 0                                          # one step: no warm-up, no division by zero


def test_resume_command_names_resume_once_and_bool_flags_are_strict():
    from types import SimpleNamespace
    from train import parse_args, resume_command
    argv = ["train.py", "--resume", "true", "--compile", "false", "--out", "x y"]
    assert resume_command(SimpleNamespace(world=1), argv) == "python train.py --compile false --out 'x y' --resume"
    assert resume_command(SimpleNamespace(world=2), ["train.py", "--resume=1"]).startswith("torchrun --nproc_per_node=2")
    assert parse_args(["--resume", "off"]).resume is False and parse_args(["--resume"]).resume is True
    with pytest.raises(SystemExit):
        parse_args(["--resume", "ture"])                                # a typo is an error, not a silent False


def loss_and_grads(model, fwd, kind, x, a, bf16=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = LOSSES[kind](fwd, x, a, 0.0, cell=model.backbone.cell, generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def compile_and_bf16_gaps():
    """The GPU path, exercised on the CPU, against eager fp32 (adapter attached): the training loss and gradient of each
    backbone through torch.compile (inductor) and under bf16 autocast, and a DiT rollout (4 frames, 2 Euler steps)
    through a compiled model and under bf16. -> the relative gaps, as numbers (see compile_results)."""
    out = {}
    for kind in BACKBONE_KINDS:
        m = WorldModel(trained_backbone(kind), "film", SPECS["coin"])
        for g in m.adapter.g:
            torch.nn.init.normal_(g[-1].weight, std=0.1)
        x, a = torch.rand(4, 3, 3, 16, 16) * 2 - 1, actions_for(SPECS["coin"], 4, 3)
        loss, grad = loss_and_grads(m, m, kind, x, a)
        c_loss, c_grad = loss_and_grads(m, torch.compile(m, dynamic=False), kind, x, a)
        b_loss, b_grad = loss_and_grads(m, m, kind, x, a, bf16=True)
        out[kind] = dict(compile_loss=abs(c_loss / loss - 1), compile_grad=((c_grad - grad).norm() / grad.norm()).item(),
                         bf16_loss=abs(b_loss / loss - 1), bf16_cos=F.cosine_similarity(b_grad, grad, 0).item())
    torch.manual_seed(0)
    m = WorldModel(DiT(replace(SMALL, clip_len=2)), "film", SPECS["pusher"]).eval()   # one window shape: one graph
    for layer in [m.backbone.out, m.backbone.out_ada] + [g[-1] for g in m.adapter.g]:
        torch.nn.init.normal_(layer.weight, std=0.05)
    ctx, acts = torch.rand(2, 1, 3, 16, 16) * 2 - 1, actions_for(SPECS["pusher"], 2, 5)
    go = lambda model: rollout(model, ctx, acts, steps=2, generator=torch.Generator().manual_seed(0))
    ref = go(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = (go(m).float() - ref).abs().mean().item()
    out["rollout"] = dict(compile=(go(torch.compile(m, dynamic=False)) - ref).abs().mean().item(), bf16=bf16)
    return out


@pytest.fixture(scope="session", autouse=True)
def compile_results(request, tmp_path_factory):
    """Inductor on a CPU compiles for about a minute: when a compile test is selected, compile_and_bf16_gaps runs in
    a process of its own from the start of the session, beside the other tests, and its test reads the numbers."""
    if not any("compiled" in item.name for item in request.session.items):
        yield None
        return
    path = tmp_path_factory.mktemp("compile") / "gaps.json"
    code = "import json, sys, test_all; json.dump(test_all.compile_and_bf16_gaps(), open(sys.argv[1], 'w'))"
    err = open(path.with_suffix(".err"), "w")                   # a file, not a pipe: a full pipe would block the child
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=HERE, stderr=err,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield lambda: (p.wait(900), json.load(open(path)) if p.returncode == 0 else
                   pytest.fail(open(path.with_suffix(".err")).read()[-2000:]))[1]
    p.kill()
    err.close()


def test_compiled_and_bf16_steps_and_rollouts_match_eager_fp32(compile_results):
    """Compile is the same math in fused kernels: loss within 1e-4 and gradient within 1e-3 (relative), rollout frames
    within 1e-4 (mean absolute, frames in [-1, 1]). bf16 keeps 8 mantissa bits: loss within 2%, gradient cosine above
    0.99, rollout frames within 3e-2."""
    gaps = compile_results()
    for kind in BACKBONE_KINDS:
        g = gaps[kind]
        assert g["compile_loss"] < 1e-4 and g["compile_grad"] < 1e-3 and g["bf16_loss"] < 2e-2 and g["bf16_cos"] > 0.99, g
    assert gaps["rollout"]["compile"] < 1e-4 and gaps["rollout"]["bf16"] < 3e-2, gaps["rollout"]


# ----------------------------------------------------------------------------------------------
# scripts end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the whole recipe, shared by the end-to-end tests."""
    d = tmp_path_factory.mktemp("run")
    r = run("train.py", "--out", str(d / "out"), "--data_dir", str(d / "data"), "--max_iters", "3", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def test_train_writes_checkpoints_metrics_and_gif(tiny_run):
    out = tiny_run / "out"
    m = json.load(open(out / "metrics.json"))
    for k in ("psnr", "ssim", "psnr_shuffled", "psnr_copy_last", "pos_err", "pos_err_shuffled", "horizon",
              "train_seconds", "device"):
        assert k in m
    assert m["horizon"] == 3 and np.isfinite(m["psnr"]) and np.isfinite(m["psnr_copy_last"])
    for f in ("pretrain.pt", "ckpt.pt", "rollout.gif", "train.log"):
        assert (out / f).exists()
    ck = read_checkpoint(str(out / "ckpt.pt"))
    assert ck["adapter"] == "film" and ck["step"] == 3 and ck["config"]["env"] == "coin"
    assert {"model", "ema", "optimizer", "generator", "sampler"} <= set(ck)


def test_checkpoints_load_without_pickle(tiny_run, tmp_path):
    """Every checkpoint loads with torch.load(weights_only=True); one written before that (numpy random states inside)
    still loads; one that needs pickle is refused with a one-line error; no load in the project allows pickle."""
    for f in ("pretrain.pt", "ckpt.pt"):
        torch.load(tiny_run / "out" / f, map_location="cpu", weights_only=True)
    ck = torch.load(tiny_run / "out" / "ckpt.pt", weights_only=True)
    old = dict(ck, rng=dict(numpy=np.random.RandomState(0).get_state(), torch=torch.get_rng_state()))
    torch.save(old, tmp_path / "old.pt")
    assert set(read_checkpoint(str(tmp_path / "old.pt"))["model"]) == set(ck["model"])
    torch.save(dict(ck, extra=Exception("code")), tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="needs pickle"):
        read_checkpoint(str(tmp_path / "pickled.pt"))
    unsafe = "weights_only=" + "False"                                   # (spelt apart: this file is searched too)
    for f in os.listdir(HERE):
        if f.endswith(".py"):
            assert unsafe not in open(os.path.join(HERE, f)).read().replace(" ", ""), f


def test_sample_writes_an_animated_gif_from_the_checkpoint_alone(tiny_run, tmp_path):
    from PIL import Image
    ckpt = tiny_run / "out" / "ckpt.pt"
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "x.gif"), "--horizon", "4",
            "--actions", "4,4,1", cwd=str(tiny_run))                                           # run where the data cache is
    assert r.returncode == 0 and "note" not in r.stdout, r.stderr[-2000:]
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "x.gif"), "--horizon", "2",
            "--actions", "4,4,1", "--temperature", "0.5", cwd=str(tiny_run))           # what does nothing is said
    assert r.returncode == 0 and "without --temperature: ignored" in r.stdout and "the last 1 is not used" in r.stdout
    assert Image.open(tmp_path / "x.gif").n_frames > 1
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(tiny_run / "out" / "pretrain.pt"), "--out", str(tmp_path / "z.gif"),
            "--horizon", "2", "--n", "1", "--actions", "9,9", cwd=str(tiny_run))   # no adapter: the actions are not read
    assert r.returncode == 0 and "so --actions is not read" in r.stdout, r.stderr[-2000:]
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "y.gif"), "--horizon", "99",
            "--n", "1", cwd=str(tiny_run))                                # longer than any episode: drawn shorter, said
    assert r.returncode == 0 and "99 asked" in r.stdout, r.stderr[-2000:]
    assert 1 < Image.open(tmp_path / "y.gif").n_frames < 99


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """A run stopped at step 3 of 6 (by a signal sent from inside step 3) and resumed ends with the weights of one
    never stopped: data order, noise, optimizer and the learning-rate schedule all continue. A run planned for 3 steps
    and continued to 6 follows a new schedule, and says so."""
    import train
    from envs import Stopped
    common = ["--stage", "scratch", "--env", "pusher", "--margin", "0", "--data_dir", str(tmp_path / "data"),
              "--max_iters", "6", *TINY_FLAGS]
    train.train(train.parse_args(["--out", str(tmp_path / "a"), *common]))
    step = train.StageTrainer.step

    def stop_in_step_3(self, i):
        loss = step(self, i)
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)                           # as Ctrl-C: the step finishes, then it saves
        return loss
    monkeypatch.setattr(train.StageTrainer, "step", stop_in_step_3)
    with pytest.raises(Stopped, match="at step 3/6"):
        train.train(train.parse_args(["--out", str(tmp_path / "b"), *common]))
    monkeypatch.undo()
    train.train(train.parse_args(["--out", str(tmp_path / "b"), "--resume", *common]))
    assert "resumed scratch" in (tmp_path / "b" / "train.log").read_text()
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert b["step"] == 6 and b["model_args"]["margin"] == 0               # an explicit 0 is not "unset"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    short = [f if f != "6" else "3" for f in common]
    assert run("train.py", "--out", str(tmp_path / "c"), *short).returncode == 0
    r = run("train.py", "--out", str(tmp_path / "c"), "--resume", *common)
    assert r.returncode == 0 and "scratch was planned for 3 iterations and continues to 6" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_it_stopped_at_and_resume_continues(tmp_path, sig):
    """Ctrl-C (or SIGTERM) mid-stage: the step in progress finishes, ckpt.pt holds that step, the exit is non-zero with
    no traceback and says how to resume; --resume continues from that step."""
    args = ["train.py", "--stage", "scratch", "--max_iters", "100000", "--out", str(tmp_path / "o"), "--data_dir",
            str(tmp_path / "data"), "--ckpt_seconds", "1000", *TINY_FLAGS]
    p = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "o" / "train.log"
    for _ in range(600):
        if log.exists() and "scratch step" in log.read_text():
            break
        time.sleep(0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and "Traceback" not in err and "--resume" in err, err[-2000:]
    step = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2 and f"at step {step}/" in err
    assert (out + err).count("Continue with") == 1 and "Continue with" in log.read_text()   # said once, and logged
    r = run(*args[:4], str(step + 2), *args[5:], "--resume")
    assert r.returncode == 0 and f"resumed scratch from {tmp_path / 'o' / 'ckpt.pt'} at step {step}/" in r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == step + 2


def test_two_processes_train_like_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on the CPU): each process trains on its half of the same global batch and
    the gradients are averaged, so after 3 steps the weights equal a single process's up to float summation order
    (within 1e-5); only the first process logs and writes, once."""
    common = ["--stage", "scratch", "--env", "pusher", "--data_dir", str(tmp_path / "data"), "--max_iters", "3",
              *TINY_FLAGS, "--log_interval", "3", "--eval_clips", "2"]
    assert run("train.py", "--out", str(tmp_path / "one"), *common).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--out", str(tmp_path / "two"), *common], cwd=HERE, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("scratch step     3/3") == 1 and "DDP world size 2" in r.stdout
    one, two = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def test_a_folder_takes_one_run_at_a_time(tiny_run, tmp_path):
    """A run marks its --out folder (.running, its pid) while it writes there: a second train.py or mbrl.py into the
    same folder is refused while the first process lives and nothing is written; a mark left by a process that is
    gone (killed outright) is taken over; a run removes its mark when it ends, stopped or not."""
    import subprocess
    import mbrl
    import train
    from envs import claimed
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])      # a live process, not us
    try:
        for folder in (tmp_path / "t", tmp_path / "m"):
            folder.mkdir()
            (folder / ".running").write_text(str(other.pid))
        with pytest.raises(UserError, match=f"another run \\(process {other.pid}\\) is writing to"):
            train.train(train.parse_args(["--out", str(tmp_path / "t"), "--max_iters", "2", *TINY_FLAGS,
                                          "--data_dir", str(tiny_run / "data")]))
        with pytest.raises(UserError, match="another run"):
            mbrl.main(mbrl.parse_args(["--out", str(tmp_path / "m")]))
        assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [".running"]      # no log, no checkpoint
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".running", "mbrl.log"]
        assert (tmp_path / "m" / "mbrl.log").read_text() == ""
    finally:
        other.kill(); other.wait()
    with claimed(tmp_path / "t"):                                         # its process is gone now: taken over
        assert (tmp_path / "t" / ".running").read_text() == str(os.getpid())
    assert not (tmp_path / "t" / ".running").exists()
    with pytest.raises(KeyboardInterrupt), claimed(tmp_path / "s"):
        raise KeyboardInterrupt                                           # a stopped run leaves no mark either
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []


def test_bad_inputs_give_one_line_errors_and_overwrite_nothing(tiny_run, tmp_path):
    def bad(*args, match):
        r = run(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad("train.py", "--env", "no_such_world", "--out", str(tmp_path / "x"), match="unknown environment")
    bad("train.py", "--backbone", "nosuch", "--out", str(tmp_path / "x"), match="unknown backbone")
    bad("train.py", "--distance", "l3", "--out", str(tmp_path / "x"), match="--distance 'l3'")
    bad("train.py", "--clip_len", "1", "--out", str(tmp_path / "x"), match="--clip_len 1")
    bad("train.py", "--n_free", "1", "--out", str(tmp_path / "x"), match="--n_free 1: must be 2 or more")
    bad("train.py", "--backbone", "ar", "--size", "24", "--down", "4", "--out", str(tmp_path / "x"), match="pass --down 3")
    bad("mbrl.py", "--elites", "1", "--out", str(tmp_path / "x"), match="--elites")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(5000))
    bad("sample.py", "--ckpt", str(junk), "--out", str(tmp_path / "y.gif"), match="not a readable checkpoint")
    bad("sample.py", "--ckpt", str(tmp_path / "none.pt"), match="no checkpoint")
    bad("sample.py", "--ckpt", str(tiny_run / "out" / "ckpt.pt"), "--actions", "1,0;0,1", match="does not fit")
    other = dict(torch.load(tiny_run / "out" / "ckpt.pt", weights_only=True), backbone="ar")
    torch.save(other, tmp_path / "other.pt")
    bad("train.py", "--stage", "finetune", "--init_from", str(tmp_path / "other.pt"), "--out", str(tmp_path / "z"),
        match="backbone")
    # a new run into a folder that holds a good checkpoint refuses, and leaves it untouched
    ck = tiny_run / "out" / "ckpt.pt"
    before = ck.read_bytes()
    bad("train.py", "--out", str(tiny_run / "out"), "--max_iters", "2", *TINY_FLAGS, match="--resume")
    # ... and so does --resume with another model's flags; an evaluation that cannot run is refused before training
    import train                                     # (in-process: both stop before any training)
    data = ("--data_dir", str(tiny_run / "data"))
    with pytest.raises(UserError, match=re.escape("--width 64 (the run has 32)")):
        train.train(train.parse_args(["--out", str(tiny_run / "out"), "--resume", "--max_iters", "3", *TINY_FLAGS,
                                      "--width", "64", *data]))
    assert ck.read_bytes() == before
    with pytest.raises(UserError, match="pass --horizon [0-9]+"):
        train.train(train.parse_args(["--out", str(tmp_path / "h"), "--max_iters", "3", *TINY_FLAGS, "--horizon", "40",
                                      *data]))
    assert not (tmp_path / "h" / "pretrain.pt").exists()
    assert "pass --horizon" in (tmp_path / "h" / "train.log").read_text()          # the log says why it stopped
    out = ["--out", str(tiny_run / "out"), "--resume", *TINY_FLAGS, *data]
    for argv, match in ((["--backbone", "ar"], "is a 'dit' run on 'coin', not 'ar'"),     # before the tokenizer stage
                        (["--max_iters", "5"], "ended at step 3 and .*ckpt.pt was built on it"),   # a longer pretrain
                        (["--max_iters", "3", "--adapter", "input"], re.escape("--adapter input (the run has film)")),
                        (["--max_iters", "3", "--lr", "0.5"], re.escape("--lr 0.5 (the run has")),   # the run's own flags
                        (["--max_iters", "3", "--stage", "scratch"], "holds the finetune stage \\(of --stage all\\)")):
        with pytest.raises(UserError, match=match):
            train.train(train.parse_args(out + argv))
    assert ck.read_bytes() == before and not (tiny_run / "out" / "tokenizer.pt").exists()
    metrics = (tiny_run / "out" / "metrics.json").read_bytes()            # resuming only the finished pretrain stage
    with pytest.raises(UserError, match="holds the evaluation of the stages pretrain -> finetune"):
        train.train(train.parse_args(out + ["--max_iters", "3", "--stage", "pretrain"]))   # would write over it
    assert (tiny_run / "out" / "metrics.json").read_bytes() == metrics
    import mbrl
    pre = str(tiny_run / "out" / "pretrain.pt")                         # a backbone with no adapter cannot plan
    with pytest.raises(UserError, match="has no action adapter"):
        mbrl.new_world_model(mbrl.parse_args(["--init_from", pre]), make_env("coin").spec, "cpu")
    tok, artok = tmp_path / "tokenizer.pt", tmp_path / "ar_tokenizer.pt"  # a file with no world model in it; one at 16 px
    torch.save(dict(torch.load(ck, weights_only=True), backbone="ar"), artok)
    torch.save({k: v for k, v in torch.load(ck, weights_only=True).items() if k not in ("ema", "model")} | {"stage": "tokenizer"}, tok)
    for argv, match in ((["--tokenizer", str(ck)], "--tokenizer is for --backbone ar"), (["--out", str(ck)], "is a file"),
                        (["--init_from", str(ck), "--size", "32"], "--size 32 .* was trained with 16"),
                        (["--backbone", "ar", "--tokenizer", str(ck), "--size", "32"], "holds a 'dit' model"),
                        (["--backbone", "ar", "--tokenizer", str(artok), "--size", "32"], "--size 32 but --tokenizer"),
                        (["--init_from", str(tok)], "holds only a tokenizer stage.*--tokenizer")):
        with pytest.raises(UserError, match=match):
            cfg = train.parse_args(argv)
            train.resolve(cfg, torch.device("cpu")), train.plan_stages(cfg)
    pre_dit, pre_ar = tmp_path / "pre_dit", tmp_path / "pre_ar"          # --stage finetune starts from out/pretrain.pt
    pre_dit.mkdir(); pre_ar.mkdir()
    (pre_dit / "pretrain.pt").write_bytes((tiny_run / "out" / "pretrain.pt").read_bytes())
    torch.save(dict(torch.load(tiny_run / "out" / "pretrain.pt", weights_only=True), backbone="ar"), pre_ar / "pretrain.pt")
    torch.save({k: v for k, v in torch.load(tok, weights_only=True).items()} | {"backbone": "ar", "tokenizer": {}}, artok)
    for argv, match in ((["--out", str(pre_dit)], "holds the 'dit' backbone, not 'ar'"),
                        (["--out", str(pre_ar), "--tokenizer", str(artok)], "--tokenizer .* would not be used")):
        with pytest.raises(UserError, match=match):
            cfg = train.parse_args(["--backbone", "ar", "--stage", "finetune", *argv])
            train.resolve(cfg, torch.device("cpu")), train.plan_stages(cfg)
    cfg = train.parse_args(["--init_from", str(ck), "--stage", "finetune"])
    train.resolve(cfg, torch.device("cpu"))
    assert (cfg.size, cfg.width, cfg.clip_len) == (16, 32, 2)            # the checkpoint's model, not the preset's
    import mbrl                                      # mbrl.py: a checkpoint's model is not overridden in silence
    for argv, match in ((["--init_from", str(ck), "--size", "32"], "--size 32 but --init_from"), (["--size", "18"], "--size 18: frames of 18 px"),
                        (["--init_from", str(ck), "--context", "2"], "--context 2 but --init_from"),
                        (["--init_from", str(ck), "--frame_skip", "3"], "--frame_skip 3 but --init_from")):
        with pytest.raises(UserError, match=match):
            mbrl.parse_args(argv)
    assert mbrl.parse_args(["--init_from", str(ck), "--width", "7"]).width == 32    # the checkpoint's, as recorded
    import data
    with pytest.raises(UserError, match="--preview should name a .gif"):
        data.main(["--preview", str(tmp_path / "x.txt")])
    import sample                                    # sample.py's flags are checked before the checkpoint loads
    for args, match in ((["--keys", "right"], "add --play"), (["--play", "--keys", "right,,left"], "'' is not a key"),
                        (["--n", "1000"], "64 episodes at most"), (["--steps", "0"], re.escape("at least 1 (got 4, 0, 16)")),
                        (["--out", str(tmp_path / "nodir" / "x.gif")], "no folder"),
                        (["--data_dir", str(ck)], "--data_dir .* is a file")):
        with pytest.raises(UserError, match=match):
            sample.main(["--ckpt", str(tmp_path / "never_read.pt"), *args])


def test_init_from_brings_its_model_and_the_early_horizon_check_uses_it(tiny_run, tmp_path):
    """--init_from a 2-frame 16-px model: the run takes its size and context (the tiny preset's would be 32 px), so
    evaluation needs 1 + horizon frames of 16 px; a --clip_len that contradicts the checkpoint is refused."""
    common = ["train.py", "--init_from", str(tiny_run / "out" / "ckpt.pt"), "--stage", "finetune", "--out",
              str(tmp_path / "o"), *TINY_FLAGS, "--max_iters", "1", "--horizon", "30", "--eval_clips", "1",
              "--data_dir", str(tiny_run / "data")]
    r = run(*common, "--clip_len", "6")
    assert r.returncode == 2 and "--clip_len 6 but --init_from" in r.stderr, r.stderr[-1500:]
    r = run(*common)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.load(open(tmp_path / "o" / "metrics.json"))["context"] == 1
    assert "ckpt.pt, trained on 'coin'" in r.stdout and "another world" not in r.stdout     # the log says where it starts
    import train
    ck = torch.load(tiny_run / "out" / "ckpt.pt", weights_only=True)
    assert "trained on 'coin' (another world)" in train.origins(train.parse_args(["--env", "pusher", "--tokenizer", "t.pt"]), None, ck)


def test_flags_are_checked_before_any_work(tmp_path):
    """Out-of-range numbers, impossible shapes and unknown devices are one-line errors at the start, not tracebacks
    (or silently wrong runs) later; mbrl.py does not overwrite a finished run; an undefined score is JSON null."""
    import mbrl, train
    for argv, match in ((["--lr", "-1"], "--lr -1.0: must be above 0"), (["--batch_size", "0"], "1 or more"),
                        (["--ema", "1"], "below 1"), (["--sample_steps", "0"], "--sample_steps 0"),
                        (["--max_iters", "-5"], "0 or more"), (["--seed", "-1"], "--seed -1: must be 0 or more")):
        with pytest.raises(UserError, match=re.escape(match)):
            train.parse_args(argv)
    for argv, match in ((["--heads", "3"], "multiple of --heads 3"), (["--patch", "5"], "multiple of --patch 5"),
                        (["--denoise_frames", "2"], "below --clip_len 2"),
                        (["--backbone", "ar", "--clip_len", "4", "--denoise_frames", "2"], "--denoise_frames is for --backbone dit")):
        with pytest.raises(UserError, match=match):
            train.resolve(train.parse_args(argv), torch.device("cpu"))
    assert "made for a CUDA GPU" in train.resolve(train.parse_args(["--preset", "gpu"]), torch.device("cpu"))
    assert train.resolve(train.parse_args(["--max_iters", "20"]), torch.device("cpu")).endswith("changed here: --max_iters")
    with pytest.raises(UserError, match="--max_iters sets every stage's iterations, and so do --pretrain_iters"):
        train.resolve(train.parse_args(["--max_iters", "20", "--pretrain_iters", "50"]), torch.device("cpu"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--data_dir .*a_file is a file: pass a folder"):   # (was a traceback)
        train.resolve(train.parse_args(["--data_dir", str(tmp_path / "a_file")]), torch.device("cpu"))
    for argv, match in ((["--gamma", "2"], "between 0 and 1"), (["--horizon", "0"], "--horizon 0"),
                        (["--elites", "40"], "at most --candidates 32"), (["--elites", "1"], "--elites 1: must be 2 or more"),
                        (["--episode_len", "4", "--context", "5"], "too short .* pass --episode_len 6 or more")):
        with pytest.raises(UserError, match=match):
            mbrl.parse_args(argv)
    with pytest.raises(UserError, match="choose auto, cpu, cuda"):
        pick_device("tpu")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a finished run"):
        mbrl.main(mbrl.parse_args(["--out", str(tmp_path)]))
    assert (tmp_path / "results.json").read_text() == "{}"
    assert mbrl.normalized(3.0, 1.0, 1.0) is None and mbrl.normalized(2.0, 1.0, 3.0) == 0.5
    assert mbrl.normalized(2.0, 1.0, float("nan")) is None                 # no true simulator: null, not NaN
    assert mbrl.normalized(1.0, 2.0, 0.5) is None                          # a true planner below random: no scale
    assert mbrl.replay_safe("cuda", "dit", 1) and not mbrl.replay_safe("cpu", "dit", 1)
    assert not mbrl.replay_safe("cuda", "ar", 1) and not mbrl.replay_safe("cuda", "dit", 2)   # caches across calls


def test_flags_that_would_do_nothing_are_refused(tmp_path, monkeypatch):
    """A flag of the other backbone, or one that only a mode not asked for reads, is a one-line error naming it, not
    a run that ignores it."""
    import bench, data, mbrl, train
    for parse, argv, match in ((train, ["--temperature", "1"], "--temperature is for --backbone ar, and this run's backbone is dit"),
                               (train, ["--backbone", "ar", "--distance", "l1"], "--distance is for --backbone dit"),
                               (mbrl, ["--tokenizer_iters", "5"], "--tokenizer_iters is for --backbone ar"),
                               (mbrl, ["--backbone", "ar", "--plan_steps", "2"], "--plan_steps is for --backbone dit")):
        with pytest.raises(UserError, match=match):
            parse.parse_args(argv)
    assert train.parse_args(["--backbone", "ar", "--temperature", "1"]).temperature == 1
    with pytest.raises(UserError, match="--out, --episodes are for --record: add --record ENV"):
        data.main(["--out", str(tmp_path / "rec"), "--episodes", "3"])
    for argv, match in ((["--png", str(tmp_path / "b.png")], "is where --curves draws: add --curves"),
                        (["--profile", "mpc", "--json", str(tmp_path / "b.json")], "--profile .* drop --json")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        with pytest.raises(UserError, match=match):
            bench.main()
    assert not os.listdir(tmp_path)


def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """check_out_file probes the file before the work that fills it: a file where a folder should be, a missing
    folder, a folder this process may not write; an existing file is probed without losing a byte."""
    from envs import check_out_file
    (tmp_path / "f").write_text("x")
    for path, match in ((tmp_path / "f" / "b.json", "f is a file: pass a folder"), (tmp_path / "no" / "b.json", "no folder")):
        with pytest.raises(UserError, match=match):
            check_out_file(str(path), "--json", ".json")
    if os.geteuid() != 0:                                      # root may write anywhere
        ro = tmp_path / "ro"; ro.mkdir(); ro.chmod(0o500)
        with pytest.raises(UserError, match="cannot be written"):
            check_out_file(str(ro / "b.json"), "--json", ".json")
        ro.chmod(0o700)
    (tmp_path / "keep.json").write_text("{}")
    check_out_file(str(tmp_path / "keep.json"), "--json", ".json")
    check_out_file(str(tmp_path / "new.json"), "--json", ".json")
    assert (tmp_path / "keep.json").read_text() == "{}" and not (tmp_path / "new.json").exists()


def test_mbrl_bench_times_decisions_and_writes_nothing(tmp_path):
    """mbrl.py --bench N only times N decisions: it prints the line scripts read and makes no --out folder."""
    r = run(os.path.join(HERE, "mbrl.py"), "--bench", "1", "--compile", "false", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"one MPC decision in coin, .*: [0-9.]+ ms \(median of 1\)", r.stdout + r.stderr)
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc (Linux)")
def test_a_killed_process_not_yet_reaped_holds_no_folder(tmp_path):
    """A zombie (killed, its parent not yet waiting for it) runs no more: a folder it marked is free (claimed)."""
    from envs import claimed, process_alive
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / ".running").write_text(str(p.pid))
    with pytest.raises(UserError, match=f"another run \\(process {p.pid}\\)"):
        with claimed(str(tmp_path)):
            pass
    p.kill()
    deadline = time.time() + 10
    while process_alive(p.pid) and time.time() < deadline:           # (dead, not reaped: a zombie)
        time.sleep(0.05)
    with claimed(str(tmp_path)):                                      # its mark is taken over
        assert (tmp_path / ".running").read_text() == str(os.getpid())
    assert p.poll() is not None and process_alive(os.getpid())


def test_an_unknown_procgen_game_is_an_error_not_an_abort():
    """procgen aborts the whole process (C++ std::out_of_range) on an unknown game: the name is checked first."""
    pytest.importorskip("procgen")
    with pytest.raises(UserError, match="not a Procgen game: choose one of .*coinrun"):
        make_env("procgen:notagame")


def test_readme_stands_alone():
    """A user's clone has only the repository: the README may not send readers to files outside it."""
    text = open(os.path.join(HERE, "README.md")).read()
    assert "../shared" not in text and "acceptance/" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert link.startswith("http") or os.path.exists(os.path.join(HERE, link)), link


def test_help_lists_the_flags():
    r = run("train.py", "--help")
    for flag in ("--env", "--adapter", "--motion_weight", "--seed", "--out", "--max_iters", "--device", "--preset",
                 "--stage", "--init_from", "--resume"):
        assert flag in r.stdout
    assert run("data.py", "--list").stdout.split() == list(WORLDS)    # one world per line, nothing else: scripts loop on it
    if importlib.util.find_spec("procgen"):
        games = run("data.py", "--list", "games").stdout.split()
        assert "procgen:coinrun" in games and all(n.startswith("procgen:") for n in games)


# ----------------------------------------------------------------------------------------------
# the autoregressive backbone end to end

def test_ar_backbone_trains_end_to_end_and_samples(tmp_path):
    out = tmp_path / "ar"
    r = run("train.py", "--backbone", "ar", "--out", str(out), "--data_dir", str(tmp_path / "data"), "--max_iters", "3",
            "--env", "pusher", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(out / "metrics.json"))
    assert m["backbone"] == "ar" and m["stages"] == ["tokenizer", "pretrain", "finetune"]
    assert np.isfinite(m["tokenizer_psnr"]) and np.isfinite(m["psnr"]) and "pos_err_shuffled" in m
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "x.gif"),
            "--horizon", "3", "--top_k", "4", "--temperature", "0.7", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    # the tokenizer can be reused by a new run, which then skips that stage
    r = run("train.py", "--backbone", "ar", "--out", str(tmp_path / "ar2"), "--data_dir", str(tmp_path / "data"),
            "--max_iters", "2", "--env", "pusher", "--stage", "scratch", "--tokenizer", str(out / "tokenizer.pt"), *TINY_FLAGS)
    assert r.returncode == 0 and "--- tokenizer" not in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# mbrl.py: the planner, prioritized imagination, the loop

@pytest.mark.parametrize("name", list(WORLDS))
def test_planner_in_the_true_simulator_beats_random_actions(name):
    from mbrl import MBRLConfig, mpc_policy, true_scores_of
    from data import play_episodes
    cfg = MBRLConfig(env=name, horizon=4, candidates=32, elites=4, cem_iters=2)
    w = make_env(name, num=6, size=16, max_steps=16, seed=5)
    rng = np.random.default_rng(0)
    R_rand = play_episodes(w, lambda o, t: w.random_action(rng), 16)["rewards"].sum(1).mean()
    w = make_env(name, num=6, size=16, max_steps=16, seed=5)
    sim = make_env(name, num=6, size=16)
    spec = dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim)
    act, times = mpc_policy(w, lambda o, p, c, g, memo: true_scores_of(w, sim, c, cfg.gamma), spec, cfg,
                            torch.Generator().manual_seed(0))
    ep = play_episodes(w, act, 16)
    R_plan = ep["rewards"].sum(1).mean()
    assert len(times) == ep["lengths"].max() - 1                        # one decision per step while any episode runs
    assert R_plan > R_rand + (1.0 if name == "coin" else 2.0), (R_plan, R_rand)   # coin: +1 coin; pusher: far closer


@pytest.mark.parametrize("name", list(WORLDS))
def test_reward_head_learns_the_reward_from_a_frame_and_an_action(name):
    """The keypoint reward head r(s, a), trained on random-action transitions, predicts held-out rewards."""
    from mbrl import RewardHead
    from data import ClipSampler, play_episodes, to_float
    torch.manual_seed(0)
    def episodes(seed):
        w, rng = make_env(name, num=256, size=16, max_steps=16, seed=seed), np.random.default_rng(seed)
        return play_episodes(w, lambda o, t: w.random_action(rng), 16)
    train, test = episodes(0), episodes(1)
    w = make_env(name)
    head = RewardHead(16, dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim))
    opt = torch.optim.AdamW(head.parameters(), 2e-3)
    pairs = ClipSampler(train, 2, seed=0)
    for _ in range(400):
        p = pairs.sample(64)
        loss = (head(p["frames"][:, 0], p["actions"][:, 1])[0] - p["rewards"][:, 1]).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    s, a = to_float(test["frames"][:, :-1]).flatten(0, 1), torch.from_numpy(test["actions"]).flatten(0, 1)
    with torch.no_grad():
        pred = head(s, a)[0].numpy()
    r = test["rewards"].ravel()
    if w.discrete:          # coin: a rare reward of 1; rewarded steps must rank above the others (ROC AUC)
        hit = r > 0.5
        score = (pred[hit][:, None] > pred[~hit][None]).mean()
        assert hit.sum() > 10 and score > 0.8, score
    else:                   # pusher: a dense reward
        assert np.corrcoef(pred, r)[0, 1] > 0.6, np.corrcoef(pred, r)[0, 1]


def test_priority_sampling_prefers_large_td_errors_with_correct_weights():
    from mbrl import Priorities
    pr = Priorities(alpha=1.0, beta=0.5, rng=np.random.default_rng(0), eps=0.0)
    pr.grow(4)
    pr.update(np.arange(4), np.array([1.0, 1.0, 1.0, 7.0]))
    idx, w = pr.sample(20000)
    freq = np.bincount(idx, minlength=4) / len(idx)
    assert np.allclose(freq, [0.1, 0.1, 0.1, 0.7], atol=0.02)           # P(j) = p_j / sum p
    P = np.array([0.1, 0.1, 0.1, 0.7])
    want = (4 * P) ** -0.5 / ((4 * P) ** -0.5).max()
    assert np.allclose(w, want[idx], atol=1e-5)                          # (N P(j))^-b / max
    uni = Priorities(alpha=0.0, beta=0.5, rng=np.random.default_rng(0))
    uni.grow(4); uni.update(np.arange(4), np.array([1.0, 1.0, 1.0, 7.0]))
    idx, w = uni.sample(1000)
    assert np.allclose(w, 1.0) and abs(np.mean(idx == 3) - 0.25) < 0.05  # a = 0: uniform, weights 1
    pr.grow(2)
    assert np.all(pr.p[4:] == pr.p[:4].max())                            # new states enter at the top priority


def test_world_model_replay_keeps_one_priority_per_clip_in_buffer_order():
    """Agent.fit draws clips by priority and writes each drawn clip's error back to that clip's own slot;
    episodes added later enter at the top priority."""
    from mbrl import Agent, MBRLConfig, merge
    from data import ClipSampler, play_episodes, to_float
    agent = Agent(MBRLConfig(env="pusher", width=32, depth=1, compile=False), dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
    agent.one_step_error = lambda frames, actions: (frames[:, -1] + 1).mean((1, 2, 3))   # a known 'error': brightness
    w, rng = make_env("pusher", num=4, size=16, seed=0), np.random.default_rng(0)
    buf = play_episodes(w, lambda o, t: w.random_action(rng), 8)
    agent.fit(buf, 30, 1)
    e, s = ClipSampler(buf, 2).every_clip()
    want = (to_float(buf["frames"][e, s + 1]) + 1).mean((1, 2, 3)).numpy() + agent.replay.eps
    assert len(e) == 4 * 7 and np.allclose(agent.replay.p, want, atol=1e-6)   # every clip drawn, in its own slot
    more = play_episodes(make_env("pusher", num=2, size=16, seed=1), lambda o, t: w.random_action(rng)[:2], 8)
    agent.fit(merge(buf, more), 0, 1)
    assert len(agent.replay.p) == 6 * 7 and np.all(agent.replay.p[28:] == want.max())


def test_mbrl_gpt_from_scratch_trains_its_tokenizer_before_the_first_fit(tmp_path):
    """--backbone ar without --init_from: the GPT's tokenizer starts with an empty codebook (every frame one code), so
    the run fits it on the seed frames first; it ends frozen, outside the world model's optimizer."""
    from mbrl import Agent
    from data import ClipSampler
    cfg, spec, buf = tiny_mbrl("coin", backbone="ar")
    agent = Agent(cfg, spec, "cpu", seed=0)
    tok = agent.wm.backbone.tokenizer
    x = ClipSampler(buf, 1, seed=0).sample(16)["frames"][:, 0]
    before = F.mse_loss(tok.decode(tok.encode(x)), x).item()
    assert tok.encode(x).unique().numel() == 1                               # untrained: one code for everything
    agent.fit_tokenizer(buf, 60, rng_seed=0)
    assert tok.encode(x).unique().numel() > 4 and F.mse_loss(tok.decode(tok.encode(x)), x).item() < before / 2
    assert not any(p.requires_grad for p in tok.parameters())
    trained = {id(p) for g in agent.opt_wm.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in tok.parameters()}
    args = ("--backbone", "ar", "--seed_episodes", "2", "--rounds", "0", "--fit_iters", "1", "--tokenizer_iters", "5",
            "--value_iters", "1", "--eval_episodes", "1", "--candidates", "2", "--elites", "2", "--horizon", "1",
            "--episode_len", "3", "--width", "32", "--depth", "1", "--compile", "false", "--out", str(tmp_path / "m"))
    r = run("mbrl.py", *args)
    assert r.returncode == 0 and "tokenizer: 5 iterations" in r.stdout + r.stderr, r.stderr[-2000:]
    ck = read_checkpoint(str(tmp_path / "m" / "world_model_prioritized_seed0.pt"))
    assert ck["model"]["backbone.tokenizer.codebook"].abs().sum() > 0


def test_agent_clone_is_independent():
    """--imagination both continues each kind from a clone of one fitted agent: same scores, separate training."""
    from mbrl import Agent, MBRLConfig
    from data import play_episodes, to_float
    cfg = MBRLConfig(env="pusher", width=32, depth=1, compile=False)
    agent = Agent(cfg, dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
    w, rng = make_env("pusher", num=4, size=16, seed=0), np.random.default_rng(0)
    buf = play_episodes(w, lambda o, t: w.random_action(rng), 8)
    agent.fit(buf, 2, 1)
    twin = agent.clone()
    s, prev, cand = to_float(buf["frames"][:, 3:4]), torch.from_numpy(buf["actions"][:, 2:3]), torch.rand(4, 3, 2, 2) * 2 - 1
    def score(a):
        return a.score(s, prev, cand, torch.Generator().manual_seed(1))
    before = score(agent)
    assert torch.allclose(before, score(twin), atol=1e-5)
    twin.fit(buf, 2, 5)
    assert torch.allclose(before, score(agent), atol=1e-5) and not torch.allclose(before, score(twin), atol=1e-5)


def test_discrete_planning_imagines_each_action_prefix_once():
    """With discrete actions a decision's imagination is a tree: candidates that share an action prefix share its
    frames, in one CEM iteration and the next (memo); only prefixes not seen yet are rolled out."""
    from mbrl import Agent, MBRLConfig
    from data import to_float
    w = make_env("coin", num=2, size=16, seed=0)
    agent = Agent(MBRLConfig(env="coin", width=32, depth=1, compile=False), make_env("coin").spec, "cpu", 0)
    for layer in [agent.wm.backbone.out] + [g[-1] for g in agent.wm.adapter.g]:
        torch.nn.init.normal_(layer.weight, std=0.1)
    s, prev = to_float(w.reset()[0][:, None]), torch.zeros(2, 1, dtype=torch.long)
    cand = torch.tensor([[[1, 2, 3], [1, 2, 4], [1, 3, 3]], [[0, 0, 0], [0, 0, 0], [4, 4, 4]]])   # (2 worlds, 3, H 3)
    rows, inner = [], agent.plan_wm.forward
    agent.plan_wm.forward = lambda x, *a, **kw: rows.append(x.shape[0]) or inner(x, *a, **kw)
    memo, g = {}, torch.Generator().manual_seed(0)
    _, _, frames = agent.imagine(to_float(w.reset()[0][:, None]), prev, cand, g, memo)
    assert rows == [3, 4, 5]                                              # the unique prefixes at depths 1, 2, 3
    assert torch.equal(frames[0, :2], frames[1, :2]) and not torch.equal(frames[0, 2], frames[1, 2])
    assert torch.equal(frames[3], frames[4]) and not torch.equal(frames[3], frames[5])
    rows.clear()
    agent.imagine(s, prev, cand[:, [1, 0, 2]], g, memo)                    # the same prefixes again: nothing new
    assert rows == []
    read, value = [], agent.value.forward               # each distinct last frame is valued once per decision
    points, keypoints = [], agent.reward.keypoints      # and each node's keypoints found once, in one pass
    agent.value.forward = lambda x: read.append(x.shape[0]) or value(x)
    agent.reward.keypoints = lambda x: points.append(x.shape[0]) or keypoints(x)
    memo = {}
    ret, tail, frames = agent.imagine(s, prev, cand, g, memo)
    assert points == [4 + 5]                                              # the nodes at depths 0..2: 4 in world 0, 5 in 1
    want = ret + tail * value(frames[:, -1]).view(2, 3)
    assert torch.allclose(agent.score(s, prev, cand, g, memo), want, atol=1e-6) and read == [5]
    agent.score(s, prev, cand[:, [2, 1, 0]], g, memo)                     # another CEM iteration: nothing new
    assert read == [5] and points == [9]


def test_plan_batch_flat_rolls_every_candidate_out_in_one_batch():
    """--plan_batch flat (auto on CUDA) imagines all B x N candidates in one batch per frame, without the tree's memo;
    tree (auto on a CPU) rolls out only the unique prefixes; both plan through mbrl's CEM to valid actions."""
    from mbrl import Agent, CEM, MBRLConfig
    w, spec = make_env("coin", num=2, size=16, seed=0), make_env("coin").spec
    obs = w.reset()[0][:, None]
    cand = torch.tensor([[[1, 2, 3], [1, 2, 4], [1, 3, 3]], [[0, 0, 0], [0, 0, 0], [4, 4, 4]]])   # (2 worlds, 3, H 3)
    for batch, want in (("flat", [6, 6, 6]), ("tree", [3, 4, 5]), ("auto", [3, 4, 5])):
        cfg = MBRLConfig(env="coin", width=32, depth=1, compile=False, plan_batch=batch, horizon=3, candidates=3,
                        elites=2)
        agent = Agent(cfg, spec, "cpu", 0)
        rows, inner = [], agent.plan_wm.forward
        agent.plan_wm.forward = lambda x, *a, **kw: rows.append(x.shape[0]) or inner(x, *a, **kw)
        scores = agent.plan_scores(obs, torch.zeros(2, 1, dtype=torch.long), cand, agent.g, memo={})
        assert scores.shape == (2, 3) and torch.isfinite(scores).all()
        assert [r for r in rows if r > 2] == want, (batch, rows)             # rows of the frame passes (not the context)
        a = CEM(spec, 2, cfg, agent.g).plan(lambda c: agent.plan_scores(obs, torch.zeros(2, 1, dtype=torch.long), c,
                                                                        agent.g, memo={}))
        assert a.shape == (2,) and 0 <= int(a.min()) and int(a.max()) < spec["n_actions"]
    with pytest.raises(UserError, match="plan_batch"):
        MBRLConfig(env="coin", plan_batch="wide")


def test_value_iters_0_plans_on_rewards_alone():
    """--value_iters 0 drops the terminal value from the score: an untrained value must not steer the plan."""
    from mbrl import Agent, MBRLConfig
    from data import to_float
    w = make_env("pusher", num=2, size=16, seed=0)
    s, prev, cand = to_float(w.reset()[0][:, None]), torch.zeros(2, 1, 2), torch.rand(2, 3, 2, 2) * 2 - 1
    for iters in (0, 150):
        agent = Agent(MBRLConfig(env="pusher", width=32, depth=1, value_iters=iters, compile=False), dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
        g = lambda: torch.Generator().manual_seed(0)
        before = agent.score(s, prev, cand, g())
        with torch.no_grad():
            agent.value.mlp[-1].bias += 5.0                                     # shift every value by 5
        shift = agent.score(s, prev, cand, g()) - before
        ret, tail, _ = agent.imagine(s, prev, cand, g())
        expect = torch.zeros_like(shift) if iters == 0 else 5.0 * tail
        assert torch.allclose(shift, expect, atol=1e-4)


def test_value_is_trained_on_imagined_states():
    """value_update walks d ~ U{0..D} random steps in the model from each drawn replay state before its TD update:
    with D = 0 V is trained on the real states, with D > 0 also on generated frames; both action kinds."""
    from mbrl import Agent, MBRLConfig, Priorities, replay_states
    from data import play_episodes
    for env in ("coin", "pusher"):
        w, rng = make_env(env, num=4, size=16, seed=0), np.random.default_rng(0)
        spec = dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim)
        buf = play_episodes(w, lambda o, t: w.random_action(rng), 6)
        states, prev = replay_states(buf)
        for D in (0, 3):
            agent = Agent(MBRLConfig(env=env, width=32, depth=1, batch_size=16, imagine_horizon=D, compile=False), spec, "cpu", 0)
            agent.fit(buf, 3, 1)                                                # untrained, the model copies its context
            seen, forward = [], agent.value.forward
            agent.value.forward = lambda x: (seen.append(x) if torch.is_grad_enabled() else None) or forward(x)
            starts = Priorities(0.6, 0.4, np.random.default_rng(0))
            starts.grow(len(states))
            for _ in range(4):
                assert np.isfinite(agent.value_update(starts, states, prev))
            real = torch.cat(seen)[:, None].sub(states[None, :, -1]).abs().amax((2, 3, 4)).min(1).values < 1e-4   # a real state?
            assert real.all() if D == 0 else not real.all()
            assert (starts.p != 1.0).sum() > 0                                  # priorities written back


def test_mbrl_runs_end_to_end(tmp_path):
    args = ("--env", "pusher", "--seed_episodes", "4", "--rounds", "1", "--episodes", "2", "--fit_iters", "3",
            "--update_iters", "2", "--value_iters", "2", "--eval_episodes", "2", "--candidates", "8", "--elites", "2",
            "--episode_len", "6", "--compile", "false", "--width", "32", "--depth", "1")
    r = run("mbrl.py", *args, "--out", str(tmp_path / "m"), "--imagination", "both", "--seeds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "m" / "results.json"))
    assert {"model_mpc_prioritized", "model_mpc_uniform", "random", "oracle_mpc"} <= set(res["methods"])
    m = res["methods"]["model_mpc_prioritized"]
    assert len(m["curves"]) == 2 and len(m["curves"][0]) == 2 and m["env_steps"][0][1] > m["env_steps"][0][0]
    assert "normalized" in res and res["decision_ms"] > 0
    assert (tmp_path / "m" / "curves.png").stat().st_size > 1000
    r = run("mbrl.py", *args, "--out", str(tmp_path / "s1"), "--imagination", "prioritized", "--first_seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    s1 = json.load(open(tmp_path / "s1" / "results.json"))                 # seed 1 alone is the second seed of two
    assert s1["seeds"] == [1] and s1["methods"]["model_mpc_prioritized"]["curves"] == [m["curves"][1]]
    assert "world model: a new dit" in (tmp_path / "s1" / "mbrl.log").read_text()
    r = run("sample.py", "--ckpt", str(tmp_path / "s1" / "world_model_prioritized_seed1.pt"), "--out", str(tmp_path / "s.gif"),
            "--n", "1", "--horizon", "2", "--data_dir", str(tmp_path / "dc"))   # its own buffer is gone: said so
    assert r.returncode == 0 and "trained by mbrl.py on its replay buffer" in r.stdout, r.stderr[-2000:]
    assert [n.split("-")[1] for n in os.listdir(tmp_path / "dc")] == ["labelled"]
    bad = run("mbrl.py", "--env", "nowhere", "--out", str(tmp_path / "n"))
    assert bad.returncode != 0 and "unknown environment" in bad.stderr and "Traceback" not in bad.stderr


def tiny_mbrl(env="pusher", **kw):
    """A small agent's config, spec and a buffer of random-action episodes."""
    from mbrl import MBRLConfig
    from data import play_episodes
    cfg = MBRLConfig(env=env, width=32, depth=1, batch_size=8, rounds=2, episodes=2, update_iters=2, value_iters=2,
                     eval_episodes=2, candidates=8, elites=2, episode_len=6, compile=False, **kw)
    w, rng = make_env(env, num=4, size=16, seed=0), np.random.default_rng(0)
    spec = dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim)
    return cfg, spec, play_episodes(w, lambda o, t: w.random_action(rng), 6)


def test_mbrl_seeds_are_independent_and_evaluation_changes_nothing():
    """Building, cloning and training agents never touches the global random stream; two seeds start apart; and how
    often the loop evaluates does not change the weights it ends with."""
    from mbrl import Agent, online
    cfg, spec, buf = tiny_mbrl()
    before = torch.get_rng_state()
    a0, a1 = Agent(cfg, spec, "cpu", 0), Agent(cfg, spec, "cpu", 1)
    a0.fit(buf, 2, 1)
    twin = a0.clone()
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a0.g.get_state(), a1.g.get_state())
    assert not torch.equal(a0.value.mlp[0].weight, a1.value.mlp[0].weight)
    bar, log = type("Bar", (), {"update": lambda self, n: None})(), lambda msg: None
    ends = []
    for every, agent in ((1, a0), (10, twin)):
        online(replace(cfg, eval_every=every), 0, "prioritized", agent, buf, np.random.default_rng(3), spec, log, bar)
        ends.append(agent.wm.state_dict() | {"v." + k: v for k, v in agent.value.state_dict().items()})
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    assert torch.equal(torch.get_rng_state(), before)


def test_each_purpose_of_a_seed_draws_from_a_stream_of_its_own(monkeypatch):
    """The world model's replay, the value's start states, the loop and the random baseline: four streams of one
    seed, none of them the seed's plain stream (seeded with the seed alone, the two replays drew the same numbers)."""
    import mbrl
    cfg, spec, buf = tiny_mbrl()
    first = {p: mbrl.stream(0, p).random(4).tolist() for p in mbrl.STREAMS}
    assert len({tuple(v) for v in first.values()}) == len(mbrl.STREAMS)
    assert np.random.default_rng(0).random(4).tolist() not in first.values()
    drawn, P = [], mbrl.Priorities                        # the first draws of every Priorities the loop makes
    monkeypatch.setattr(mbrl, "Priorities", type("Seen", (P,), {"__init__": lambda self, *a, **k: (
        P.__init__(self, *a, **k), drawn.append(copy.deepcopy(self.rng).random(4).tolist()))[0]}))
    agent = mbrl.Agent(cfg, spec, "cpu", 0)
    bar, log = type("Bar", (), {"update": lambda self, n: None})(), lambda msg: None
    mbrl.online(replace(cfg, rounds=0), 0, "prioritized", agent, buf, mbrl.stream(0, "loop"), spec, log, bar)
    assert drawn == [first["model replay"], first["value starts"]]


def test_value_priority_is_the_td_error_of_the_drawn_state():
    """V is updated at the state the random walk reaches, but the priority written back for replay state j is |TD|
    at j itself; importance weights are normalised by the largest weight over every state, not over the batch."""
    from mbrl import Agent, Priorities, replay_states
    cfg, spec, buf = tiny_mbrl(imagine_horizon=3)
    agent = Agent(cfg, spec, "cpu", 0)
    states, prev = replay_states(buf)
    agent.walk = lambda s, p: (s + 0.5, p)                               # the walk reaches other frames
    seen = []
    agent.td_error = lambda s, p: seen.append(s) or (s.mean((1, 2, 3, 4)) + 2 + 0 * agent.value(s[:, -1]))
    starts = Priorities(0.6, 0.4, np.random.default_rng(0), eps=0.0)
    starts.grow(len(states))
    agent.value_update(starts, states, prev)
    drawn = np.flatnonzero(starts.p != 1.0)
    assert len(drawn) > 0 and len(seen) == 2
    assert np.allclose(starts.p[drawn], states[drawn].mean((1, 2, 3, 4)).numpy() + 2, atol=1e-5)
    pr = Priorities(alpha=1.0, beta=0.5, rng=np.random.default_rng(0), eps=0.0)
    pr.grow(4); pr.update(np.arange(4), np.array([1.0, 1.0, 1.0, 7.0]))
    draws = [pr.sample(1) for _ in range(200)]
    w3 = {float(w[0]) for i, w in draws if i[0] == 3}
    assert w3 and np.allclose(list(w3), (0.7 / 0.1) ** -0.5)             # below 1 even when drawn alone


@pytest.mark.parametrize("env", ["coin", "pusher"])
def test_planning_and_training_create_tensors_on_the_agent_device(env):
    """Run the agent with the default device set to 'meta': a tensor made without an explicit device lands there and
    breaks the computation, as a CPU tensor breaks a CUDA run. The planner, the value update and a fit must not mind."""
    from mbrl import Agent, Priorities, mpc_policy, replay_states
    cfg, spec, buf = tiny_mbrl(env)
    agent = Agent(cfg, spec, "cpu", 0)
    states, prev = replay_states(buf)
    starts = Priorities(0.6, 0.4, np.random.default_rng(0))
    starts.grow(len(states))
    w = make_env(env, num=2, size=16, seed=0)
    obs, _ = w.reset()
    with torch.device("meta"):
        act, _ = mpc_policy(w, agent.plan_scores, spec, cfg, agent.g)
        a = act(obs, 0)
        assert np.isfinite(agent.value_update(starts, states, prev))
        assert np.isfinite(agent.fit(buf, 1, 1)[0])
    assert a.shape[0] == 2 and agent.g.device == agent.device


# ----------------------------------------------------------------------------------------------
# environments written by others, episodes on disk, play

def game(module):
    """Skip a test only when the optional game package is not installed (CI installs requirements-games.txt)."""
    return pytest.importorskip(module, reason="pip install -r requirements-games.txt")


def test_a_kill_stops_a_rendered_game(tmp_path):
    """Classic-control games render through pygame, whose SDL would catch SIGTERM and SIGINT and go on: a kill
    (or Ctrl-C) must stop data.py --record within moments."""
    game("pygame")
    p = subprocess.Popen([sys.executable, "data.py", "--record", "gym:Acrobot-v1", "--episodes", "5000", "--out",
                          str(tmp_path / "rec")], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6)                                                    # inside the recording: pygame is loaded
        p.terminate()
        assert p.wait(timeout=10) != 0
    finally:
        p.kill()


def test_keys_follow_the_games_action_names():
    """Play's keys press the game's own actions by name; a game with one axis named LEFT/RIGHT (Pong, where RIGHT
    moves the paddle up) takes up and down on that axis instead of doing nothing."""
    pong = keys_for(6, ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"])
    assert (pong["up"], pong["down"], pong["space"], pong["none"]) == (2, 3, 1, 0)
    maze = keys_for(5, ["NOOP", "UP", "RIGHT", "LEFT", "DOWN"])
    assert (maze["up"], maze["down"], maze["left"], maze["right"]) == (1, 4, 3, 2)
    assert keys_for(3) == dict(left=0, none=1, right=2, up=1, down=1, space=1)
    assert keys_for(0, None, 2)["up"] == [0.0, -1.0]


@pytest.mark.parametrize("name", ["gym:CartPole-v1", "gym:MountainCarContinuous-v0", "gym:ALE/Breakout-v5",
                                  "procgen:coinrun"])
def test_games_step_render_and_restore_exactly(name):
    """Every environment behind --env: frames of the size asked, actions of its own kind, and a replay from a
    restored state that repeats the frames and rewards exactly (what the counterfactual measure and the true-simulator
    planner rest on)."""
    game("procgen" if name.startswith("procgen") else "ale_py" if "ALE" in name else "gymnasium")
    env = make_env(name, num=3, size=32, max_steps=20, seed=1)
    obs, _ = env.reset()
    assert obs.shape == (3, 32, 32, 3) and obs.dtype == np.uint8
    assert set(env.spec["keys"]) == {"left", "right", "up", "down", "space", "none"}
    rng = np.random.default_rng(0)
    for _ in range(4):
        env.step(env.random_action(rng))
    saved, acts = env.get_state(), [env.random_action(rng) for _ in range(6)]
    first = [env.step(a)[:2] for a in acts]
    env.set_state(saved)
    again = [env.step(a)[:2] for a in acts]
    assert all(np.array_equal(f, g) and np.array_equal(r, q) for (f, r), (g, q) in zip(first, again))
    assert len({f.tobytes() for f, _ in first}) > 1


def test_unknown_environments_and_missing_packages_are_one_line_errors():
    with pytest.raises(UserError, match="unknown environment"):
        make_env("no_such_world")
    with pytest.raises(UserError, match="did you mean 'coin'"):
        make_env("coinn")
    with pytest.raises(UserError, match="frame_skip"):
        make_env("coin", frame_skip=-1)
    with pytest.raises(UserError, match="--frame_skip 3 is for gym: games"):   # (it was dropped in silence)
        make_env("pusher", frame_skip=3)
    assert make_env("coin", frame_skip=1).num == 1
    with pytest.raises(UserError, match="gym:"):
        game("gymnasium")
        make_env("gym:NoSuchGame-v0")
    with warnings.catch_warnings(record=True) as said:                  # a refused id: its error alone, no warnings
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="Please use `Taxi-v4` instead; the id is a gymnasium id"):
            make_env("gym:Taxi-v3")
    assert not said


def test_copies_of_a_gym_game_start_apart():
    """Copy i is seeded with seed + i (all copies once started from one seed: every counterfactual start alike)."""
    game("gymnasium")
    env = make_env("gym:CartPole-v1", num=3, size=32, seed=0)
    starts = [tuple(e.unwrapped.state) for e in env.envs]
    assert len(set(starts)) == 3 and env.restorable


def test_rendered_games_act_at_about_25_steps_a_second_unless_told(tmp_path):
    """frame_skip 0 picks the game's own rate: CartPole renders 50 steps a second, so each action is repeated twice
    (at one step an action moves the pole's tip by a tenth of a pixel of a 32-px frame); Atari's v5 games, whose
    observation is the image and which skip 4 frames themselves, and 30-fps classic control, once. A number given wins."""
    game("gymnasium")
    assert make_env("gym:CartPole-v1").frame_skip == 2
    assert make_env("gym:MountainCarContinuous-v0").frame_skip == 1
    assert make_env("gym:CartPole-v1", frame_skip=3).frame_skip == 3
    from data import read_meta, record
    record("gym:CartPole-v1", 2, str(tmp_path / "rec"), 32, 6, False, 0, 0.75, 0)
    assert read_meta(str(tmp_path / "rec"))["frame_skip"] == 2              # what train.py --data replays at
    json.dump(dict(format="nanoworld-episodes-1", frame_skip="2"), open(tmp_path / "rec" / "meta.json", "w"))
    with pytest.raises(UserError, match="frame_skip"):
        read_meta(str(tmp_path / "rec"))
    game("ale_py")
    assert make_env("gym:ALE/Breakout-v5").frame_skip == 1


def test_episodes_stop_asking_the_policy_once_every_one_has_ended():
    """A planner is asked for actions only while some episode runs (CartPole's random episodes end after ~8 of 200
    steps); the frames after an end repeat the last one, as the episode layout says."""
    game("gymnasium")
    env, calls = make_env("gym:CartPole-v1", num=3, size=32, max_steps=200, seed=0), []
    rng = np.random.default_rng(0)
    ep = play_episodes(env, lambda obs, t: calls.append(t) or env.random_action(rng), 200)
    assert len(calls) == ep["lengths"].max() - 1 < 200
    assert ep["ends"].sum() == 3 and (ep["frames"][:, -1] == ep["frames"][np.arange(3), ep["lengths"] - 1]).all()


def test_procgen_corpora_from_nearby_seeds_share_no_levels():
    """The labelled and action-free corpora start from seeds s and s + 1: their resets must not draw the same levels
    (with seed + k per reset, the first corpus's second batch was the second corpus's first)."""
    game("procgen")
    a, b = (make_env("procgen:coinrun", num=4, size=64, seed=s) for s in (1, 2))
    fa, fb = [a.reset()[0] for _ in range(3)], [b.reset()[0] for _ in range(3)]
    assert not any(np.array_equal(x, y) for x in fa for y in fb)


@pytest.mark.parametrize("name,backbone", [("gym:CartPole-v1", "dit"), ("gym:MountainCarContinuous-v0", "dit"),
                                           ("gym:ALE/Breakout-v5", "dit"), ("procgen:coinrun", "ar")])
def test_games_train_roll_out_and_measure_control(tmp_path, name, backbone):
    """Classic control (discrete and continuous), Atari and Procgen through the whole recipe with tiny budgets; the
    metrics carry the counterfactual control keys, and the checkpoint rolls out."""
    game("procgen" if name.startswith("procgen") else "ale_py" if "ALE" in name else "gymnasium")
    r = run("train.py", "--env", name, "--backbone", backbone, "--out", str(tmp_path / "o"), "--data_dir",
            str(tmp_path / "d"), "--max_iters", "2", "--episode_len", "12", "--clip_len", "2", *TINY_FLAGS,
            *(["--patch", "8"] if backbone == "dit" else []),
            "--size", "32", "--horizon", "10", "--eval_clips", "8", "--frame_skip", "1")   # a cart moves ~1/8 px a step
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert {"control_psnr", "control_psnr_wrong", "control_pixels"} <= set(m) and "pos_err" not in m
    assert 0 < m["control_pixels"] < 1 and np.isfinite(m["control_psnr"])
    assert len(m["control_gap_by_step"]) == 10 and all(g is None or np.isfinite(g) for g in m["control_gap_by_step"])
    from sample import load_model
    model, ck = load_model(str(tmp_path / "o" / "ckpt.pt"))
    acts = torch.zeros((2, 4), dtype=torch.long) if ck["spec"]["discrete"] else torch.zeros(2, 4, ck["spec"]["action_dim"])
    assert rollout(model, torch.zeros(2, 1, 3, 32, 32), acts).shape == (2, 3, 3, 32, 32)


def test_counterfactual_start_states_make_up_for_episodes_that_end_on_the_way():
    """A start state is reached by k + 8 steps of the behaviour policy; copies whose episode ends on the way are left
    out (CartPole's random episodes last ~8 steps), so more batches are played until there are as many as asked."""
    game("gymnasium")
    from train import TrainConfig, counterfactuals
    cfg = TrainConfig(env="gym:CartPole-v1", size=32, horizon=4, eval_clips=24)
    ctx, ctx_a, A, A_other, truth_A, truth_B = counterfactuals(cfg, 2, 24)
    assert len(ctx) == len(truth_B) == 24 and truth_A.shape == (24, 4, 32, 32, 3)


def test_a_model_blind_to_actions_scores_the_same_under_other_actions():
    """control_psnr against control_psnr_wrong: equal for a model without an adapter (it cannot tell A from A')."""
    from train import TrainConfig, control_eval
    torch.manual_seed(0)
    m = WorldModel(trained_backbone("dit"), "none", SPECS["coin"]).eval()
    cfg = TrainConfig(env="coin", size=16, horizon=3, eval_clips=12, sample_steps=2, temperature=1.0, top_k=0)
    c = control_eval(m, cfg, 1, torch.device("cpu"))
    assert c["control_clips"] > 0 and 0 < c["control_pixels"] < 0.5
    assert c["control_psnr"] == pytest.approx(c["control_psnr_wrong"], abs=1e-4)
    assert len(c["control_gap_by_step"]) == 3 and all(g is None or abs(g) < 1e-4 for g in c["control_gap_by_step"])


def test_episodes_on_disk_round_trip_and_bad_files_name_themselves(tmp_path):
    from data import read_folder, write_folder
    ep = generate_episodes(DataConfig(env="coin", size=16, episode_len=6), 5, seed=0)
    spec = make_env("coin").spec
    write_folder(str(tmp_path / "ok"), iter([ep]), "coin", 16, spec)
    arrays, meta = read_folder(str(tmp_path / "ok"), labelled=True)
    assert meta["env"] == "coin" and all(np.array_equal(arrays[k], ep[k]) for k in ep)
    import train                                     # a meta.json without the optional keys: the named world's
    nokeys = json.load(open(tmp_path / "ok" / "meta.json"))
    del nokeys["spec"]["keys"]
    (tmp_path / "nk").mkdir()
    json.dump(nokeys, open(tmp_path / "nk" / "meta.json", "w"))
    assert train.action_spec(train.parse_args(["--data", str(tmp_path / "nk")]))["keys"] == spec["keys"]
    json.dump(dict(nokeys, env="mine"), open(tmp_path / "nk" / "meta.json", "w"))   # unknown: by convention
    assert train.action_spec(train.parse_args(["--data", str(tmp_path / "nk")]))["keys"] == keys_for(5)
    short = {k: v[:, :4 - (k != "frames")] if k != "lengths" else np.minimum(v, 4) for k, v in ep.items()}   # shorter
    np.savez_compressed(tmp_path / "ok" / "shard_001.npz", **short)
    with pytest.raises(UserError, match="says 5 episodes, but the 2 .npz files hold 10"):     # (a shard added or lost)
        read_folder(str(tmp_path / "ok"), labelled=True)
    json.dump(dict(meta, episodes=10), open(tmp_path / "ok" / "meta.json", "w"))
    arrays, _ = read_folder(str(tmp_path / "ok"), labelled=True, size=32)   # padded and resized
    assert arrays["frames"].shape == (10, 7, 32, 32, 3) and (arrays["lengths"][5:] <= 4).all()
    bad = [(dict(frames=np.zeros((10, 5))), "uint8"),
           (dict(frames=ep["frames"][..., 0]), re.escape(f"frames are uint8 {ep['frames'][..., 0].shape};")),  # grey
           (dict(pixels=ep["frames"]), "no 'frames'"),
           (dict(ep, actions=ep["actions"] + 7), "actions"),
           (dict(ep, frames=ep["frames"][:, :, :8, :8]), "one frame size"),
           (dict(ep, rewards=ep["rewards"][:, :3]), "rewards are")]
    for i, (arrays, match) in enumerate(bad):
        d = tmp_path / f"bad{i}"
        write_folder(str(d), iter([ep]), "coin", 16, spec)
        np.savez_compressed(d / "shard_009.npz", **arrays)
        with pytest.raises(UserError, match=match) as err:
            read_folder(str(d), labelled=True)
        assert "shard_009.npz" in str(err.value)
    r = run("train.py", "--data", str(tmp_path / "bad0"), "--out", str(tmp_path / "o"), *TINY_MODEL)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for size, match in ((32, "says 'size' 32, but the frames are 16 px"), ("big", "'size' is 'big'")):
        d = tmp_path / f"size{size}"                                      # a meta.json whose size is not the frames'
        write_folder(str(d), iter([ep]), "coin", 16, spec)
        meta = json.load(open(d / "meta.json"))
        json.dump(dict(meta, size=size), open(d / "meta.json", "w"))
        with pytest.raises(UserError, match=match):
            read_folder(str(d), labelled=True)
    push = generate_episodes(DataConfig(env="pusher", size=16, episode_len=6), 3, seed=0)   # continuous actions
    for i, (arrays, match) in enumerate([(dict(push, actions=np.full_like(push["actions"], np.nan)), "nan"),
                                         (dict(push, actions=push["actions"] * 3), "floats in \\[-1, 1\\]"),
                                         (dict(push, rewards=push["rewards"] + np.nan), "finite")]):
        d = tmp_path / f"push{i}"
        write_folder(str(d), iter([arrays]), "pusher", 16, make_env("pusher").spec)
        with pytest.raises(UserError, match=match):
            read_folder(str(d), labelled=True)
    d = tmp_path / "keys"                                                # play's keys must be actions of the spec
    write_folder(str(d), iter([ep]), "coin", 16, dict(spec, keys={"left": 99}))
    with pytest.raises(UserError, match="spec 'keys'"):
        read_folder(str(d), labelled=True)


def test_a_stopped_recording_leaves_no_half_written_folder(tmp_path):
    """Ctrl-C while a corpus or a recording is written: the temporary folder goes, a folder already there stays."""
    from data import write_folder
    ep = generate_episodes(DataConfig(env="coin", size=16, episode_len=4), 2, seed=0)
    write_folder(str(tmp_path / "d"), iter([ep]), "coin", 16, make_env("coin").spec)

    def stopped():
        yield ep
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_folder(str(tmp_path / "d"), stopped(), "coin", 16, make_env("coin").spec)
    assert sorted(os.listdir(tmp_path)) == ["d"] and sorted(os.listdir(tmp_path / "d")) == ["meta.json", "shard_000.npz"]
    run = subprocess.Popen([sys.executable, "data.py", "--record", "coin", "--out", str(tmp_path / "r"), "--episodes",
                            "100000", "--episode_len", "1000"], cwd=HERE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120                                       # (a kill, not Ctrl-C: run_cli makes it one)
    while not any(n.startswith("r.tmp") for n in os.listdir(tmp_path)) and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 128 + signal.SIGTERM and "interrupted" in run.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_meta_json_is_checked_by_value_and_one_episode_shards_read(tmp_path):
    """A meta.json spec of the wrong types (a string count, a float count, a continuous spec with no dimensions), an
    unknown format and a misspelled key are one-line errors before training, not a crash after a pre-training stage;
    a key of one's own is fine; a shard holding one episode without the episode axis reads like a shard of one."""
    from data import read_folder, read_meta, write_folder
    ep = generate_episodes(DataConfig(env="coin", size=16, episode_len=6), 3, seed=0)
    write_folder(str(tmp_path / "d"), iter([ep]), "coin", 16, make_env("coin").spec)
    good = json.load(open(tmp_path / "d" / "meta.json"))
    spec = dict(discrete=True, n_actions=5, action_dim=0)
    for change, match in ((dict(spec=dict(spec, n_actions="5")), "'spec' is"), (dict(spec=dict(spec, n_actions=5.0)), "'spec' is"),
                          (dict(spec=dict(discrete=False, n_actions=0, action_dim=0)), "'spec' is"),
                          (dict(format="nanoworld-episodes-2"), "format"), (dict(sepc=spec), "did you mean 'spec'")):
        meta = {k: v for k, v in good.items() if not ("sepc" in change and k == "spec")}
        json.dump(dict(meta, **change), open(tmp_path / "d" / "meta.json", "w"))
        with pytest.raises(UserError, match=match):
            read_meta(str(tmp_path / "d"))
    json.dump(dict(good, source="my robot, lab 2", frames="RGB, 10 Hz", episodes=1), open(tmp_path / "d" / "meta.json", "w"))
    assert read_meta(str(tmp_path / "d"))["source"] == "my robot, lab 2"      # notes of one's own, even near a key
    np.savez_compressed(tmp_path / "d" / "shard_000.npz", **{k: v[0] for k, v in ep.items()})   # one episode, no axis
    arrays, _ = read_folder(str(tmp_path / "d"), labelled=True)
    assert arrays["frames"].shape[0] == 1 and np.array_equal(arrays["actions"][0], ep["actions"][0])


def test_gym_copies_are_kept_older_atari_ids_work_and_a_broken_game_is_one_line(tmp_path):
    """A planner's states need more copies of a game than the world has: they are made once and kept, not remade
    at every call (Atari reloads its ROM for each: seconds per decision). Atari's v4 ids (NoFrameskip: 60 Hz, so
    4 frames a step as v5) are made through ale-py; a game whose own code fails to load is a one-line error."""
    gym = game("gymnasium")
    env = make_env("gym:CartPole-v1", num=2, size=32, seed=0)
    env.reset()
    saved = env.get_state()
    env.set_state(env.tile(saved, 3))
    made = list(env.pool)
    env.set_state(saved)
    env.set_state(env.tile(saved, 3))
    assert len(env.envs) == 6 and all(a is b for a, b in zip(env.pool, made)) and len(env.pool) == 6
    from envs import time_limit                                         # a kept copy's time limit restores too: else
    env.set_state(saved)                                                # it truncates every plan once it has stepped
    for _ in range(3):                                                  # its limit in total
        env.step(np.zeros(2, np.int64))
    env.set_state(saved)
    assert [time_limit(e)._elapsed_steps for e in env.envs] == [0, 0]

    def broken(**kw):
        raise ModuleNotFoundError("No module named 'jax'")
    gym.register(id="NanoworldBroken-v0", entry_point=broken)
    with pytest.raises(UserError, match="could not be made: ModuleNotFoundError: No module named 'jax'"):
        make_env("gym:NanoworldBroken-v0")
    game("ale_py")
    pong = make_env("gym:PongNoFrameskip-v4", size=32)
    assert pong.atari and pong.frame_skip == 4 and pong.restorable


def test_short_recorded_episodes_are_reported_and_name_the_flags_that_fit(tmp_path, capsys):
    """CartPole's random episodes end after a few steps: the recording says how long they are, and train.py names a
    --horizon that fits them (it once said only "lower --horizon"); a --frame_skip other than the folder's recorded
    one is refused (the control measure would replay the game at another rate)."""
    game("gymnasium")
    from data import load_corpus, record
    record("gym:CartPole-v1", 12, str(tmp_path / "cp"), 32, 64, False, 0, 0.75, 0)
    lengths = np.load(tmp_path / "cp" / "shard_000.npz")["lengths"]
    assert f"12 of 12 ended before 64 steps: {lengths.min()} to {lengths.max()} frames" in capsys.readouterr().out
    import train
    with pytest.raises(UserError, match="--n_labelled sets the generated corpus.*drop --n_labelled"):
        train.resolve(train.parse_args(["--data", str(tmp_path / "cp"), "--n_labelled", "9"]), torch.device("cpu"))
    cfg = train.parse_args(["--data", str(tmp_path / "cp"), "--max_iters", "1"])
    train.resolve(cfg, torch.device("cpu"))
    data = load_corpus(train.DataConfig(**train.describe(cfg, None, None)["data"]), labelled=True)
    with pytest.raises(UserError, match="pass --horizon [0-9]+ ") as err:
        train.check_lengths(data, cfg.clip_len, 64)
    horizon = int(re.search("pass --horizon ([0-9]+)", str(err.value)).group(1))
    train.check_lengths(data, cfg.clip_len, horizon)                    # what it names fits
    from types import SimpleNamespace as NS                            # generated episodes: the flag, or another game
    short = NS(train=dict(lengths=np.array([3, 4])), test=dict(lengths=np.array([4])))
    assert train.longer(short, NS(data="", env="coin"), dict(data=dict(episode_len=3))) == "raise --episode_len"
    assert "ended all of these within 3 steps" in train.longer(short, NS(data="", env="gym:Blackjack-v1"), dict(data=dict(episode_len=12)))
    from data import ClipSampler
    with pytest.raises(UserError, match="the longest holds 4 frames, .*: lower --context"):   # mbrl.py names its own flag
        ClipSampler(short.train, 4, fix="lower --context")
    with pytest.raises(UserError, match="--frame_skip 3 but --data .* was recorded with frame_skip 2"):
        train.resolve(train.parse_args(["--data", str(tmp_path / "cp"), "--frame_skip", "3"]), torch.device("cpu"))


def test_recorded_folders_pretrain_and_finetune(tmp_path):
    """python data.py --record writes the format; train.py pre-trains on an action-free folder and fine-tunes on a
    labelled one (the paper's recipe, with two sources)."""
    for name, extra in (("videos", ["--frames_only"]), ("labelled", [])):
        r = run("data.py", "--record", "pusher", "--episodes", "12", "--size", "16", "--episode_len", "8",
                "--out", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "actions" not in np.load(tmp_path / "videos" / "shard_000.npz")
    r = run("train.py", "--data", str(tmp_path / "labelled"), "--pretrain_data", str(tmp_path / "videos"),
            "--out", str(tmp_path / "o"), "--max_iters", "2", *TINY_MODEL)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert m["stages"] == ["pretrain", "finetune"] and "control_psnr" in m   # the folder says it came from pusher
    r = run("train.py", "--data", str(tmp_path / "videos"), "--stage", "pretrain", "--out", str(tmp_path / "v"),
            "--max_iters", "2", *TINY_MODEL)                               # videos alone pre-train (and evaluate)
    assert r.returncode == 0 and "trained on frames only" in r.stdout, r.stderr[-2000:]
    meta = json.load(open(tmp_path / "labelled" / "meta.json"))
    json.dump(dict(meta, env="coin"), open(tmp_path / "labelled" / "meta.json", "w"))   # a spec its env contradicts
    import train
    with pytest.raises(UserError, match="is not the action space of its env coin"):
        train.resolve(train.parse_args(["--data", str(tmp_path / "labelled")]), torch.device("cpu"))


def test_play_follows_the_keys(tiny_run, tmp_path):
    """Two key sequences from one context give different frames; --keymap rebinds keys; --keys writes a GIF of one
    frame per key, and the binding is printed."""
    from sample import Player, load_model, parse_keymap
    model, ck = load_model(str(tiny_run / "out" / "ckpt.pt"))
    for layer in [model.backbone.out] + [g[-1] for g in model.adapter.g]:
        torch.nn.init.normal_(layer.weight, std=0.1)                   # make the actions matter in a 3-step model
    seqs = []
    for keys in (["right"] * 4, ["left"] * 4):
        p = Player(model, ck, torch.device("cpu"))
        p.restart()
        seqs.append(np.stack([p.step(k) for k in keys]))
    assert seqs[0].shape == (4, 16, 16, 3) and not np.array_equal(seqs[0], seqs[1])
    rebound = Player(model, ck, torch.device("cpu"), keymap=parse_keymap("left=4; up=0", ck["spec"]))   # coin: 4 right
    rebound.restart()
    assert rebound.keys["left"] == ck["spec"]["keys"]["right"] == 4 and rebound.keys["down"] == ck["spec"]["keys"]["down"]
    assert np.array_equal(np.stack([rebound.step("left") for _ in range(4)]), seqs[0])   # left now plays right
    assert parse_keymap("left=-1,0.5", dict(discrete=False, n_actions=0, action_dim=2)) == {"left": [-1.0, 0.5]}
    for bad in ("left=5", "left=1.5", "jump=1", "left=", "left=1,2", "left=nan"):
        with pytest.raises(UserError, match="--keymap"):
            parse_keymap(bad, ck["spec"])
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(tiny_run / "out" / "ckpt.pt"), "--play", "--keys",
            "right,right,up,space,none,left", "--out", str(tmp_path / "p.gif"), cwd=str(tiny_run))
    assert r.returncode == 0 and "keys: left -> 3, right -> 4" in r.stdout, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(tmp_path / "p.gif").n_frames == 7
    import sample                                  # play on one CPU thread (unless OMP_NUM_THREADS says), then as before
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()) as said:
        sample.main(["--ckpt", str(tiny_run / "out" / "ckpt.pt"), "--bench_play", "--device", "cpu"])
    assert re.search(r"[0-9.]+ frames/s", said.getvalue()) and torch.get_num_threads() == threads
    assert "OMP_NUM_THREADS" in os.environ or "cpu (1 thread)" in said.getvalue()


def test_a_stopped_mbrl_run_resumes_to_the_results_of_one_never_stopped(tmp_path, monkeypatch):
    """Ctrl-C in the second seed's second kind of imagination, after its first round: progress.pt holds the first
    seed, the second's first fit and first kind, and the second kind's state after its last finished round;
    --resume (only with the run's own flags, on the same kind of device) ends with the curves, baselines and weights
    of a run never stopped, and removes progress.pt. Without --resume the folder is refused, nothing overwritten."""
    import mbrl
    from envs import Stopped
    flags = ["--seed_episodes", "6", "--rounds", "2", "--episodes", "2", "--fit_iters", "2", "--update_iters", "2",
             "--value_iters", "2", "--eval_episodes", "2", "--eval_every", "1", "--candidates", "8", "--elites", "2",
             "--compile", "false", "--seeds", "2", "--imagination", "both", "--width", "32", "--depth", "1",
             "--episode_len", "8", "--horizon", "3"]
    whole = mbrl.main(mbrl.parse_args(flags + ["--out", str(tmp_path / "a")]))
    save, out = mbrl.Progress.save, ["--out", str(tmp_path / "b")]

    def stop_in_round_2_of_seed_1(self, **parts):
        save(self, **parts)
        if (parts.get("live") or {}).get("seed") == 1 and parts["live"]["kind"] == "uniform" and parts["live"]["round"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(mbrl.Progress, "save", stop_in_round_2_of_seed_1)
    with pytest.raises(Stopped, match="--resume"):
        mbrl.main(mbrl.parse_args(flags + out))
    monkeypatch.undo()
    before = (tmp_path / "b" / "progress.pt").read_bytes()
    for argv, match in ((out, "holds a stopped run.*pass --resume"), (out + ["--resume", "--rounds", "3"],
                                                                       "other flags: --rounds 3 \\(the run has 2\\)")):
        with pytest.raises(UserError, match=match):
            mbrl.main(mbrl.parse_args(flags + argv))
    assert (tmp_path / "b" / "progress.pt").read_bytes() == before
    saved = torch.load(tmp_path / "b" / "progress.pt", weights_only=True)
    torch.save(dict(saved, device="cuda"), tmp_path / "b" / "progress.pt")
    with pytest.raises(UserError, match="was run on cuda, and this run is on cpu"):
        mbrl.main(mbrl.parse_args(flags + out + ["--resume"]))
    torch.save(saved, tmp_path / "b" / "progress.pt")
    resumed = mbrl.main(mbrl.parse_args(flags + out + ["--resume"]))
    for name in ("model_mpc_prioritized", "model_mpc_uniform", "random", "oracle_mpc"):
        for key in ("final", "curves", "env_steps"):
            assert resumed["methods"][name].get(key) == whole["methods"][name].get(key), (name, key)
    assert not (tmp_path / "b" / "progress.pt").exists() and "[uniform seed 1] resume: after round 1 of 2" in (tmp_path / "b" / "mbrl.log").read_text()
    for kind in ("prioritized", "uniform"):
        a, b = (torch.load(tmp_path / d / f"world_model_{kind}_seed1.pt", weights_only=True) for d in "ab")
        for part in ("model", "reward", "value"):                      # the same weights: every state was restored
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (kind, part)


def test_mbrl_plans_in_a_gymnasium_game_from_pixels(tmp_path):
    """mbrl.py on gym:CartPole-v1 with tiny budgets: two context frames (a pole's velocity is not in one frame), the
    random and the true-simulator baselines, results.json and a world-model checkpoint."""
    game("gymnasium")
    r = run("mbrl.py", "--env", "gym:CartPole-v1", "--out", str(tmp_path / "m"), "--seed_episodes", "6", "--rounds", "1",
            "--episodes", "2", "--fit_iters", "2", "--update_iters", "1", "--value_iters", "1", "--eval_episodes", "2",
            "--candidates", "8", "--elites", "2", "--episode_len", "12", "--compile", "false")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "m" / "results.json"))
    assert res["config"]["context"] == 2 and res["config"]["size"] == 32 and res["config"]["frame_skip"] == 2
    assert res["methods"]["random"]["final"][0] > 0 and res["methods"]["oracle_mpc"]["final"][0] > 0
    ck = torch.load(tmp_path / "m" / "world_model_prioritized_seed0.pt", weights_only=True)
    assert ck["model_args"]["clip_len"] == 3 and ck["data"]["env"] == "gym:CartPole-v1"
