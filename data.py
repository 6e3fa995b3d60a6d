"""data.py — the built-in worlds, the corpora of episodes they produce, and a clip sampler.

Two small worlds stand in for the paper's benchmarks (method.md §4):

    coin    discrete actions (5)    in the spirit of Procgen CoinRun: steer the agent onto the coin
    pusher  continuous actions (2)  in the spirit of BAIR robot pushing: push the block onto the goal

Both are written in numpy, step N worlds at once, are seeded and deterministic, and render
uint8 RGB frames at any size. The controlled object (the agent / the pusher) is drawn in a
colour that nothing else uses, so `locate_agent` can read its position off any frame, real or
generated: that is how the evaluation measures control.

Data layout of one episode (E episodes, L steps, frames of S x S pixels):

    frames[e, t]   t = 0..L      uint8 (S, S, 3)   what the agent saw before acting at step t
    actions[e, t]  t = 0..L-1    the action taken at frame t; it leads to frame t+1
    rewards[e, t]  t = 0..L-1    the reward of that transition
    lengths[e]                   number of valid frames (an episode that ends early is padded)

Two corpora per world (method.md "the story"): a larger action-free one (videos only, for
pre-training) and a smaller action-labelled one (for fine-tuning the adapter), each with a
held-out split. They are cached as compressed .npz shards and rebuilt when the config that
made them changes.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np


class UserError(Exception):
    """A mistake in what the user asked for. Scripts print it as one line and exit with code 2."""


class Stopped(Exception):
    """A run stopped by a signal after saving its work; the message says how to resume. Exit code 128 + signal."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# worlds

AGENT_RGB = np.array([235, 50, 50], np.uint8)   # reserved for the controlled object, in every world


class World:
    """N copies of one world stepped at once, with a gymnasium-style interface.

    Positions are object centres in [0, 1]^2 (x right, y down); sizes are fractions of the frame,
    so the same world renders at any resolution. Subclasses define the objects and the rules.
    """
    name = ""
    discrete = True
    n_actions = 0        # discrete worlds: actions are ints in [0, n_actions); 0 is "do nothing"
    action_dim = 0       # continuous worlds: actions are float vectors in [-1, 1]^action_dim
    agent_size = 0.2

    def __init__(self, num=1, size=32, max_steps=32, seed=0):
        if size < 16 or size % 8:
            raise UserError(f"frame size {size} is not supported: use a multiple of 8, at least 16 (32 or 64)")
        self.num, self.size, self.max_steps = num, size, max_steps
        self.rng = np.random.default_rng(seed)
        self.state = None

    # --- the gymnasium-style interface
    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.state = self._new_state(self.num)
        return self.render(), {}

    def step(self, action):
        action = self.check_actions(np.asarray(action), (self.num,))
        reward, terminated = self._step(action)
        self.state["t"] = self.state["t"] + 1
        truncated = self.state["t"] >= self.max_steps
        return self.render(), reward.astype(np.float32), terminated, truncated, {}

    def get_state(self):
        s = {k: v.copy() for k, v in self.state.items()}
        s["rng"] = json.loads(json.dumps(self.rng.bit_generator.state))
        return s

    def set_state(self, state):
        state = dict(state)
        self.rng.bit_generator.state = state.pop("rng")
        self.state = {k: v.copy() for k, v in state.items()}
        self.num = len(self.state["t"])

    def check_actions(self, a, batch_shape):
        """Validate a batch of actions; a mistake is a UserError that says what shape was expected."""
        want = batch_shape if self.discrete else batch_shape + (self.action_dim,)
        if tuple(a.shape) != tuple(want):
            kind = f"ints in [0, {self.n_actions})" if self.discrete else f"floats of size {self.action_dim}"
            raise UserError(f"world '{self.name}' takes actions of shape {tuple(want)} ({kind}); got shape {tuple(a.shape)}")
        if self.discrete:
            if np.any((a < 0) | (a >= self.n_actions)) or (a.dtype.kind == "f" and np.any(a != np.round(a))):
                raise UserError(f"world '{self.name}' takes action ids in [0, {self.n_actions}); got {a.ravel()[:8]}")
            return a.astype(np.int64)
        return np.clip(a.astype(np.float32), -1, 1)

    # --- drawing
    def _background(self, n):
        """A static dark backdrop with a few muted tiles, different in each episode."""
        s = self.size
        bg = np.empty((n, s, s, 3), np.uint8)
        bg[:] = (22, 22, 32)
        for _ in range(4):
            lo = self.rng.uniform(0, 0.7, (n, 2)); hi = lo + self.rng.uniform(0.15, 0.35, (n, 2))
            col = self.rng.integers(40, 95, (n, 1, 1, 3)).astype(np.uint8)
            self._paint(bg, (lo + hi) / 2, hi - lo, col)
        return bg

    def _coverage(self, centre, extent):
        """(N, S, S) float: the fraction of each pixel's area inside axis-aligned boxes (centre, extent): (N, 2).
        Edges are anti-aliased, so a frame fixes an object's position to a fraction of a pixel: a world whose
        objects move by less than a pixel stays a function of its frames (and so learnable from them)."""
        lo, hi = (centre - extent / 2) * self.size, (centre + extent / 2) * self.size      # (N, 2) in pixels
        px = np.arange(self.size)
        cov = np.clip(np.minimum(hi[..., None], px + 1) - np.maximum(lo[..., None], px), 0, 1)   # (N, 2, S): x per column, y per row
        return cov[:, 1, :, None] * cov[:, 0, None, :]

    def _paint(self, img, centre, extent, rgb):
        """Draw boxes over img (N, S, S, 3) uint8 in place, blending each pixel by its coverage."""
        a = self._coverage(centre, np.broadcast_to(np.asarray(extent, float), centre.shape))[..., None]
        img[:] = np.rint(img * (1 - a) + np.asarray(rgb, float) * a).astype(np.uint8)

    # --- subclasses
    def _new_state(self, n): raise NotImplementedError
    def _step(self, a): raise NotImplementedError
    def render(self): raise NotImplementedError
    def expert_action(self): raise NotImplementedError

    def random_action(self, rng):
        if self.discrete:
            return rng.integers(0, self.n_actions, self.num)
        return rng.uniform(-1, 1, (self.num, self.action_dim)).astype(np.float32)

    def _place(self, n, size):
        return self.rng.uniform(size / 2, 1 - size / 2, (n, 2))


class Coin(World):
    """Discrete game: the red agent moves one step up/down/left/right (or stays); touching the
    yellow coin gives reward 1 and the coin reappears elsewhere. Actions: 0 stay, 1 up, 2 down,
    3 left, 4 right. The episode ends after max_steps."""
    name, discrete, n_actions = "coin", True, 5
    agent_size, coin_size, speed = 0.2, 0.16, 0.1
    moves = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], float)

    def _new_state(self, n):
        return dict(agent=self._place(n, self.agent_size), coin=self._place(n, self.coin_size),
                    bg=self._background(n), t=np.zeros(n, np.int64))

    def _step(self, a):
        s, half = self.state, self.agent_size / 2
        s["agent"] = np.clip(s["agent"] + self.moves[a] * self.speed, half, 1 - half)
        hit = np.all(np.abs(s["agent"] - s["coin"]) < (self.agent_size + self.coin_size) / 2, axis=1)
        if hit.any():
            s["coin"][hit] = self._place(int(hit.sum()), self.coin_size)
        return hit.astype(np.float32), np.zeros(len(a), bool)

    def render(self):
        s = self.state
        img = s["bg"].copy()
        self._paint(img, s["coin"], self.coin_size, (245, 205, 40))
        self._paint(img, s["agent"], self.agent_size, AGENT_RGB)
        return img

    def expert_action(self):
        d = self.state["coin"] - self.state["agent"]
        horiz = np.abs(d[:, 0]) >= np.abs(d[:, 1])
        return np.where(horiz, np.where(d[:, 0] > 0, 4, 3), np.where(d[:, 1] > 0, 2, 1))


class Pusher(World):
    """Continuous robot: the red pusher moves by speed * action (action in [-1, 1]^2) and pushes the
    blue block out of its way; the goal is to bring the block onto the green goal pad.
    Reward per step: -|block - goal| - 0.2 |pusher - block|. The episode ends (terminated) when
    the block is within 0.05 of the goal, or after max_steps."""
    name, discrete, action_dim = "pusher", False, 2
    agent_size, block_size, goal_size, speed = 0.18, 0.22, 0.26, 0.1

    def _new_state(self, n):
        return dict(agent=self._place(n, self.agent_size), block=self._place(n, 0.5),
                    goal=self._place(n, self.goal_size), bg=self._background(n), t=np.zeros(n, np.int64))

    def _step(self, a):
        s = self.state
        lo, hi = self.agent_size / 2, 1 - self.agent_size / 2
        new = np.clip(s["agent"] + a * self.speed, lo, hi)
        # push the block out along the axis of least penetration; if a wall stops it, the pusher stops too
        reach = (self.agent_size + self.block_size) / 2
        gap = new - s["block"]
        pen = reach - np.abs(gap)                                          # (N, 2) > 0 on both axes = overlap
        touch = np.all(pen > 0, axis=1)
        axis = np.argmin(pen, axis=1)
        push = np.zeros_like(new)
        push[np.arange(len(new)), axis] = -np.sign(gap[np.arange(len(new)), axis]) * pen[np.arange(len(new)), axis]
        push *= touch[:, None]
        moved = s["block"] + push
        b = self.block_size / 2
        clipped = np.clip(moved, b, 1 - b)
        s["agent"] = new - (moved - clipped)                               # blocked by a wall: back off
        s["block"] = clipped
        d_goal = np.linalg.norm(s["block"] - s["goal"], axis=1)
        reward = -d_goal - 0.2 * np.linalg.norm(s["agent"] - s["block"], axis=1)
        return reward, d_goal < 0.05

    def render(self):
        s = self.state
        img = s["bg"].copy()
        self._paint(img, s["goal"], self.goal_size, (60, 200, 90))
        self._paint(img, s["block"], self.block_size, (60, 110, 235))
        self._paint(img, s["agent"], self.agent_size, AGENT_RGB)
        return img

    def expert_action(self):
        """Go behind the block (on the side away from the goal), then push it towards the goal."""
        s = self.state
        to_goal = s["goal"] - s["block"]
        dirn = to_goal / (np.linalg.norm(to_goal, axis=1, keepdims=True) + 1e-6)
        behind = s["block"] - dirn * (self.agent_size + self.block_size) / 2
        go = np.where(np.linalg.norm(behind - s["agent"], axis=1, keepdims=True) > 0.06,
                      behind - s["agent"], dirn * self.speed)
        return np.clip(go / self.speed, -1, 1).astype(np.float32)


WORLDS = {w.name: w for w in (Coin, Pusher)}


def make_world(name, **kw):
    if name not in WORLDS:
        raise UserError(f"unknown world '{name}': choose one of {', '.join(WORLDS)} (python data.py --list)")
    return WORLDS[name](**kw)


def locate_agent(frames, agent_size):
    """Read the controlled object's centre off frames (..., S, S, 3) uint8, real or generated.

    Returns pos (..., 2) in pixels (x, y) and found (...) bool. A frame counts as "found" only if
    enough pixels are near the reserved colour (a third of the object's area): a blurred-away or
    missing object is reported as not found, never read as position (0, 0)."""
    s = frames.shape[-2]
    near = np.linalg.norm(frames.astype(np.float32) - AGENT_RGB, axis=-1) < 90     # (..., S, S)
    count = near.sum((-1, -2))
    found = count >= (agent_size * s) ** 2 / 3
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    n = np.maximum(count, 1)
    pos = np.stack([(near * xs).sum((-1, -2)) / n, (near * ys).sum((-1, -2)) / n], -1)
    return pos, found


# ----------------------------------------------------------------------------------------------
# corpora

DATA_VERSION = 3            # 3: anti-aliased edges


@dataclass
class DataConfig:
    env: str = "coin"
    size: int = 32            # frames are size x size pixels
    episode_len: int = 32     # steps per episode (frames = steps + 1)
    n_free: int = 1024        # episodes in the action-free (pre-training) corpus
    n_labelled: int = 1536    # episodes in the action-labelled (fine-tuning) corpus
    heldout: float = 0.1      # fraction of each corpus held out for evaluation
    expert_p: float = 0.3     # behaviour policy: scripted expert with this probability...
    sticky: float = 0.75      # ...else a random action, repeated with this probability
    resample_still: float = 0.8   # an action that would not move the agent is redrawn with this probability
    seed: int = 0
    data_dir: str = "data_cache"


def play_episodes(world, policy, steps):
    """Play world.num episodes at once with policy(obs (N, S, S, 3) uint8, t) -> actions, for `steps` steps
    or until each terminates. Returns the episode layout every corpus uses:
        frames (N, steps+1, S, S, 3) uint8  frame t+1 follows actions[t]; after the end, the last frame repeats
        actions (N, steps[, A]), rewards (N, steps), ends (N, steps) bool, lengths (N,) frames up to the end."""
    obs, _ = world.reset()
    n = world.num
    frames = np.zeros((n, steps + 1) + obs.shape[1:], np.uint8)
    actions = np.zeros((n, steps) if world.discrete else (n, steps, world.action_dim),
                       np.int64 if world.discrete else np.float32)
    rewards = np.zeros((n, steps), np.float32)
    ends = np.zeros((n, steps), bool)
    lengths = np.full(n, steps + 1, np.int64)
    alive = np.ones(n, bool)
    frames[:, 0] = obs
    for t in range(steps):
        a = policy(obs, t)
        obs, r, term, _, _ = world.step(a)
        frames[:, t + 1] = np.where(alive[:, None, None, None], obs, frames[:, t])
        actions[:, t], rewards[:, t], ends[:, t] = a, r * alive, term & alive
        lengths[alive & term] = t + 2
        alive &= ~term
    return dict(frames=frames, actions=actions, rewards=rewards, ends=ends, lengths=lengths)


def generate_episodes(cfg, n, seed):
    """Roll n episodes of the behaviour policy (noisy expert mixed with sticky random actions)."""
    world = make_world(cfg.env, num=n, size=cfg.size, max_steps=cfg.episode_len, seed=seed)
    rng = np.random.default_rng(seed + 1)          # the policy's own randomness, apart from the world's
    prev = [None]

    def behaviour(obs, t):
        if prev[0] is None:
            prev[0] = world.random_action(rng)
        rand = _where(rng.random(n) < cfg.sticky, prev[0], world.random_action(rng))
        exp = world.expert_action()
        if not world.discrete:
            exp = np.clip(exp + rng.normal(0, 0.3, exp.shape), -1, 1).astype(np.float32)
        a = _where(rng.random(n) < cfg.expert_p, exp, rand)
        for _ in range(3):                       # an action that leaves the agent in place (pressing into a wall,
            redo = (_moves(world, a) < 0.3 * world.speed) & (rng.random(n) < cfg.resample_still)  # doing nothing)
            if not redo.any():                   # shows nothing of what actions do: resample most of them
                break
            a = _where(redo, world.random_action(rng), a)
        prev[0] = rand
        return a
    return play_episodes(world, behaviour, cfg.episode_len)


def _moves(world, a):
    """How far the agent would move under actions a, probed on a copy of the state (the world is left as it was)."""
    saved = world.get_state()
    before = world.state["agent"].copy()
    world.step(a)
    dist = np.linalg.norm(world.state["agent"] - before, axis=1)
    world.set_state(saved)
    return dist


def _where(mask, a, b):
    """Per-world choice between two batches of actions, discrete (N,) or continuous (N, A)."""
    return np.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


class Corpus:
    """Episodes in memory, split into train / held-out by episode."""

    def __init__(self, arrays, heldout):
        n = len(arrays["frames"])
        n_held = max(1, int(round(n * heldout)))
        self.train = {k: v[:-n_held] for k, v in arrays.items()}
        self.test = {k: v[-n_held:] for k, v in arrays.items()}


def load_corpus(cfg, labelled, progress=True):
    """Build (or load from the cache) one corpus: 'labelled' keeps the actions, else videos only."""
    n = cfg.n_labelled if labelled else cfg.n_free
    seed = cfg.seed * 1000 + (1 if labelled else 2)
    key = dict(asdict(cfg), data_dir=None, kind="labelled" if labelled else "free", version=DATA_VERSION)
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cfg.data_dir, f"{cfg.env}-{key['kind']}-{cfg.size}px-{tag}")
    if not os.path.exists(os.path.join(path, "meta.json")):
        if progress:
            print(f"generating the {key['kind']} corpus of '{cfg.env}' ({n} episodes) into {path}")
        tmp = path + f".tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        shard = 256
        for i in range(0, n, shard):
            ep = generate_episodes(cfg, min(shard, n - i), seed + i)
            if not labelled:
                ep = {k: ep[k] for k in ("frames", "lengths")}
            np.savez_compressed(os.path.join(tmp, f"shard_{i // shard:03d}.npz"), **ep)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(key, f, indent=1)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    parts = [dict(np.load(os.path.join(path, f))) for f in shards]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Corpus(arrays, cfg.heldout)


class ClipSampler:
    """Random clips of T consecutive frames from a split, as float tensors in [-1, 1].

    A clip starting at step s holds frames s..s+T-1 and, when the corpus has actions, the action
    that *led into* each frame: clip_actions[i] = actions[s + i - 1] (so s >= 1). Its generator
    state is part of a checkpoint, so a resumed run does not replay the same batches."""

    def __init__(self, split, clip_len, seed=0):
        self.split, self.T = split, clip_len
        self.rng = np.random.default_rng(seed)
        self.max_start = split["lengths"] - clip_len     # starts are 1..max_start inclusive
        self.ok = np.flatnonzero(self.max_start >= 1)
        if len(self.ok) == 0:
            raise UserError(f"no episode is long enough for clips of {clip_len} frames: lower --clip_len")

    def sample(self, batch):
        e = self.rng.choice(self.ok, batch)
        s = self.rng.integers(1, self.max_start[e] + 1)
        return self.clips(e, s)

    def every_clip(self):
        """(episodes, starts) of every clip, episode by episode: appending episodes appends clips."""
        n = self.max_start[self.ok]
        e = np.repeat(self.ok, n)
        return e, np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n) + 1

    def clips(self, e, s):
        import torch
        idx = s[:, None] + np.arange(self.T)                                 # (B, T)
        frames = self.split["frames"][e[:, None], idx]                      # (B, T, S, S, 3) uint8
        out = dict(frames=to_float(frames))                                  # (B, T, 3, S, S)
        if "actions" in self.split:
            out["actions"] = torch.from_numpy(self.split["actions"][e[:, None], idx - 1])
            out["rewards"] = torch.from_numpy(self.split["rewards"][e[:, None], idx - 1])
            out["ends"] = torch.from_numpy(self.split["ends"][e[:, None], idx - 1])
        return out


def spread_clips(lengths, length, n):
    """n deterministic clips of `length` frames (episodes, starts), spread over every episode: the j-th clip comes
    from episode floor(j E / n) when n <= E (so the picks span the first to the last episode), from episode j mod E
    when n > E; successive visits to an episode take its successive non-overlapping windows. Capped at the number
    of distinct windows."""
    windows = [np.arange(1, L - length + 1, length) for L in lengths]           # starts of non-overlapping windows
    ok = np.array([i for i, w in enumerate(windows) if len(w)])
    if len(ok) == 0:
        raise UserError(f"no held-out episode is long enough for clips of {length} frames: lower --horizon")
    n, E = min(n, sum(len(w) for w in windows)), len(ok)
    j = np.arange(n)
    rank, visit = ((j * E) // n, j) if n <= E else (j % E, j // E)
    e = ok[rank]
    return e, np.array([windows[i][v % len(windows[i])] for i, v in zip(e, visit)])


def to_float(frames, device="cpu"):
    """(..., S, S, 3) uint8 numpy -> (..., 3, S, S) float tensor in [-1, 1]: the inverse of to_uint8."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x):
    """(..., 3, S, S) float in [-1, 1] -> (..., S, S, 3) uint8 numpy."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return np.moveaxis(x, -3, -1)


# ----------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description="The built-in worlds. --list prints their names; "
                                "--preview FILE.gif rolls the behaviour policy in one of them.")
    p.add_argument("--list", action="store_true", help="print the built-in worlds, one per line")
    p.add_argument("--env", default="coin")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--preview", default="", help="write a GIF of a few episodes of the behaviour policy")
    a = p.parse_args()
    if a.list:
        print("\n".join(WORLDS))
        return
    ep = generate_episodes(DataConfig(env=make_world(a.env).name, size=a.size), 4, seed=0)
    if a.preview:
        from PIL import Image
        fr = np.concatenate(list(ep["frames"]), axis=2)                    # (L+1, S, 4S, 3)
        imgs = [Image.fromarray(f).resize((f.shape[1] * 4, f.shape[0] * 4), Image.NEAREST) for f in fr]
        imgs[0].save(a.preview, save_all=True, append_images=imgs[1:], duration=120, loop=0)
        print(f"wrote {a.preview}")
    print(f"{a.env}: frames {ep['frames'].shape}, mean reward per step {ep['rewards'].mean():.3f}")


if __name__ == "__main__":
    run_cli(main)
