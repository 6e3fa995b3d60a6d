"""mbrl.py — planning inside the learned world simulator, with prioritized imagination (the paper's).

    python mbrl.py                              # coin: MPC in the learned model vs random vs MPC in the true world
    python mbrl.py --env pusher --seeds 3       # mean and spread over seeds
    python mbrl.py --env pusher --seeds 3 --first_seed 3   # seeds 3-5, to extend that study
    python mbrl.py --imagination both           # prioritized vs uniform imagination, same seeds, one plot
    python mbrl.py --init_from out/ckpt.pt      # start from a world model trained by train.py
    python mbrl.py --bench 10 --candidates 256 --horizon 8   # the time of one MPC decision, nothing trained
    python mbrl.py --env pusher --resume        # continue a stopped run (progress.pt, after the first fit and each round)

The loop, per seed:
  1. play --seed_episodes episodes with random actions: the replay buffer of real transitions;
  2. fit the world model (model.py + adapter.py, trained by loss.py) and a reward head (with an
     episode-end head) on the buffer: during planning, rewards come from these heads, never from the world.
     The model's clips are replayed by priority, P ∝ (its one-step error on the clip)^a (Agent.fit), so rare
     transitions it gets wrong are drawn more often than their share of the data
     (steps 1-2 are shared by both kinds of imagination under --imagination both: each continues from a clone);
  3. train the value function by TD in imagination; then for --rounds rounds: evaluate (every --eval_every
     rounds); act with MPC in the real world (--episodes, with exploration), add the data; update the world
     model and heads; train the value function by TD in imagination. A last evaluation.

The reward head r(s_t, a_t) and the value V(s) read frames through keypoints (FrameNet). The value gets
--value_iters 30 TD updates per round.

The planner is MPC with the cross-entropy method: for every world at once, sample action sequences of
--horizon steps (a Gaussian per step for continuous actions, a categorical one for discrete actions),
score them all in one batched world-model rollout,

    score = sum_h gamma^h alive_h r_hat(s_h, a_h) + gamma^H alive_H V(s_H),

refit the distribution to the best --elites, repeat --cem_iters times, execute the first action of the best
sequence, and warm-start the next decision from this plan shifted by one step.

Prioritized imagination: the value function V(s) is trained by TD on imagined rollouts that start from real
replay states j drawn with P(j) ∝ p_j^a, p_j = |TD error_j| + eps (prioritized replay, Schaul et al. 2016), with
importance weights (N P(j))^-b / max_k (N P(k))^-b; the sampled states' priorities are refreshed after every update
with their own TD errors. `--imagination uniform` is the same with a = 0 (every state equally likely, every weight 1).
Each TD update is made after a few random steps in the learned model from the drawn state (Agent.value_update),
because the planner reads V on the model's frames, not on real ones.

Every random draw comes from generators made for the seed on the device that uses them: seeds are independent,
and evaluating (which plans with generators of its own) does not change what is trained.

Baselines from the same script and the same evaluation episodes: random actions, and the same planner scoring
its candidates in the true simulator (get_state / set_state), the upper bound. Writes <out>/results.json
(returns against real environment steps per method and seed, wall time, decision time, and
normalized = (R - R_random) / (R_oracle - R_random) of the final evaluation) and <out>/curves.png.
"""
import copy
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from envs import ABOVE_0, AT_LEAST_0, AT_LEAST_1, AT_LEAST_2, FRACTION, Stopped, UserError, action_space, check_folder, check_size, claimed, make_env, run_cli
from data import ClipSampler, DataConfig, generate_episodes, play_episodes, to_float
from model import BACKBONES, compiled, make_generator, pick_device, seeded
from adapter import WorldModel
from loss import LOSSES
from sample import CKPT_FORMAT, load_model, read_checkpoint, read_world_model, rollout
from train import opt, parse_config, resume_command, save_checkpoint


@dataclass
class MBRLConfig:
    env: str = opt("coin", "coin, pusher (built in), gym:<id> (e.g. gym:CartPole-v1), procgen:<game>")
    backbone: str = opt("dit", "world-model backbone: " + ", ".join(BACKBONES) + " (ignored with --init_from; ar plans far "
                               "slower: the GPT samples each frame code by code)")
    imagination: str = opt("prioritized", "start states of imagined rollouts: prioritized | uniform | both")
    seeds: int = opt(1, "independent runs (seeds first_seed..first_seed+N-1): curves show their mean and spread", AT_LEAST_1)
    first_seed: int = opt(0, "the first seed: adds seeds to an earlier study (seed s is the same run whatever came before)",
                          AT_LEAST_0)
    out: str = opt("out_mbrl", "output folder: results.json, curves.png, mbrl.log")
    resume: bool = opt(False, "continue the stopped run in --out from its progress.pt (saved after the first fit and "
                              "every round)")
    init_from: str = opt("", "a train.py checkpoint to start the world model from (its frame size is used)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = opt(True, "torch.compile the world model for planning (about a minute of compiling, then decisions "
                              "1.1-1.4x faster on a 2-core CPU: coin, pusher, gym:Pendulum-v1, 2026-12-03)")
    # the world model (a small DiT unless --init_from)
    size: int = opt(None, "frame size in pixels (default: 16 for the built-in worlds, 32 for games)", AT_LEAST_1)
    context: int = opt(None, "frames the world model sees before each new one (default: 1 for the built-in worlds, "
                             "2 for games, which are not Markov in one frame)", AT_LEAST_1)
    width: int = opt(96, "world-model width (ignored with --init_from)", AT_LEAST_1)
    depth: int = opt(3, "world-model blocks (ignored with --init_from)", AT_LEAST_1)
    # data and training
    episode_len: int = opt(None, "steps per episode at most (default: 32 for the built-in worlds, 200 for games)", AT_LEAST_1)
    frame_skip: int = opt(0, "gym: repeat each action this many frames; 0: the game's default (2 for CartPole)", AT_LEAST_0)
    seed_episodes: int = opt(512, "random-action episodes before the first fit", AT_LEAST_1)
    rounds: int = opt(4, "act -> add data -> update rounds", AT_LEAST_0)
    episodes: int = opt(8, "MPC episodes played in the real world per round", AT_LEAST_1)
    explore: float = opt(0.2, "probability of a random action while collecting", FRACTION)
    fit_iters: int = opt(4000, "world-model iterations of the first fit", AT_LEAST_0)
    tokenizer_iters: int = opt(1000, "ar: VQ tokenizer iterations before the first fit (without --init_from), "
                                     "on the random-action frames (the GPT models frames as the tokenizer's codes)", AT_LEAST_1)
    motion_weight: float = opt(None, "motion-reinforced loss weight c (loss.py; default: 0 for the built-in worlds, 4 for "
                                     "games, as train.py's games preset: their controlled objects are a few pixels)", AT_LEAST_0)
    model_alpha: float = opt(1.0, "world-model replay: clips drawn with P ∝ (one-step error)^a; 0: uniform", AT_LEAST_0)
    update_iters: int = opt(300, "world-model iterations per round", AT_LEAST_0)
    value_iters: int = opt(30, "value-function TD updates per round (and after the first fit); 0: no terminal value", AT_LEAST_0)
    batch_size: int = opt(32, "batch size of every update", AT_LEAST_1)
    lr: float = opt(1e-3, "learning rate of every update", ABOVE_0)
    # imagination
    alpha: float = opt(0.6, "priority exponent a (prioritized); uniform uses 0", AT_LEAST_0)
    beta: float = opt(0.4, "importance-weight exponent b", FRACTION)
    imagine_horizon: int = opt(5, "random-action steps imagined from each start state; V is trained at depth U{0..this}", AT_LEAST_0)
    imagine_actions: int = opt(8, "actions tried per imagined step (discrete worlds: all of them)", AT_LEAST_1)
    # the planner
    horizon: int = opt(5, "planning horizon H", AT_LEAST_1)
    candidates: int = opt(32, "action sequences scored per CEM iteration", AT_LEAST_1)
    elites: int = opt(6, "best sequences the distribution is refitted to (the refit needs a spread)", AT_LEAST_2)
    cem_iters: int = opt(2, "CEM iterations per decision", AT_LEAST_1)
    gamma: float = opt(0.95, "discount", FRACTION)
    plan_batch: str = opt("auto", "how a decision imagines its candidates: tree (discrete actions: each action prefix "
                                  "once, the fewest FLOPs, what a CPU wants), flat (every candidate in one batch of fixed "
                                  "shape, on CUDA replayed as CUDA graphs for the DiT at --plan_steps 1: the fewest "
                                  "kernel launches, what a GPU wants); auto: tree on a CPU, flat on CUDA; continuous "
                                  "actions are always flat")
    plan_steps: int = opt(1, "dit: Euler steps per imagined frame (x-prediction: 1 is the model's mean frame)", AT_LEAST_1)
    eval_episodes: int = opt(16, "evaluation episodes (the same start states for every method)", AT_LEAST_1)
    eval_every: int = opt(4, "evaluate after the first fit, every this many rounds, and at the end (1: every round)", AT_LEAST_1)
    bench: int = opt(0, "N > 0: only time N MPC decisions for one world in a world model of untrained weights (the "
                        "cost does not depend on them) at --candidates x --horizon, print the median, write nothing", AT_LEAST_0)

    def __post_init__(self):
        """The frame size and context that depend on the environment (or on the --init_from checkpoint)."""
        ck = read_world_model(self.init_from, "--init_from") if self.init_from else None
        init = ck["model_args"] if ck else None
        game = ":" in self.env
        if ck:                                      # the checkpoint's model, recorded as it is (results.json)
            for flag, theirs in (("size", init["size"]), ("context", init["clip_len"] - 1)):
                if getattr(self, flag) not in (None, theirs):
                    raise UserError(f"--{flag} {getattr(self, flag)} but --init_from {self.init_from} was trained with "
                                    f"{theirs}: drop --{flag}, or start from scratch")
            self.backbone, self.width, self.depth = ck["backbone"], init["width"], init["depth"]
        if not 2 <= self.elites <= self.candidates:
            raise UserError(f"--elites {self.elites}: must be 2 or more (the refit needs a spread) and at most "
                            f"--candidates {self.candidates}")
        if self.plan_batch not in ("auto", "tree", "flat"):
            raise UserError(f"--plan_batch '{self.plan_batch}': choose auto, tree or flat")
        self.size = self.size or (init["size"] if init else 32 if game else 16)
        check_size(self.size, "--size ")
        self.context = self.context or (init["clip_len"] - 1 if init else 2 if game else 1)
        self.episode_len = self.episode_len or (200 if game else 32)
        if self.episode_len < self.context + 1:         # a clip of context + 1 frames starts after an episode's first
            raise UserError(f"--episode_len {self.episode_len} is too short for the world model's clips of --context "
                            f"{self.context} + 1 frames: pass --episode_len {self.context + 1} or more")
        self.motion_weight = (4.0 if game else 0.0) if self.motion_weight is None else self.motion_weight
        theirs = ck["data"].get("frame_skip") if ck else 0
        if self.frame_skip and theirs and self.frame_skip != theirs:   # the model learned the steps of its own skip
            raise UserError(f"--frame_skip {self.frame_skip} but --init_from {self.init_from} was trained with "
                            f"frame_skip {theirs}: drop --frame_skip")
        self.frame_skip = self.frame_skip or theirs or make_env(self.env).frame_skip   # 0: the checkpoint's, or the game's

    def world(self, size, num, seed=0):
        """num copies of the environment, as every part of the loop makes it."""
        return make_env(self.env, num=num, seed=seed, size=size, max_steps=self.episode_len, frame_skip=self.frame_skip)


# ----------------------------------------------------------------------------------------------
# small frame networks: reward (+ episode end) and value

class FrameNet(nn.Module):
    """A frame (B, C, S, S) in [-1, 1], and optionally an action, -> (B, n_out), through keypoints.

    Convolutions at full resolution make `points` feature maps; a spatial softmax turns each into the expected
    (x, y) of where it fires (deep spatial autoencoders, Levine et al. 2016), and an MLP reads those positions,
    each map's peak, and the action. Rewards and values in these worlds are functions of where objects are,
    which an MLP computes easily from positions and poorly from a flattened grid of backgrounds."""

    def __init__(self, n_out, size, action_in=0, channels=3, width=32, points=16):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, 1, 1), nn.GELU(), nn.Conv2d(width, points, 1))
        c = (torch.arange(size) + 0.5) / size * 2 - 1                           # pixel centres in [-1, 1]
        self.register_buffer("grid", torch.stack([c.repeat(size), c.repeat_interleave(size)]), persistent=False)  # (2, S*S): x, y
        self.mlp = nn.Sequential(nn.Linear(3 * points + action_in, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                 nn.Linear(128, n_out))

    def keypoints(self, x):
        """Frames (B, C, S, S) -> (B, 3K): each map's expected (x, y) and its peak."""
        f = self.conv(x).flatten(2)                                             # (B, K, S*S)
        xy = torch.einsum("bkp,cp->bkc", f.softmax(-1), self.grid).flatten(1)   # (B, 2K) expected positions
        return torch.cat([xy, f.amax(-1)], 1)

    def forward(self, x, action=None, points=None):
        """x (B, C, S, S) frames, or their keypoints already computed (points (B, 3K), x None)."""
        points = self.keypoints(x) if points is None else points
        return self.mlp(points if action is None else torch.cat([points, action], 1))


class RewardHead(FrameNet):
    """(s_t, a_t) -> (reward r_t, logit of 'the episode ends on this step'). Discrete actions enter one-hot.
    Conditioning on the action rather than on s_t+1 keeps the head off the frame after a reward, which a
    stochastic world (the coin reappears anywhere) makes the least predictable one."""

    def __init__(self, size, spec):
        self.n = spec["n_actions"] if spec["discrete"] else 0
        super().__init__(2, size, action_in=self.n or spec["action_dim"])

    def forward(self, s, a, points=None):
        a = F.one_hot(a, self.n).float() if self.n else a
        out = super().forward(s, a, points)
        return out[:, 0], out[:, 1]


class Value(FrameNet):
    def __init__(self, size):
        super().__init__(1, size)

    def forward(self, s):
        return super().forward(s)[:, 0]


# ----------------------------------------------------------------------------------------------
# actions and the planner: CEM over action sequences, Gaussian (continuous) or categorical (discrete)

def random_actions(spec, shape, g):
    """Uniformly random actions of a leading shape, on the generator's device: ids, or vectors in [-1, 1]^A."""
    if spec["discrete"]:
        return torch.randint(spec["n_actions"], shape, generator=g, device=g.device)
    return torch.rand(*shape, spec["action_dim"], generator=g, device=g.device) * 2 - 1


class CEM:
    """One planner for B worlds at once, on the device of its generator. plan(score) -> the first action of the best
    sequence per world. score(cand) takes candidates (B, N, H) ids or (B, N, H, A) vectors and returns (B, N) scores."""

    def __init__(self, spec, B, cfg, generator):
        self.spec, self.B, self.cfg, self.g = spec, B, cfg, generator
        H, dev = cfg.horizon, generator.device
        self.param = (torch.full((B, H, spec["n_actions"]), 1 / spec["n_actions"], device=dev) if spec["discrete"]
                      else torch.zeros(B, H, spec["action_dim"], device=dev))          # probs, or means

    def _sample(self, param, std):
        B, H = param.shape[:2]
        N = self.cfg.candidates
        if self.spec["discrete"]:
            flat = param.reshape(B * H, -1)
            return torch.multinomial(flat, N, replacement=True, generator=self.g).view(B, H, N).permute(0, 2, 1)
        noise = torch.randn((B, N) + param.shape[1:], generator=self.g, device=param.device)
        return (param[:, None] + std[:, None] * noise).clamp(-1, 1)

    def plan(self, score):
        cfg, B = self.cfg, self.B
        param, std = self.param, torch.ones_like(self.param) * 0.7
        rows = torch.arange(B, device=param.device)
        for _ in range(cfg.cem_iters):
            cand = self._sample(param, std)                                     # (B, N, H[, A])
            s = score(cand).to(param.device)                                    # (B, N)
            elite = cand[rows[:, None], s.topk(cfg.elites, 1).indices]          # (B, E, H[, A])
            if self.spec["discrete"]:
                freq = F.one_hot(elite, self.spec["n_actions"]).float().mean(1)  # (B, H, K)
                param = 0.9 * freq + 0.1 / self.spec["n_actions"]
            else:
                param, std = elite.mean(1), elite.std(1).clamp(min=0.05)
            best = cand[rows, s.argmax(1)]                                      # (B, H[, A])
        fresh = 1 / self.spec["n_actions"] if self.spec["discrete"] else 0.0      # warm start: shift the plan by one
        self.param = torch.cat([param[:, 1:], torch.full_like(param[:, :1], fresh)], 1)
        return best[:, 0]


def true_scores(world, cand, gamma):
    """The oracle's score: the discounted true return of each candidate, from copies of the world's state."""
    saved = world.get_state()
    B, N, H = cand.shape[:3]
    world.set_state(world.tile(saved, N))
    world.draw = False                                                    # rewards alone are needed (games skip drawing)
    total, alive = np.zeros(B * N), np.ones(B * N)
    acts = cand.flatten(0, 1).cpu().numpy()
    for h in range(H):
        _, r, term, _, _ = world.step(acts[:, h])
        total += gamma ** h * alive * r
        alive *= 1 - term
    world.set_state(saved)
    world.draw = True
    return torch.from_numpy(total).view(B, N).float()


# ----------------------------------------------------------------------------------------------
# the learned simulator: world model + reward head + value

def new_world_model(cfg, spec, device):
    """The world model: a train.py checkpoint (--init_from), or a small DiT/GPT with the film adapter at --size."""
    if cfg.init_from:
        wm, ck = load_model(cfg.init_from, device, ema=True, flag="--init_from")
        if wm.adapter is None:
            raise UserError(f"--init_from {cfg.init_from} has no action adapter: pass a finetune/scratch checkpoint")
        if action_space(ck["spec"]) != action_space(spec):
            raise UserError(f"--init_from {cfg.init_from} was trained on the actions of '{ck['data']['env']}' "
                            f"({action_space(ck['spec'])}), not those of '{cfg.env}' ({action_space(spec)})")
        return wm.train(), ck["backbone"], ck["model_args"]
    cls, mcls = BACKBONES[cfg.backbone]
    kw = dict(size=cfg.size, width=cfg.width, depth=cfg.depth, heads=4, clip_len=cfg.context + 1)
    if cfg.backbone == "dit":
        kw.update(patch=cfg.size // 4, margin=4)                           # 16 tokens a frame
    return WorldModel(cls(mcls(**kw)), "film", spec).to(device), cfg.backbone, asdict(mcls(**kw))


def replay_safe(device, kind, plan_steps):
    """Whether the imagined rollouts may run as CUDA graphs: only where each call's outputs are used up before the
    next call, since a replay overwrites them. A KV cache carried from call to call (the GPT's, code by code; a DiT
    denoising in several Euler steps) is not; the DiT at one Euler step is (its shared context is copied out)."""
    return torch.device(device).type == "cuda" and kind == "dit" and plan_steps == 1


class Agent:
    """The world model, its reward head, the value function, their optimizers, and the imagination.
    Every draw comes from generators made for this agent's seed on its device: `g` for training; planning takes a
    generator from its caller (acting, evaluating), so evaluating never changes what is trained."""

    def __init__(self, cfg, spec, device, seed):
        self.cfg, self.spec, self.device = cfg, spec, torch.device(device)
        with seeded(seed):
            self.wm, self.kind, self.model_args = new_world_model(cfg, spec, self.device)
            self.size = self.wm.backbone.cfg.size
            self.reward = RewardHead(self.size, spec).to(self.device)
            self.value = Value(self.size).to(self.device)
        self.target = copy.deepcopy(self.value).requires_grad_(False)
        flat = cfg.plan_batch == "flat" or (cfg.plan_batch == "auto" and self.device.type == "cuda")
        self.tree = spec["discrete"] and not flat                             # plan_scores imagines a search tree
        graphs = flat and replay_safe(self.device, self.kind, cfg.plan_steps)
        self.plan_wm = compiled(self.wm, graphs) if cfg.compile else self.wm   # the same weights, for imagination
        self.opt_wm = torch.optim.AdamW([p for p in self.wm.parameters() if p.requires_grad], cfg.lr, weight_decay=0.01)
        self.opt_r = torch.optim.AdamW(self.reward.parameters(), cfg.lr)
        self.opt_v = torch.optim.AdamW(self.value.parameters(), cfg.lr)
        self.g = make_generator(self.device, seed)
        self.amp = pick_device(str(self.device))[1]                           # bf16 autocast on CUDA, None on CPU
        self.replay = Priorities(cfg.model_alpha, 0.0, stream(seed, "model replay"), eps=1e-4)   # the model's clips, by error

    def clone(self):
        """An independent copy (weights, optimizer states, replay priorities, generator state), for --imagination
        both: each kind continues from the same fitted agent on the same random stream, a paired comparison."""
        return copy.deepcopy(self)

    NETS, OPTS = ("wm", "reward", "value", "target"), ("opt_wm", "opt_r", "opt_v")

    def state(self):
        """Everything training changes: weights, optimizer moments, the generator, the model-replay priorities."""
        return dict({n: getattr(self, n).state_dict() for n in self.NETS + self.OPTS}, g=self.g.get_state(),
                    replay=self.replay.state())

    def load_state(self, state):
        for n in self.NETS + self.OPTS:                   # in place: plan_wm (compiled) shares the world model's weights
            getattr(self, n).load_state_dict(state[n])
        self.g.set_state(state["g"])
        self.replay.load_state(state["replay"])
        self.wm.eval()                                    # as fit() leaves it

    def checkpoint(self, desc):
        """The world model as a train.py checkpoint (sample.py reads it), with the reward and value heads."""
        w = self.wm.state_dict()
        return dict(desc, format=CKPT_FORMAT, backbone=self.kind, model_args=self.model_args, spec=self.spec,
                    adapter=self.wm.kind, stage="mbrl", model=w, ema=w, reward=self.reward.state_dict(),
                    value=self.value.state_dict())

    # --- fitting on real data
    def fit_tokenizer(self, buffer, iters, rng_seed):
        """The GPT's VQ tokenizer (model.py) on single frames of the buffer, then frozen inside the GPT, as train.py's
        tokenizer stage trains it before the GPT (the codebook starts empty: untrained, every frame is one code)."""
        tok = self.wm.backbone.tokenizer.requires_grad_(True).train()
        opt = torch.optim.AdamW(tok.parameters(), lr=2e-3, weight_decay=0.0)    # train.py's: a constant rate
        frames = ClipSampler(buffer, 1, seed=rng_seed)
        for _ in tqdm(range(iters), desc="tokenizer", unit="it", disable=None, leave=False):
            loss, _ = tok.loss(frames.sample(2 * self.cfg.batch_size)["frames"][:, 0].to(self.device), generator=self.g)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        tok.requires_grad_(False).eval()
        return loss.item()

    def fit(self, buffer, iters, rng_seed):
        """World model and reward head on real clips from the buffer.

        The world model's clips are drawn by prioritized replay (Priorities, no importance weights: the bias
        towards hard clips is the point): a clip's priority is the model's error on its last frame, predicted
        from the frames before it the way the planner predicts (one_step_error), refreshed after each update;
        new clips enter at the top. --model_alpha 0 is uniform replay."""
        fix = (f"{self.cfg.env}'s episodes end sooner: " + ("choose a game with longer ones (the --init_from model fixes "
               "--context)" if self.cfg.init_from else "lower --context (or raise --episode_len, if it cut them)"))
        wm_clips = ClipSampler(buffer, self.wm.backbone.cfg.clip_len, seed=rng_seed, fix=fix)
        episode, start = wm_clips.every_clip()
        self.replay.grow(len(episode) - len(self.replay.p))
        pairs = ClipSampler(buffer, 2, seed=rng_seed + 1, fix=fix)
        loss = loss_r = torch.tensor(float("nan"))                          # iters = 0: only the priorities grow
        for _ in tqdm(range(iters), desc="world model and reward head", unit="it", disable=None, leave=False):
            idx, _ = self.replay.sample(self.cfg.batch_size)
            b = wm_clips.clips(episode[idx], start[idx])
            loss = self.model_step(b["frames"].to(self.device), b["actions"].to(self.device), idx)
            loss_r = self.reward_step(pairs.sample(self.cfg.batch_size))
        self.wm.eval()
        return loss.item(), loss_r.item()

    def model_step(self, frames, actions, idx):
        self.wm.train()
        loss = LOSSES[self.kind](self.wm, frames, actions, self.cfg.motion_weight, cell=self.wm.backbone.cell, generator=self.g)
        self.opt_wm.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(self.wm.parameters(), 1.0); self.opt_wm.step()
        if self.replay.alpha > 0:
            self.replay.update(idx, self.one_step_error(frames, actions).cpu().numpy())
        return loss.detach()

    def reward_step(self, p):
        x = p["frames"].to(self.device)
        r, end = self.reward(x[:, 0], p["actions"][:, 1].to(self.device))   # actions[:, 1] leads x0 -> x1
        loss = F.mse_loss(r, p["rewards"][:, 1].to(self.device)) + \
            F.binary_cross_entropy_with_logits(end, p["ends"][:, 1].float().to(self.device))
        self.opt_r.zero_grad(set_to_none=True); loss.backward(); self.opt_r.step()
        return loss.detach()

    @torch.no_grad()
    def one_step_error(self, frames, actions):
        """(B,) mean squared error of each clip's last frame, generated from the frames before it as in planning."""
        self.wm.eval()
        pred = rollout(self.wm, frames[:, :-1], actions, steps=self.cfg.plan_steps, temperature=0.0, generator=self.g)
        return (pred[:, 0] - frames[:, -1]).pow(2).mean((1, 2, 3))

    # --- imagination
    @torch.no_grad()
    def imagine(self, s, prev_action, cand, g, memo=None):
        """Roll the learned simulator from k context frames s (B, k, C, S, S), led into by prev_action (B, k[, A]),
        under candidates (B, N, H[, A]), noise from g. Returns the model's discounted rewards (B, N), the last frames'
        alive-weighted discount (B, N), and the generated frames (B*N, H, C, S, S). With discrete actions and a memo
        (a dict kept for one decision), every action prefix is imagined once (dream_tree)."""
        B, N, H = cand.shape[:3]
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            if memo is not None and self.spec["discrete"]:
                frames, points = self.dream_tree(s, prev_action, cand, g, memo)
            else:
                frames, points = self.dream(s, prev_action, cand, g)
        a = cand.to(self.device).flatten(0, 1)                                # (B*N, H[, A])
        r, end = self.reward(None, a.flatten(0, 1), points.flatten(0, 1))     # r(s_h, a_h), h < H
        r, done = r.view(B * N, H), torch.sigmoid(end).view(B * N, H)
        disc = self.cfg.gamma ** torch.arange(H, device=r.device)
        alive = torch.cumprod(torch.cat([torch.ones_like(done[:, :1]), 1 - done], 1), 1)   # (B*N, H+1)
        ret = (disc * alive[:, :-1] * r).sum(1)
        tail = self.cfg.gamma ** H * alive[:, -1]
        return ret.view(B, N), tail.view(B, N), frames

    def dream(self, s, prev_action, cand, g):
        """The frames of every candidate, one batched rollout (each world's context computed once for its N candidates),
        and the reward head's keypoints of s_0 .. s_{H-1} -> (B*N, H, C, S, S), (B*N, H, P)."""
        B, N, H = cand.shape[:3]
        own = prev_action.to(self.device).repeat_interleave(N, 0)             # (B*N, k[, A]): the context's actions
        acts = torch.cat([own, cand.to(self.device).flatten(0, 1)], 1)
        frames = rollout(self.plan_wm, s, acts, steps=self.cfg.plan_steps, temperature=0.0, generator=g).float()
        points = self.reward.keypoints(torch.cat([s[:, -1], frames[:, :-1].flatten(0, 1)]))   # s_0 once per world
        return frames, torch.cat([points[:B].repeat_interleave(N, 0)[:, None],
                                  points[B:].view(B * N, H - 1, points.shape[1])], 1)

    def dream_tree(self, s, prev_action, cand, g, memo):
        """dream() for discrete actions as a search tree: a frame is a function of its world and its action prefix,
        so candidates that share a prefix (in this CEM iteration or an earlier one of the same decision: `memo`) share
        its frame and keypoints, imagined once. One rollout step per depth over the prefixes not seen yet, then one
        keypoint pass over the nodes at depths 0..H-1 (the ones a reward reads) not yet in the memo."""
        B, N, H = cand.shape
        k, rows = s.shape[1], cand.tolist()
        seen, points = memo.setdefault("frames", {}), memo.setdefault("points", {})   # node -> frame, keypoints
        key = lambda b, n, h: (b,) + tuple(rows[b][n][:h])                    # a node: world and action prefix
        frame = lambda q, d: seen[q[:d + 1]] if d >= 1 else s[q[0], k - 1 + d]  # node q's ancestor at depth d <= 0 too
        for h in range(1, H + 1):
            new = list(dict.fromkeys(key(b, n, h) for b in range(B) for n in range(N) if key(b, n, h) not in seen))
            if not new:
                continue
            window = torch.stack([torch.stack([frame(q, d) for d in range(h - k, h)]) for q in new])   # (U, k, C, S, S)
            acts = [[q[d] if d >= 1 else prev_action[q[0], k - 1 + d].item() for d in range(h - k, h + 1)] for q in new]
            out = rollout(self.plan_wm, window, torch.tensor(acts, device=self.device), steps=self.cfg.plan_steps,
                          temperature=0.0, generator=g)[:, 0].float()
            seen.update(zip(new, out))
        nodes = [[key(b, n, h) for h in range(H + 1)] for b in range(B) for n in range(N)]   # (B*N, H+1)
        todo = list(dict.fromkeys(q for row in nodes for q in row[:-1] if q not in points))
        if todo:
            points.update(zip(todo, self.reward.keypoints(torch.stack([frame(q, len(q) - 1) for q in todo]))))
        frames = torch.stack([torch.stack([seen[q] for q in row[1:]]) for row in nodes])
        return frames, torch.stack([torch.stack([points[q] for q in row[:-1]]) for row in nodes])

    def read_last(self, frames, cand, memo=None):
        """The value V of each rollout's last frame, (B*N, H, C, S, S) -> (B, N). With a decision's
        memo (dream_tree), a last frame is a leaf of the tree, its world and action sequence: each distinct one is
        read once per decision, however many candidates of however many CEM iterations end on it."""
        B, N = cand.shape[:2]
        if memo is None or not self.spec["discrete"]:
            return self.value(frames[:, -1]).view(B, N)
        read = memo.setdefault("last", {})
        leaves = [(b,) + tuple(row) for b, rows in enumerate(cand.tolist()) for row in rows]   # (B*N,) leaf keys
        new = list(dict.fromkeys(q for q in leaves if q not in read))
        if new:
            read.update(zip(new, self.value(torch.stack([memo["frames"][q] for q in new]))))
        return torch.stack([read[q] for q in leaves]).view(B, N)

    @torch.no_grad()
    def score(self, s, prev_action, cand, g, memo=None):
        """The planner's score of candidates: discounted model rewards plus the discounted value of the last frame."""
        ret, tail, frames = self.imagine(s, prev_action, cand, g, memo)
        if self.cfg.value_iters == 0:                                         # no value function: rewards only
            return ret
        return ret + tail * self.read_last(frames, cand, memo)

    def plan_scores(self, obs, prev_action, cand, g, memo=None):
        """score() from raw observations: the last k frames of each world (N, k, S, S, 3) uint8. The decision's memo
        makes its imagination a search tree (--plan_batch tree); without it every candidate is rolled out in one
        batch (flat). Both score each candidate by the model's frames under its actions; they differ in the noise the
        frames start from (the tree draws one per action prefix, flat one per world). One decision on coin at 256
        candidates x horizon 8, untrained weights: 2-core CPU, not compiled, tree 260 ms, flat 2,220 ms; H200, bf16,
        tree 277 ms, flat 69 ms, flat compiled with CUDA graphs 22 ms (docs/gpu_h200.md)."""
        return self.score(to_float(obs, self.device), prev_action, cand, g, memo if self.tree else None)

    # --- the value, by TD in imagination
    def lookahead_actions(self, B):
        """The actions tried at each imagined step: every id (discrete), or random vectors and zero (continuous)."""
        if self.spec["discrete"]:
            return torch.arange(self.spec["n_actions"], device=self.device).expand(B, -1)
        a = random_actions(self.spec, (B, self.cfg.imagine_actions), self.g)
        a[:, 0] = 0
        return a

    def td_error(self, s, prev):
        """target - V(s) at states s (B, k, C, S, S) (V reads the last frame), the target a one-step greedy lookahead:
            target = max_a [ r_hat(s, a) + gamma alive(s, a) V'(s') ],   s' the model's next frame, V' the target net."""
        with torch.no_grad():
            a = self.lookahead_actions(len(s))                                 # (B, K[, A])
            ret, tail, frames = self.imagine(s, prev, a[:, :, None], self.g)   # one step per action
            target = (ret + tail * self.target(frames[:, -1]).view(ret.shape)).max(1).values
        return target - self.value(s[:, -1])

    @torch.no_grad()
    def walk(self, s, prev):
        """Each state s (B, k, C, S, S) walked d ~ U{0..D} random steps in the model (D = --imagine_horizon):
        the state reached (its last k frames) and the actions that led into them."""
        B, D, k = len(s), self.cfg.imagine_horizon, s.shape[1]
        if D == 0:
            return s, prev
        steps = random_actions(self.spec, (B, 1, D), self.g)                  # one random action sequence per state
        _, _, frames = self.imagine(s, prev, steps, self.g)                   # (B, D, C, S, S)
        d = torch.randint(0, D + 1, (B,), generator=self.g, device=self.device)
        window = d[:, None] + torch.arange(k, device=self.device)             # (B, k) positions in the walk
        rows = torch.arange(B, device=self.device)[:, None]
        return torch.cat([s, frames], 1)[rows, window], torch.cat([prev, steps[:, 0]], 1)[rows, window]

    def value_update(self, starts, states, prev_actions):
        """One TD update of V in imagination, from replay states j drawn by `starts` (Priorities).

        V is updated at the state each drawn j reaches by a random walk in the model (walk), towards td_error's
        target, weighted by j's importance weight: the planner reads V on the model's frames, so V is trained on
        them, not only on real ones (docs/mbrl_notes.md). j's priority becomes |TD error| at j itself, the real
        state it was drawn for."""
        idx, w = starts.sample(self.cfg.batch_size)
        s, prev = states[torch.from_numpy(idx)].to(self.device), prev_actions[torch.from_numpy(idx)].to(self.device)
        at_start = self.td_error(s, prev)
        td = self.td_error(*self.walk(s, prev)) if self.cfg.imagine_horizon else at_start
        loss = (torch.as_tensor(w, device=self.device) * td.pow(2)).mean()
        self.opt_v.zero_grad(set_to_none=True); loss.backward(); self.opt_v.step()
        starts.update(idx, at_start.detach().abs().cpu().numpy())
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target.parameters()), list(self.value.parameters()), 0.05)
        return loss.item()


STREAMS = ("model replay", "value starts", "loop", "random baseline")   # a seed's numpy draws, one stream each


def stream(seed, purpose):
    """The numpy generator of one purpose of a seed: the i-th child of SeedSequence(seed) (what .spawn() makes), so no
    two purposes draw the same numbers (each seeded with the seed alone, they would: one stream read in two places)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STREAMS.index(purpose),)))


class Priorities:
    """Sampling of replay states by priority: P(j) = p_j^a / sum p^a, importance weights (N P(j))^-b / max_k (N P(k))^-b,
    the max over every state (so a weight is the same whichever batch it is drawn in). New states enter with the
    largest priority so far, so each is drawn soon. a = 0 is uniform sampling. Draws come from `rng` (numpy)."""

    def __init__(self, alpha, beta, rng, eps=1e-2):
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.p = np.zeros(0)
        self.rng = rng

    def grow(self, n):
        top = self.p.max() if len(self.p) else 1.0
        self.p = np.concatenate([self.p, np.full(n, top)])

    def probs(self):
        q = self.p ** self.alpha
        return q / q.sum()

    def sample(self, k):
        P = self.probs()
        idx = self.rng.choice(len(P), k, p=P)
        w = (P[idx] / P.min()) ** -self.beta                                   # = (N P(j))^-b / max_k (N P(k))^-b
        return idx, w.astype(np.float32)

    def update(self, idx, td):
        self.p[idx] = np.abs(td) + self.eps

    def state(self):
        return dict(p=torch.from_numpy(self.p.copy()), rng=rng_state(self.rng))

    def load_state(self, state):
        self.p, self.rng = state["p"].numpy().copy(), numpy_rng(state["rng"])


def rng_state(rng):
    """A numpy generator's state as a string (a checkpoint holds no pickled objects), and back (numpy_rng)."""
    return json.dumps(rng.bit_generator.state)


def numpy_rng(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(state)
    return rng


class Progress:
    """What a run has done so far, in <out>/progress.pt: each finished seed's results, the first fit of the seed in
    progress, and the state after the last finished round of the kind in progress (agent, buffer, generators, curve).
    Written after the first fit and after every round, so a stopped run loses at most the fit or round it was in;
    --resume continues from it (the same draws as a run never stopped; with another --compile, up to float rounding);
    removed once results.json is written. A run resumes on the kind of device it ran on (generators, precision and the
    planner's batching differ by device)."""
    FREE = {"resume", "device", "compile", "out"}         # flags a resumed run may change (the device's kind is checked)

    def __init__(self, cfg, device, log=print):
        self.path, self.t0 = os.path.join(cfg.out, "progress.pt"), time.time()
        self.s = dict(format=CKPT_FORMAT, backbone=cfg.backbone, config=asdict(cfg), device=device.type, wall=0.0,
                      seeds={}, fitted=None, live=None)
        if os.path.exists(self.path + ".tmp"):            # a save the stop cut short (the file before it is whole)
            os.remove(self.path + ".tmp")
        if not os.path.exists(self.path):
            if cfg.resume:
                log(f"note: --resume found no {self.path}: starting the run from the beginning")
            return
        if not cfg.resume:
            raise UserError(f"{cfg.out} holds a stopped run ({self.path}): pass --resume to continue it, or another --out")
        try:
            prev = read_checkpoint(self.path)
        except UserError as e:
            raise UserError(f"{e}; delete it to start this run over") from None
        mine, theirs = asdict(cfg), prev["config"]
        if changed := [f"--{k} {mine[k]} (the run has {theirs[k]})" for k in mine if k in theirs and k not in self.FREE
                       and mine[k] != theirs[k]]:
            raise UserError(f"{self.path} was run with other flags: {', '.join(changed)}: pass the run's own, or another --out")
        if prev["device"] != device.type:
            raise UserError(f"{self.path} was run on {prev['device']}, and this run is on {device.type}: pass --device "
                            f"{prev['device']} (a run continues on the kind of device it started on)")
        self.s = dict(prev, config=mine)

    def wall(self):
        """Seconds of work in every process of this run so far."""
        return self.s["wall"] + time.time() - self.t0

    def save(self, **parts):
        self.s.update(parts, wall=self.wall())
        self.t0 = time.time()
        save_checkpoint(self.path, self.s)

    def done(self):
        os.remove(self.path)


# ----------------------------------------------------------------------------------------------
# acting in the real world

def merge(buffer, eps):
    if buffer is None:
        return eps
    return {k: np.concatenate([buffer[k], eps[k]]) for k in buffer}


def replay_states(buffer, k=1):
    """Every real frame of the buffer that starts a transition, with the k - 1 frames before it, as the value
    function's replay states (N, k, C, S, S), and the actions that led into them (N, k[, A]). Before an episode's
    first frame, the first frame repeats and the actions are zeros."""
    e, t = np.nonzero(np.arange(buffer["frames"].shape[1] - 1)[None] < (buffer["lengths"] - 1)[:, None])
    when = t[:, None] - k + 1 + np.arange(k)                                  # (N, k) the frames of each state
    a = buffer["actions"][e[:, None], np.maximum(when - 1, 0)]
    prev = np.where((when > 0).reshape(when.shape + (1,) * (a.ndim - 2)), a, 0)
    return to_float(buffer["frames"][e[:, None], np.maximum(when, 0)]), torch.from_numpy(prev)


def mpc_policy(world, plan_scores, spec, cfg, g, explore=0.0, rng=None):
    """A policy for play_episodes: CEM on plan_scores(the last k frames, the actions into them, cand, g), with
    probability `explore` a random action instead (drawn from the numpy rng). Before an episode has k frames the
    first one repeats. Returns the policy and the list its decision times go to."""
    cem, k = CEM(spec, world.num, cfg, g), cfg.context
    prev = torch.zeros((world.num, k) if spec["discrete"] else (world.num, k, spec["action_dim"]), device="cpu",
                       dtype=torch.long if spec["discrete"] else torch.float32)                  # as the world gives it
    seen, times = [], []

    def act(obs, t):
        nonlocal prev, seen
        seen = ([obs] * k if t == 0 else seen + [obs])[-k:]
        t0, memo = time.time(), {}                                            # what this decision has imagined
        a = cem.plan(lambda cand: plan_scores(np.stack(seen, 1), prev, cand, g, memo=memo)).cpu().numpy()
        times.append(time.time() - t0)
        if explore > 0:
            a = np.where((rng.random(world.num) < explore).reshape((-1,) + (1,) * (a.ndim - 1)), world.random_action(rng), a)
        prev = torch.cat([prev[:, 1:], torch.as_tensor(a, device="cpu")[:, None]], 1)
        return a
    return act, times


def episode_return(eps):
    return eps["rewards"].sum(1)


def run_seed(cfg, seed, kinds, spec, device, log, bar, progress):
    """One seed: random-action data and the first fit of the world model and reward head, shared by every kind of
    imagination (each continues from its own copy of the same fitted agent, so the comparison is paired). Each
    kind's world model is saved as <out>/world_model_<kind>_seed<seed>.pt (sample.py reads it). What `progress`
    holds of this seed is taken from it, not done again.
    Returns {kind: (curve [(real steps, mean eval return)], decision times, wall seconds)}."""
    t0, agent, fitted = time.time(), Agent(cfg, spec, device, seed), progress.s["fitted"]
    if fitted is not None and fitted["seed"] == seed:
        agent.load_state(fitted["agent"])
        buffer, rng, shared = arrays(fitted["buffer"]), numpy_rng(fitted["rng"]), fitted["wall"]
        log(f"[seed {seed}] resume: the first fit from {progress.path}")
    else:
        rng = stream(seed, "loop")
        uniform = DataConfig(env=cfg.env, size=agent.size, episode_len=cfg.episode_len, sticky=0, expert_p=0,
                             resample_still=0, frame_skip=cfg.frame_skip)
        log(f"[seed {seed}] playing {cfg.seed_episodes} random-action episodes of {cfg.env} ...")
        buffer = generate_episodes(uniform, cfg.seed_episodes, 2 * seed)   # random actions; (world 2s, actions 2s + 1:
                                                                            #  apart from every other seed's)
        if agent.kind == "ar" and not cfg.init_from:
            tl = agent.fit_tokenizer(buffer, cfg.tokenizer_iters, rng_seed=int(rng.integers(1 << 30)))
            log(f"[seed {seed}] tokenizer: {cfg.tokenizer_iters} iterations on single frames | loss {tl:.4f}")
        log(f"[seed {seed}] first fit: {cfg.fit_iters} iterations on {cfg.seed_episodes} random-action episodes ...")
        wl, rl = agent.fit(buffer, cfg.fit_iters, rng_seed=int(rng.integers(1 << 30)))
        shared = time.time() - t0
        log(f"[seed {seed}] first fit on {int((buffer['lengths'] - 1).sum())} random-action steps | "
            f"world-model loss {wl:.4f} | reward loss {rl:.4f} | {shared:.0f} s")
        progress.save(fitted=dict(seed=seed, agent=agent.state(), buffer=tensors(buffer), rng=rng_state(rng), wall=shared))
    if cfg.compile:
        log(f"[seed {seed}] the first decisions compile the world model for planning (--compile: about a minute on a "
            f"CPU, then faster decisions; --compile false skips it)")
    # the replay buffer is not kept: sample.py draws this model's contexts from a small generated corpus (n_labelled)
    desc = dict(config=asdict(cfg), data=asdict(DataConfig(env=cfg.env, size=agent.size, episode_len=cfg.episode_len,
                                                         frame_skip=cfg.frame_skip, n_labelled=256)))
    out = progress.s["seeds"].setdefault(seed, {})                          # kinds finished before a stop
    bar.update(sum(k in out for k in kinds) * (cfg.rounds + 1))
    for kind in (k for k in kinds if k not in out):
        live = progress.s["live"]
        live = live if live is not None and (live["seed"], live["kind"]) == (seed, kind) else None
        twin = agent.clone()
        curve, times, wall = online(cfg, seed, kind, twin, buffer, copy.deepcopy(rng), spec, log, bar, progress, live)
        save_checkpoint(os.path.join(cfg.out, f"world_model_{kind}_seed{seed}.pt"), twin.checkpoint(desc))
        out[kind] = (curve, times, shared + wall)
        progress.save(live=None)
    return out


def tensors(buffer):
    return {k: torch.from_numpy(v) for k, v in buffer.items()}


def arrays(buffer):
    return {k: v.numpy() for k, v in buffer.items()}


def online(cfg, seed, kind, agent, buffer, rng, spec, log, bar, progress=None, live=None):
    """From a fitted agent: train the value by TD in imagination (start states by `kind`), then --rounds of
    (evaluate, every --eval_every rounds) -> act with MPC in the real world -> add the data -> update; a last evaluation.
    Acting draws from agent.g and rng; each evaluation from generators of its own, so it changes nothing. After each
    round, everything it changed goes to `progress`; `live` (from a stopped run) is where it continues from.
    -> curve, decision times, wall seconds."""
    steps = int((buffer["lengths"] - 1).sum())
    starts = Priorities(cfg.alpha if kind == "prioritized" else 0.0, cfg.beta, stream(seed, "value starts"))
    curve, dec_times, first, t0, fitted = [], [], 0, time.time(), len(buffer["frames"])
    played = lambda: {k: v[fitted:] for k, v in buffer.items()}          # the episodes since the first fit

    def evaluate():
        w = cfg.world(agent.size, cfg.eval_episodes, seed=10_000 + seed)
        act, times = mpc_policy(w, agent.plan_scores, spec, cfg, make_generator(agent.device, 10_000 + seed))
        R = float(episode_return(play_episodes(w, act, cfg.episode_len)).mean())
        dec_times.extend(times)
        curve.append((steps, R))
        log(f"[{kind} seed {seed}] real steps {steps:6d} | eval return {R:8.3f} | decision {1000 * np.median(times):.0f} "
            f"ms (median) for {cfg.eval_episodes} world{'s' * (cfg.eval_episodes > 1)} x {cfg.candidates} candidates")

    def learn(iters):
        msg = ""
        if iters:
            wl, rl = agent.fit(buffer, iters, rng_seed=int(rng.integers(1 << 30)))
            msg = f"world-model loss {wl:.4f} | reward loss {rl:.4f} | "
        states, prev = replay_states(buffer, cfg.context)
        starts.grow(len(states) - len(starts.p))
        vl = [agent.value_update(starts, states, prev) for _ in range(cfg.value_iters)]
        log(f"[{kind} seed {seed}] {msg}{f'value TD loss {np.mean(vl):.4f}' if vl else 'no value'} | {len(states)} replay states")
        bar.update(1)

    def save(r):
        if progress is not None:
            progress.save(live=dict(seed=seed, kind=kind, round=r, agent=agent.state(), played=tensors(played()),
                                    rng=rng_state(rng), starts=starts.state(), curve=curve, times=dec_times, steps=steps,
                                    wall=prior + time.time() - t0))

    if live is None:
        prior = 0.0
        learn(0)
        save(0)
    else:                                                                   # a stopped run, after its round `first`
        agent.load_state(live["agent"]); starts.load_state(live["starts"])
        buffer, rng, steps, first, prior = (merge(buffer, arrays(live["played"])), numpy_rng(live["rng"]), live["steps"],
                                            live["round"], live["wall"])
        curve, dec_times = [tuple(c) for c in live["curve"]], list(live["times"])
        bar.update(first + 1)
        log(f"[{kind} seed {seed}] resume: after round {first} of {cfg.rounds}, from {progress.path}")
    for r in range(first, cfg.rounds):
        if r % cfg.eval_every == 0:
            evaluate()
        w = cfg.world(agent.size, cfg.episodes, seed=int(rng.integers(1 << 30)))
        act, _ = mpc_policy(w, agent.plan_scores, spec, cfg, agent.g, cfg.explore, rng)
        eps = play_episodes(w, act, cfg.episode_len)
        buffer = merge(buffer, eps)
        steps += int((eps["lengths"] - 1).sum())
        learn(cfg.update_iters)
        save(r + 1)
    evaluate()
    return curve, dec_times, prior + time.time() - t0


def baselines(cfg, seed, spec, size):
    """Random actions and the planner in the true simulator (where its state can be restored; else NaN), on the
    evaluation episodes of this seed."""
    rng = stream(seed, "random baseline")
    w = cfg.world(size, cfg.eval_episodes, seed=10_000 + seed)
    R_rand = float(episode_return(play_episodes(w, lambda o, t: w.random_action(rng), cfg.episode_len)).mean())
    w = cfg.world(size, cfg.eval_episodes, seed=10_000 + seed)
    if not w.restorable:                                  # no state to plan in: random actions are the only baseline
        return R_rand, float("nan"), float("nan")
    sim = cfg.world(size, cfg.eval_episodes)
    act, times = mpc_policy(w, lambda obs, prev, cand, g, memo: true_scores_of(w, sim, cand, cfg.gamma), spec, cfg,
                            make_generator("cpu", seed))
    R_orc = float(episode_return(play_episodes(w, act, cfg.episode_len)).mean())
    return R_rand, R_orc, float(np.median(times))


def true_scores_of(world, sim, cand, gamma):
    sim.set_state(world.get_state())
    return true_scores(sim, cand, gamma)


# ----------------------------------------------------------------------------------------------
# results

def plot(path, results, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = iter(["tab:blue", "tab:orange"])
    for name, m in results["methods"].items():
        if "curves" in m:
            x = np.array(m["env_steps"]).mean(0)
            y = np.array(m["curves"])
            c = next(colors)
            ax.plot(x, y.mean(0), "o-", color=c, label=f"MPC in the learned model, {name.rsplit('_', 1)[1]} imagination "
                                                       f"(mean of {len(y)} seed{'s' * (len(y) > 1)})")
            ax.fill_between(x, y.min(0), y.max(0), color=c, alpha=0.2)
    for name, style, what in (("oracle_mpc", "--", "MPC in the true simulator"), ("random", ":", "random actions")):
        v = np.array(results["methods"][name]["final"])
        ax.axhline(v.mean(), linestyle=style, color="k", label=f"{what} ({v.mean():.2f})")
    ax.set_xlabel("real environment steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"{env}: MPC in the learned simulator (band: min to max over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    return parse_config(MBRLConfig, __doc__, argv)


def bench(cfg, spec, device, why, log):
    """The time of one MPC decision for one world in the learned simulator (untrained weights: the cost does not
    depend on them); the first decision (warm-up) is not counted."""
    agent = Agent(cfg, spec, device, seed=0)
    w = cfg.world(agent.size, 1)
    obs, _ = w.reset()
    act, times = mpc_policy(w, agent.plan_scores, spec, cfg, agent.g)
    for t in tqdm(range(cfg.bench + 1), desc="decisions", disable=None, leave=False):
        act(obs, t)                                                           # scores come back to the CPU: synced
    log(f"one MPC decision in {cfg.env}, {cfg.candidates} candidates x horizon {cfg.horizon} x {cfg.cem_iters} CEM iterations: "
        f"{1000 * np.median(times[1:]):.1f} ms (median of {cfg.bench}) on {why}")


def normalized(R, R_random, R_oracle):
    """(R - R_random) / (R_oracle - R_random), on means over seeds; None (JSON null) where the true simulator's
    planner scores no better than random or could not run: no scale to normalise by (below random, a model that
    did worse than random would read as a positive score)."""
    ok = np.isfinite(R_oracle) and R_oracle > R_random                   # (NaN: no simulator to restore)
    return float((R - R_random) / (R_oracle - R_random)) if ok else None


def main(cfg):
    world = make_env(cfg.env, frame_skip=cfg.frame_skip)           # (a bad name or --frame_skip: refused here)
    if cfg.backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{cfg.backbone}': choose one of {', '.join(BACKBONES)}")
    kinds = {"prioritized": ["prioritized"], "uniform": ["uniform"], "both": ["prioritized", "uniform"]}
    if cfg.imagination not in kinds:
        raise UserError(f"unknown --imagination '{cfg.imagination}': choose prioritized, uniform or both")
    if cfg.bench:                                                         # a timing: nothing is trained or written
        device, _, why = pick_device(cfg.device)
        return bench(cfg, world.spec, device, why, tqdm.write)
    check_folder(cfg.out, "--out", "results.json, curves.png and the log")
    if os.path.exists(os.path.join(cfg.out, "results.json")):
        raise UserError(f"{cfg.out} already holds a finished run (results.json)" + (": there is nothing to resume" if
                        cfg.resume else "") + ": pass another --out or delete it")
    device, _, why = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    spec = world.spec
    logf = open(os.path.join(cfg.out, "mbrl.log"), "a")

    def log(msg, echo=True):
        if echo:                                      # (a stop's message reaches the terminal once, on exit)
            tqdm.write(msg)
        logf.write(msg + "\n"); logf.flush()
    with claimed(cfg.out):                                                # one run writes to a folder at a time
        return study(cfg, spec, device, why, log, kinds[cfg.imagination])


def study(cfg, spec, device, why, log, kinds):
    """Every seed's learned-model runs (one per imagination kind) and baselines -> results.json, curves.png."""
    seeds, progress = range(cfg.first_seed, cfg.first_seed + cfg.seeds), Progress(cfg, torch.device(device), log)
    start = f"--init_from {cfg.init_from}" if cfg.init_from else f"a new {cfg.backbone}"
    log(f"device: {why} | world '{cfg.env}' at {cfg.size}x{cfg.size} px | world model: {start} | imagination "
        f"{cfg.imagination} | seeds {seeds[0]}..{seeds[-1]} | out {cfg.out}")
    methods = {f"model_mpc_{k}": dict(env_steps=[], curves=[], final=[], wall_s=[]) for k in kinds}
    base = dict(random=dict(final=[]), oracle_mpc=dict(final=[], decision_ms=[]))
    bar = tqdm(total=cfg.seeds * len(kinds) * (cfg.rounds + 1), desc="fits", disable=None, dynamic_ncols=True)
    dec = []
    try:                                                                  # (a kill is a KeyboardInterrupt too: run_cli)
        for seed in seeds:
            done = progress.s["seeds"].get(seed, {})
            if "baselines" in done:
                bar.update(len(kinds) * (cfg.rounds + 1))
                log(f"[seed {seed}] resume: finished before the stop, its results from {progress.path}")
            else:
                run_seed(cfg, seed, kinds, spec, device, log, bar, progress)
                done = progress.s["seeds"][seed]
                done["baselines"] = baselines(cfg, seed, spec, cfg.size)
                progress.save(fitted=None)
            for kind in kinds:
                curve, times, wall = done[kind]
                m = methods[f"model_mpc_{kind}"]
                m["env_steps"].append([c[0] for c in curve]); m["curves"].append([c[1] for c in curve])
                m["final"].append(curve[-1][1]); m["wall_s"].append(round(wall, 1))
                dec.extend(times)
            R_rand, R_orc, t_orc = done["baselines"]
            base["random"]["final"].append(R_rand); base["oracle_mpc"]["final"].append(R_orc)
            base["oracle_mpc"]["decision_ms"].append(round(1000 * t_orc, 1))
            log(f"[seed {seed}] random {R_rand:.3f} | MPC in the true simulator {R_orc:.3f}")
    except KeyboardInterrupt as e:
        msg = (f"{progress.path} holds the work up to the last finished fit or round. Continue with: "
               f"{resume_command(SimpleNamespace(world=1))}" if os.path.exists(progress.path) else
               "in the first fit, before anything was saved: the same command starts the run again")
        log(f"stopped: {msg}", echo=False)
        raise Stopped(msg, 128 + getattr(e, "signum", signal.SIGINT)) from None
    bar.close()
    R_rand, R_orc = np.mean(base["random"]["final"]), np.mean(base["oracle_mpc"]["final"])
    for m in methods.values():
        m["normalized"] = normalized(np.mean(m["final"]), R_rand, R_orc)
    first = next(iter(methods.values()))
    results = dict(normalized=first["normalized"], env=cfg.env, imagination=cfg.imagination, seeds=list(seeds),
                   methods={**methods, **base}, decision_ms=round(1000 * float(np.median(dec)), 1),
                   decision_note=f"the median MPC decision (the first ones compile: --compile) for {cfg.eval_episodes} "
                                 f"worlds at once, {cfg.candidates} candidates "
                                 f"x {cfg.cem_iters} CEM iterations, horizon {cfg.horizon}, on {why}",
                   wall_s=round(progress.wall(), 1), device=why, config=asdict(cfg))
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    progress.done()
    plot(os.path.join(cfg.out, "curves.png"), results, cfg.env)
    for name, m in methods.items():
        norm = "n/a (the true simulator's planner scored the same as random)" if m["normalized"] is None else \
            f"{m['normalized']:.3f}"
        log(f"{name}: final return {np.mean(m['final']):.3f} | normalized {norm} "
            f"(random {R_rand:.3f}, MPC in the true simulator {R_orc:.3f})")
    log(f"wrote {cfg.out}/results.json and {cfg.out}/curves.png in {results['wall_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
