"""test_all.py — the test suite: `python -m pytest -q test_all.py` (CPU, a few minutes)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import DataConfig, UserError, WORLDS, generate_episodes, locate_agent, make_world
from model import ARConfig, DiT, DiTConfig, VideoGPT
from adapter import WorldModel
from loss import LOSSES, flow_matching_loss, motion_weights
from sample import read_checkpoint, rollout

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = DiTConfig(size=16, patch=4, clip_len=3, width=32, depth=2, heads=2)
SMALL_AR = ARConfig(size=16, clip_len=3, width=32, depth=2, heads=2, codes=16, tok_width=8)
BACKBONE_KINDS = ["dit", "ar"]
SPECS = {"coin": dict(discrete=True, n_actions=5, action_dim=0), "pusher": dict(discrete=False, n_actions=0, action_dim=2)}
TINY_FLAGS = ["--size", "16", "--width", "32", "--depth", "2", "--heads", "2", "--batch_size", "8", "--n_free", "24",
              "--n_labelled", "24", "--horizon", "3", "--eval_clips", "4", "--log_interval", "2"]


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
    w1, w2 = make_world(name, num=3, seed=1), make_world(name, num=3, seed=1)
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
    w = make_world(name, num=4, size=64, seed=0)
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
    w = make_world("pusher", size=16)
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
    w = make_world("coin", num=2); w.reset()
    with pytest.raises(UserError, match="shape"):
        w.step(np.zeros(3, int))
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        w.step(np.array([0, 7]))
    with pytest.raises(UserError, match="unknown world"):
        make_world("no_such_world")
    p = make_world("pusher", num=2); p.reset()
    with pytest.raises(UserError, match="size 2"):
        p.step(np.zeros((2, 3), np.float32))


def test_episodes_have_the_documented_layout():
    ep = generate_episodes(DataConfig(env="pusher", size=16, episode_len=10), 5, seed=0)
    assert ep["frames"].shape == (5, 11, 16, 16, 3) and ep["actions"].shape == (5, 10, 2)
    assert ep["rewards"].shape == (5, 10) and (ep["lengths"] <= 11).all()
    assert np.abs(ep["actions"]).max() <= 1


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


def test_wrong_action_shapes_are_user_errors():
    m = WorldModel(DiT(SMALL), "film", SPECS["coin"])
    x, tau = torch.randn(2, 3, 3, 16, 16), torch.rand(2, 3)
    with pytest.raises(UserError, match="discrete actions of shape"):
        m(x, tau, actions=torch.zeros(2, 3, 2))
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        m(x, tau, actions=torch.full((2, 3), 9))
    mp = WorldModel(VideoGPT(SMALL_AR), "film", SPECS["pusher"])
    with pytest.raises(UserError, match="continuous actions of shape"):
        mp(*backbone_input("ar"), actions=torch.zeros(2, 3, 5))


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


def test_sampler_recovers_a_known_answer():
    """Data: one of two fixed frames a, b, equally likely. The exact clean-frame predictor is the posterior mean
    E[x0 | x_t] (a Gaussian likelihood N(x_t; (1 - t) x0, t^2)); integrating its velocity must land on a or b."""
    a, b = torch.full((3, 16, 16), 0.5), torch.full((3, 16, 16), -0.5)

    class Oracle(torch.nn.Module):
        backbone = DiT(DiTConfig(size=16, patch=4, clip_len=3, width=8, depth=1, heads=1))

        def forward(self, x, tau, actions=None):
            t = tau[:, :, None, None, None].clamp(min=1e-4)
            la, lb = (-(x - (1 - t) * c).pow(2).sum((2, 3, 4), keepdim=True) / (2 * t ** 2) for c in (a, b))
            wa = torch.sigmoid(la - lb)
            return wa * a + (1 - wa) * b

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
    x, a = torch.rand(4, 3, 3, 16, 16) * 2 - 1, actions_for(SPECS["coin"], 4, 3)
    losses = []
    for _ in range(150):
        loss = flow_matching_loss(m, x, a, generator=torch.Generator().manual_seed(0))   # same noise every step
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


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
    assert {"model", "ema", "optimizer", "rng", "sampler"} <= set(ck)


def test_sample_writes_an_animated_gif_from_the_checkpoint_alone(tiny_run, tmp_path):
    from PIL import Image
    ckpt = tiny_run / "out" / "ckpt.pt"
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "x.gif"), "--horizon", "4",
            "--actions", "4,4,1", cwd=str(tiny_run))                                           # run where the data cache is
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "x.gif").n_frames > 1


def test_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["--stage", "scratch", "--env", "pusher", "--margin", "0", "--data_dir", str(tmp_path / "data"), *TINY_FLAGS]
    assert run("train.py", "--out", str(tmp_path / "a"), "--max_iters", "6", *common).returncode == 0
    assert run("train.py", "--out", str(tmp_path / "b"), "--max_iters", "3", *common).returncode == 0
    r = run("train.py", "--out", str(tmp_path / "b"), "--max_iters", "6", "--resume", *common)
    assert r.returncode == 0 and "resumed scratch" in r.stdout, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    assert b["step"] == 6 and b["model_args"]["margin"] == 0               # an explicit 0 is not "unset"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_bad_inputs_give_one_line_errors_and_overwrite_nothing(tiny_run, tmp_path):
    def bad(*args, match):
        r = run(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad("train.py", "--env", "no_such_world", "--out", str(tmp_path / "x"), match="unknown world")
    bad("train.py", "--backbone", "nosuch", "--out", str(tmp_path / "x"), match="unknown backbone")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(5000))
    bad("sample.py", "--ckpt", str(junk), "--out", str(tmp_path / "y.gif"), match="not a readable checkpoint")
    bad("sample.py", "--ckpt", str(tmp_path / "none.pt"), match="no checkpoint")
    bad("sample.py", "--ckpt", str(tiny_run / "out" / "ckpt.pt"), "--actions", "1,0;0,1", match="does not fit")
    other = dict(torch.load(tiny_run / "out" / "ckpt.pt", weights_only=False), backbone="ar")
    torch.save(other, tmp_path / "other.pt")
    bad("train.py", "--stage", "finetune", "--init_from", str(tmp_path / "other.pt"), "--out", str(tmp_path / "z"),
        match="backbone")
    # a new run into a folder that holds a good checkpoint refuses, and leaves it untouched
    ck = tiny_run / "out" / "ckpt.pt"
    before = ck.read_bytes()
    bad("train.py", "--out", str(tiny_run / "out"), "--max_iters", "2", *TINY_FLAGS, match="--resume")
    assert ck.read_bytes() == before


def test_help_lists_the_flags():
    r = run("train.py", "--help")
    for flag in ("--env", "--adapter", "--motion_weight", "--seed", "--out", "--max_iters", "--device", "--preset",
                 "--stage", "--init_from", "--resume"):
        assert flag in r.stdout
    assert run("data.py", "--list").stdout.split() == list(WORLDS)


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
    w = make_world(name, num=6, size=16, max_steps=16, seed=5)
    rng = np.random.default_rng(0)
    R_rand = play_episodes(w, lambda o, t: w.random_action(rng), 16)["rewards"].sum(1).mean()
    w = make_world(name, num=6, size=16, max_steps=16, seed=5)
    sim = make_world(name, num=6, size=16)
    spec = dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim)
    act, times = mpc_policy(w, lambda o, p, c: true_scores_of(w, sim, c, cfg.gamma), spec, cfg, rng, 0.0,
                            torch.Generator().manual_seed(0))
    R_plan = play_episodes(w, act, 16)["rewards"].sum(1).mean()
    assert len(times) == 16
    assert R_plan > R_rand + (1.0 if name == "coin" else 2.0), (R_plan, R_rand)   # coin: +1 coin; pusher: far closer


@pytest.mark.parametrize("name", list(WORLDS))
def test_reward_head_learns_the_reward_from_a_frame_and_an_action(name):
    """The keypoint reward head r(s, a), trained on random-action transitions, predicts held-out rewards."""
    from mbrl import RewardHead
    from data import ClipSampler, play_episodes, to_float
    torch.manual_seed(0)
    def episodes(seed):
        w, rng = make_world(name, num=256, size=16, max_steps=16, seed=seed), np.random.default_rng(seed)
        return play_episodes(w, lambda o, t: w.random_action(rng), 16)
    train, test = episodes(0), episodes(1)
    w = make_world(name)
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
    pr = Priorities(alpha=1.0, beta=0.5, seed=0, eps=0.0)
    pr.grow(4)
    pr.update(np.arange(4), np.array([1.0, 1.0, 1.0, 7.0]))
    idx, w = pr.sample(20000)
    freq = np.bincount(idx, minlength=4) / len(idx)
    assert np.allclose(freq, [0.1, 0.1, 0.1, 0.7], atol=0.02)           # P(j) = p_j / sum p
    P = np.array([0.1, 0.1, 0.1, 0.7])
    want = (4 * P) ** -0.5 / ((4 * P) ** -0.5).max()
    assert np.allclose(w, want[idx], atol=1e-5)                          # (N P(j))^-b / max
    uni = Priorities(alpha=0.0, beta=0.5, seed=0)
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
    agent = Agent(MBRLConfig(env="pusher", width=32, depth=1), dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
    agent.one_step_error = lambda frames, actions: (frames[:, -1] + 1).mean((1, 2, 3))   # a known 'error': brightness
    w, rng = make_world("pusher", num=4, size=16, seed=0), np.random.default_rng(0)
    buf = play_episodes(w, lambda o, t: w.random_action(rng), 8)
    agent.fit(buf, 30, 1)
    e, s = ClipSampler(buf, 2).every_clip()
    want = (to_float(buf["frames"][e, s + 1]) + 1).mean((1, 2, 3)).numpy() + agent.replay.eps
    assert len(e) == 4 * 7 and np.allclose(agent.replay.p, want, atol=1e-6)   # every clip drawn, in its own slot
    more = play_episodes(make_world("pusher", num=2, size=16, seed=1), lambda o, t: w.random_action(rng)[:2], 8)
    agent.fit(merge(buf, more), 0, 1)
    assert len(agent.replay.p) == 6 * 7 and np.all(agent.replay.p[28:] == want.max())


def test_agent_clone_is_independent():
    """--imagination both continues each kind from a clone of one fitted agent: same scores, separate training."""
    from mbrl import Agent, MBRLConfig
    from data import play_episodes, to_float
    cfg = MBRLConfig(env="pusher", width=32, depth=1)
    agent = Agent(cfg, dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
    w, rng = make_world("pusher", num=4, size=16, seed=0), np.random.default_rng(0)
    buf = play_episodes(w, lambda o, t: w.random_action(rng), 8)
    agent.fit(buf, 2, 1)
    twin = agent.clone()
    s, prev, cand = to_float(buf["frames"][:, 3]), torch.from_numpy(buf["actions"][:, 2]), torch.rand(4, 3, 2, 2) * 2 - 1
    def score(a):
        a.g.manual_seed(1)
        return a.score(s, prev, cand)
    before = score(agent)
    assert torch.allclose(before, score(twin), atol=1e-5)
    twin.fit(buf, 2, 5)
    assert torch.allclose(before, score(agent), atol=1e-5) and not torch.allclose(before, score(twin), atol=1e-5)


def test_value_iters_0_plans_on_rewards_alone():
    """--value_iters 0 drops the terminal value from the score: an untrained value must not steer the plan."""
    from mbrl import Agent, MBRLConfig
    from data import to_float
    w = make_world("pusher", num=2, size=16, seed=0)
    s, prev, cand = to_float(w.reset()[0]), torch.zeros(2, 2), torch.rand(2, 3, 2, 2) * 2 - 1
    for iters in (0, 150):
        agent = Agent(MBRLConfig(env="pusher", width=32, depth=1, value_iters=iters), dict(discrete=False, n_actions=0, action_dim=2), "cpu", 0)
        before = agent.score(s, prev, cand)
        with torch.no_grad():
            agent.value.mlp[-1].bias += 5.0                                     # shift every value by 5
        shift = agent.score(s, prev, cand) - before
        ret, tail, _ = agent.imagine(s, prev, cand)
        expect = torch.zeros_like(shift) if iters == 0 else 5.0 * tail
        assert torch.allclose(shift, expect, atol=1e-4)


def test_value_is_trained_on_imagined_states():
    """value_update walks d ~ U{0..D} random steps in the model from each drawn replay state before its TD update:
    with D = 0 V is trained on the real states, with D > 0 also on generated frames; both action kinds."""
    from mbrl import Agent, MBRLConfig, Priorities, replay_states
    from data import play_episodes
    for env in ("coin", "pusher"):
        w, rng = make_world(env, num=4, size=16, seed=0), np.random.default_rng(0)
        spec = dict(discrete=w.discrete, n_actions=w.n_actions, action_dim=w.action_dim)
        buf = play_episodes(w, lambda o, t: w.random_action(rng), 6)
        states, prev = replay_states(buf)
        for D in (0, 3):
            agent = Agent(MBRLConfig(env=env, width=32, depth=1, batch_size=16, imagine_horizon=D), spec, "cpu", 0)
            agent.fit(buf, 3, 1)                                                # untrained, the model copies its context
            seen, forward = [], agent.value.forward
            agent.value.forward = lambda x: (seen.append(x) if torch.is_grad_enabled() else None) or forward(x)
            starts = Priorities(0.6, 0.4, 0)
            starts.grow(len(states))
            for _ in range(4):
                assert np.isfinite(agent.value_update(starts, states, prev))
            real = torch.cat(seen)[:, None].sub(states[None]).abs().amax((2, 3, 4)).min(1).values < 1e-4   # a real state?
            assert real.all() if D == 0 else not real.all()
            assert (starts.p != 1.0).sum() > 0                                  # priorities written back


def test_mbrl_runs_end_to_end(tmp_path):
    r = run("mbrl.py", "--env", "pusher", "--out", str(tmp_path / "m"), "--imagination", "both", "--seeds", "2",
            "--seed_episodes", "4", "--rounds", "1", "--episodes", "2", "--fit_iters", "3", "--update_iters", "2",
            "--value_iters", "2", "--eval_episodes", "2", "--candidates", "8", "--elites", "2", "--episode_len", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "m" / "results.json"))
    assert {"model_mpc_prioritized", "model_mpc_uniform", "random", "oracle_mpc"} <= set(res["methods"])
    m = res["methods"]["model_mpc_prioritized"]
    assert len(m["curves"]) == 2 and len(m["curves"][0]) == 2 and m["env_steps"][0][1] > m["env_steps"][0][0]
    assert "normalized" in res and res["decision_ms"] > 0
    assert (tmp_path / "m" / "curves.png").stat().st_size > 1000
    bad = run("mbrl.py", "--env", "nowhere", "--out", str(tmp_path / "n"))
    assert bad.returncode != 0 and "unknown world" in bad.stderr and "Traceback" not in bad.stderr
