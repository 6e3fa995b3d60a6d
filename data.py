"""data.py — corpora of episodes from any environment (envs.py), on disk and in memory, and a clip sampler.

Data layout of one episode (E episodes, L steps, frames of S x S pixels):

    frames[e, t]   t = 0..L      uint8 (S, S, 3)   what the agent saw before acting at step t
    actions[e, t]  t = 0..L-1    the action taken at frame t; it leads to frame t+1
    rewards[e, t]  t = 0..L-1    the reward of that transition
    ends[e, t]     t = 0..L-1    the episode ended with that transition
    lengths[e]                   number of valid frames (an episode that ends early is padded)

Two corpora per environment (the paper's recipe): a larger action-free one (videos only, for pre-training) and a
smaller action-labelled one (for fine-tuning the adapter), each with a held-out split. Generated corpora are cached
(train.py --data_dir) and rebuilt when the config that made them changes.

The episode format on disk (what the cache holds, what `python data.py --record` writes, what `train.py --data`
and `--pretrain_data` read): a folder of compressed numpy shards, each holding some episodes, and a meta.json:

    shard_000.npz    frames   uint8 (E, L+1, S, S, 3)   required (one episode alone may be (L+1, S, S, 3))
                     lengths  int (E,)                  valid frames per episode; default: all L+1
                     actions  int (E, L) ids, or float (E, L, A) in [-1, 1]     labelled folders only
                     rewards  float (E, L), ends bool (E, L), finite            optional (default 0 and False)
    meta.json        {"format": "nanoworld-episodes-1", "env": "gym:ALE/Breakout-v5" or null, "size": S,
                      "spec": {"discrete": true, "n_actions": 4, "action_dim": 0},     (needed for actions;
                      the spec may add "keys": {"left": 3, ...}, play's key names -> actions)
                      "episodes": E, "frame_skip": 1}       (optional: checked against the shards; what --record used)

Shards may hold episodes of different lengths (they are padded on loading); frames of one folder share one size
(they are resized to the run's --size if it differs). A malformed file is a one-line error naming it.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from envs import AT_LEAST_0, AT_LEAST_1, FRACTION, KEYS, GymEnv, UserError, check_folder, check_out_file, make_env, need, run_cli, WORLDS

FORMAT = "nanoworld-episodes-1"
META_KEYS = ("format", "env", "size", "spec", "episodes", "frame_skip")      # what meta.json may hold
DATA_VERSION = 4            # 3: anti-aliased edges; 4: any environment, meta.json in the documented format


@dataclass
class DataConfig:
    env: str = "coin"         # where the episodes come from: a built-in world, gym:<id>, procgen:<game>
    size: int = 32            # frames are size x size pixels
    episode_len: int = 32     # steps per episode (frames = steps + 1)
    n_free: int = 1024        # episodes in the action-free (pre-training) corpus
    n_labelled: int = 1536    # episodes in the action-labelled (fine-tuning) corpus
    heldout: float = 0.1      # fraction of each corpus held out for evaluation
    expert_p: float = 0.3     # behaviour policy (built-in worlds): scripted expert with this probability...
    sticky: float = 0.75      # ...else a random action, repeated with this probability (the only policy of a game)
    resample_still: float = 0.8   # an action that would not move the agent is redrawn with this probability
    frame_skip: int = 0       # gym: each action repeated this many times; 0: the game's default (GymEnv.auto_skip)
    seed: int = 0
    data_dir: str = "data_cache"
    folder: str = ""          # labelled episodes on disk (train.py --data), instead of generated ones
    free_folder: str = ""     # action-free episodes on disk (train.py --pretrain_data)


# ----------------------------------------------------------------------------------------------
# playing episodes

def play_episodes(env, policy, steps):
    """Play env.num episodes at once with policy(obs (N, S, S, 3) uint8, t) -> actions, for `steps` steps
    or until every one has terminated. Returns the episode layout every corpus uses:
        frames (N, steps+1, S, S, 3) uint8  frame t+1 follows actions[t]; after the end, the last frame repeats
        actions (N, steps[, A]), rewards (N, steps), ends (N, steps) bool, lengths (N,) frames up to the end."""
    obs, _ = env.reset()
    n = env.num
    frames = np.zeros((n, steps + 1) + obs.shape[1:], np.uint8)
    actions = np.zeros((n, steps) if env.discrete else (n, steps, env.action_dim),
                       np.int64 if env.discrete else np.float32)
    rewards = np.zeros((n, steps), np.float32)
    ends = np.zeros((n, steps), bool)
    lengths = np.full(n, steps + 1, np.int64)
    alive = np.ones(n, bool)
    frames[:, 0] = obs
    for t in range(steps):
        a = policy(obs, t)
        obs, r, term, _, _ = env.step(a)
        frames[:, t + 1] = np.where(alive[:, None, None, None], obs, frames[:, t])
        actions[:, t], rewards[:, t], ends[:, t] = a, r * alive, term & alive
        lengths[alive & term] = t + 2
        alive &= ~term
        if not alive.any():                                # every episode has ended: the policy is not asked again
            frames[:, t + 2:] = frames[:, t + 1, None]
            break
    return dict(frames=frames, actions=actions, rewards=rewards, ends=ends, lengths=lengths)


def behaviour_policy(env, cfg, rng):
    """Sticky random actions (each repeated with probability cfg.sticky), so that actions show in the frames as
    movement; in a built-in world mixed with its scripted expert and with still actions redrawn (_moves)."""
    prev = [env.random_action(rng)]
    expert = isinstance(env, tuple(WORLDS.values())) and (cfg.expert_p > 0 or cfg.resample_still > 0)

    def act(obs, t):
        rand = _where(rng.random(env.num) < cfg.sticky, prev[0], env.random_action(rng))
        prev[0], a = rand, rand
        if expert:
            exp = env.expert_action()
            if not env.discrete:
                exp = np.clip(exp + rng.normal(0, 0.3, exp.shape), -1, 1).astype(np.float32)
            a = _where(rng.random(env.num) < cfg.expert_p, exp, rand)
            for _ in range(3):                   # an action that leaves the agent in place (pressing into a wall,
                redo = (_moves(env, a) < 0.3 * env.speed) & (rng.random(env.num) < cfg.resample_still)  # doing
                if not redo.any():               # nothing) shows nothing of what actions do: resample most of them
                    break
                a = _where(redo, env.random_action(rng), a)
        return a
    return act


def generate_episodes(cfg, n, seed, env=None):
    """Roll n episodes of the behaviour policy in cfg.env (or in `env`, its copies reused), in batches of as many
    copies as the environment makes cheaply."""
    copies = min(n, GymEnv.max_copies if cfg.env.startswith("gym:") else n)
    if env is None or env.num != copies:
        env = make_env(cfg.env, num=copies, size=cfg.size, max_steps=cfg.episode_len, seed=seed, frame_skip=cfg.frame_skip)
    policy = behaviour_policy(env, cfg, np.random.default_rng(seed + 1))
    parts = [play_episodes(env, policy, cfg.episode_len) for _ in range(-(-n // copies))]
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


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


# ----------------------------------------------------------------------------------------------
# episodes on disk

def write_folder(path, episodes, env, size, spec, progress=None, frame_skip=None):
    """Write episodes (an iterator of dicts in the episode layout) as a folder in the documented format, atomically
    (a temporary folder renamed into place). Returns the number of episodes written."""
    tmp, n = path.rstrip("/") + f".tmp{os.getpid()}", 0
    os.makedirs(tmp, exist_ok=True)
    try:
        for i, ep in enumerate(episodes):
            np.savez_compressed(os.path.join(tmp, f"shard_{i:03d}.npz"), **ep)
            n += len(ep["frames"])
            if progress:
                progress(n)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(format=FORMAT, env=env, size=size, spec=spec, episodes=n,
                           **({"frame_skip": frame_skip} if frame_skip else {})), f, indent=1)
    except BaseException:                             # stopped (Ctrl-C) or failed: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return n


def read_meta(path):
    """A folder's meta.json (or {} without one), checked."""
    f = os.path.join(path, "meta.json")
    if not os.path.isfile(f):
        return {}
    try:
        meta = json.load(open(f))
    except ValueError:
        raise UserError(f"{f} is not valid JSON: fix it or delete it (a frames-only folder needs none)") from None
    if not isinstance(meta, dict):
        raise UserError(f"{f} holds a {type(meta).__name__}, not an object: write {{\"format\": \"{FORMAT}\", ...}}")
    if meta.get("format", FORMAT) != FORMAT:
        raise UserError(f"{f}: format {meta['format']!r} is not one this version reads: write \"{FORMAT}\" "
                        f"(the layout in data.py's docstring)")
    for key in set(meta) - set(META_KEYS):                          # notes of your own are fine; a misspelled
        near = [k for k in META_KEYS if k not in meta and typo(key, k)]   # "spec" would read as frames only
        if near:
            raise UserError(f"{f}: {key!r} is not a meta.json key: did you mean {near[0]!r}? (the keys: {', '.join(META_KEYS)})")
    spec = meta.get("spec")
    if spec is not None and not good_spec(spec):
        raise UserError(f"{f}: 'spec' is {spec}; write {{\"discrete\": true, \"n_actions\": N, \"action_dim\": 0}} "
                        f"(ids in [0, N)) or {{\"discrete\": false, \"n_actions\": 0, \"action_dim\": A}} (vectors in [-1, 1]^A)")
    if spec is not None and spec.get("keys") is not None and not good_keys(spec):
        raise UserError(f"{f}: spec 'keys' must map key names ({', '.join(KEYS)}) to actions of this spec (ids in "
                        f"[0, n_actions), or action_dim floats in [-1, 1]): fix them, or leave the key out")
    for key, fix in (("size", "write the frames' size in pixels, or leave the key out"),
                     ("frame_skip", "write the number of frames each action was repeated (1 or more)"),
                     ("episodes", "write the number of episodes the shards hold, or leave the key out")):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UserError(f"{f}: '{key}' is {v!r}; {fix}")
    return meta


def typo(a, b):
    """Whether a reads as a slip of the keyboard for b: two letters swapped, or one letter wrong."""
    return len(a) == len(b) and (sorted(a) == sorted(b) or sum(x != y for x, y in zip(a, b)) == 1)


def good_spec(spec):
    """Whether a spec names one action space: discrete with n_actions >= 1 ids, or continuous with action_dim >= 1."""
    count = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(spec, dict) or not isinstance(spec.get("discrete"), bool) or \
            not count(spec.get("n_actions")) or not count(spec.get("action_dim")):
        return False
    return spec["n_actions"] >= 1 if spec["discrete"] else spec["action_dim"] >= 1


def good_keys(spec):
    """Whether a spec's 'keys' maps play's key names to actions of that spec."""
    keys = spec["keys"]
    if not isinstance(keys, dict) or not set(keys) <= set(KEYS):
        return False
    if spec["discrete"]:
        return all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < spec["n_actions"] for a in keys.values())
    return all(isinstance(a, list) and len(a) == spec["action_dim"] and
               all(isinstance(v, (int, float)) and -1 <= v <= 1 for v in a) for a in keys.values())


def check_shard(f, arrays, spec, labelled):
    """One shard's arrays in the episode layout, checked and completed (lengths, rewards, ends), or a UserError."""
    if "frames" not in arrays:
        raise UserError(f"{f} has no 'frames' array (keys: {', '.join(arrays) or 'none'}): save uint8 frames "
                        f"(episodes, steps+1, S, S, 3) under the name 'frames'")
    shape = np.shape(arrays["frames"])                                # as saved, for the message
    if len(shape) == 4 and shape[-1] == 3:                            # one episode: every array gains the episode axis
        arrays = {k: np.asarray(v)[None] for k, v in arrays.items()}
    x = arrays["frames"]
    if x.dtype != np.uint8 or x.ndim != 5 or x.shape[-1] != 3 or x.shape[2] != x.shape[3] or x.shape[1] < 2:
        raise UserError(f"{f}: frames are {x.dtype} {shape}; expected uint8 (episodes, "
                        f"steps+1, S, S, 3), square RGB frames, at least 2 per episode")
    E, L = x.shape[0], x.shape[1] - 1
    out = dict(frames=x, lengths=np.asarray(arrays.get("lengths", np.full(E, L + 1)), np.int64).reshape(-1))
    if out["lengths"].shape != (E,) or (out["lengths"] < 2).any() or (out["lengths"] > L + 1).any():
        raise UserError(f"{f}: lengths must be {E} counts of valid frames in 2..{L + 1}")
    if not labelled:
        return out
    if "actions" not in arrays:
        raise UserError(f"{f} has no 'actions': fine-tuning needs labelled episodes (pass frames-only folders with "
                        f"--pretrain_data)")
    a = arrays["actions"]
    want = (E, L) if spec["discrete"] else (E, L, spec["action_dim"])
    ok = a.shape == want and (a.dtype.kind in "iu" if spec["discrete"] else a.dtype.kind == "f")
    if ok and a.size:
        ok = (a.min() >= 0 and a.max() < spec["n_actions"]) if spec["discrete"] else bool(np.isfinite(a).all() and
                                                                                        np.abs(a).max() <= 1 + 1e-5)
    if not ok:
        kind = f"integer ids in [0, {spec['n_actions']})" if spec["discrete"] else f"floats in [-1, 1]"
        seen = f" in [{a.min()}, {a.max()}]" if a.size and a.dtype.kind in "iuf" else ""
        raise UserError(f"{f}: actions are {a.dtype} {a.shape}{seen}; this folder's meta.json says {want} {kind}: fix "
                        f"the actions or the spec in meta.json")
    out["actions"] = a.astype(np.int64) if spec["discrete"] else np.clip(a.astype(np.float32), -1, 1)   # (rounding)
    for key, dtype in (("rewards", np.float32), ("ends", bool)):
        v = np.asarray(arrays.get(key, np.zeros((E, L))))
        if v.shape != (E, L) or v.dtype.kind not in "biuf" or not np.isfinite(v.astype(np.float64)).all():
            raise UserError(f"{f}: {key} are {v.dtype} {v.shape}; expected one finite number per step, (episodes, "
                            f"steps) = {(E, L)}")
        out[key] = v.astype(dtype)
    return out


def read_folder(path, labelled, size=None):
    """Every shard of a folder in the episode format -> (arrays, meta), padded to the longest episode and resized to
    `size` if given; a UserError names any file that does not fit the format."""
    if not os.path.isdir(path):
        raise UserError(f"no data folder at '{path}': record one with `python data.py --record ENV --out DIR`")
    meta = read_meta(path)
    spec = meta.get("spec")
    files = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    if not files:
        raise UserError(f"{path} holds no .npz shards of episodes")
    parts = []
    for name in files:
        f = os.path.join(path, name)
        try:
            arrays = dict(np.load(f, allow_pickle=False))
        except Exception as e:
            raise UserError(f"{f} is not a readable .npz file ({type(e).__name__}): re-save it with np.savez_compressed") from None
        parts.append(check_shard(f, arrays, spec, labelled and spec is not None))
        if labelled and spec is None:                 # frames only: one no-op action per step (train.py asks for actions
            E, L = parts[-1]["frames"].shape[:2]      # from such a folder only to evaluate a backbone pre-trained on it)
            parts[-1].update(actions=np.zeros((E, L - 1), np.int64), rewards=np.zeros((E, L - 1), np.float32),
                             ends=np.zeros((E, L - 1), bool))
        if parts[-1]["frames"].shape[2:] != parts[0]["frames"].shape[2:]:
            raise UserError(f"{f} has frames of {parts[-1]['frames'].shape[2]} px, {files[0]} of "
                            f"{parts[0]['frames'].shape[2]} px: one folder holds one frame size")
    held = sum(len(p["frames"]) for p in parts)
    if meta.get("episodes") not in (None, held):                      # a shard lost (or added) in copying
        raise UserError(f"{os.path.join(path, 'meta.json')} says {meta['episodes']} episodes, but the {len(files)} "
                        f".npz files hold {held}: restore the missing shards (or remove extra ones), or fix 'episodes'")
    if meta.get("size") not in (None, parts[0]["frames"].shape[2]):
        raise UserError(f"{os.path.join(path, 'meta.json')} says 'size' {meta['size']}, but the frames are "
                        f"{parts[0]['frames'].shape[2]} px: fix the size in meta.json, or leave the key out")
    return pad_and_join(parts, size), meta


def pad_and_join(parts, size):
    """Join shards of episodes of different lengths: each is padded to the longest by repeating its last frame."""
    L = max(p["frames"].shape[1] for p in parts) - 1
    for p in parts:
        extra = L + 1 - p["frames"].shape[1]
        if extra:
            p["frames"] = np.concatenate([p["frames"], np.repeat(p["frames"][:, -1:], extra, 1)], 1)
            for k in ("actions", "rewards", "ends"):
                if k in p:
                    p[k] = np.concatenate([p[k], np.zeros((len(p[k]), extra) + p[k].shape[2:], p[k].dtype)], 1)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if size and arrays["frames"].shape[2] != size:
        from envs import resize
        f = arrays["frames"]
        arrays["frames"] = resize(f.reshape((-1,) + f.shape[2:]), size).reshape(f.shape[:2] + (size, size, 3))
    return arrays


# ----------------------------------------------------------------------------------------------
# corpora

class Corpus:
    """Episodes in memory, split into train / held-out by episode: the last ones (of a folder, in shard-name order)."""

    def __init__(self, arrays, heldout):
        n = len(arrays["frames"])
        if n < 2:
            raise UserError(f"a corpus needs at least 2 episodes (one to train on, one held out); it has {n}")
        n_held = max(1, int(round(n * heldout)))
        self.train = {k: v[:-n_held] for k, v in arrays.items()}
        self.test = {k: v[-n_held:] for k, v in arrays.items()}


def load_corpus(cfg, labelled, progress=True, log=None):
    """One corpus, 'labelled' with actions or videos only: read from cfg.folder / cfg.free_folder, or generated in
    cfg.env (and cached in cfg.data_dir; `log` is told before the generating starts). A labelled folder also serves
    as videos, its actions dropped."""
    folder = cfg.folder if labelled else (cfg.free_folder or cfg.folder)
    if folder:
        arrays, _ = read_folder(folder, labelled, cfg.size)
        if not labelled:
            arrays = {k: arrays[k] for k in ("frames", "lengths")}
        return Corpus(arrays, cfg.heldout)
    check_folder(cfg.data_dir, "--data_dir", "the generated corpora")
    path = cache_path(cfg, labelled)
    if not os.path.exists(os.path.join(path, "meta.json")):
        if log is not None:
            log(f"generating the {'labelled' if labelled else 'action-free'} corpus: {cfg.n_labelled if labelled else cfg.n_free} "
                f"episodes of {cfg.env}, cached in {path} ...")
        generate_corpus(cfg, labelled, path, progress)
    return Corpus(read_folder(path, labelled)[0], cfg.heldout)


def cache_path(cfg, labelled):
    """The cache folder of a generated corpus: named by what makes its episodes (not where it is, how much of it is
    held out, or the size of the other corpus)."""
    key = dict(asdict(cfg), labelled=labelled, version=DATA_VERSION)
    for k in ("data_dir", "folder", "free_folder", "heldout", "n_free" if labelled else "n_labelled"):
        del key[k]
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = cfg.env.replace(":", "-").replace("/", "-")
    return os.path.join(cfg.data_dir, f"{name}-{'labelled' if labelled else 'free'}-{cfg.size}px-{tag}")


def generate_corpus(cfg, labelled, path, progress=True):
    """Generate a corpus in shards of 256 episodes, with a progress bar, into `path` (the episode format)."""
    from tqdm import tqdm
    n, seed = (cfg.n_labelled, cfg.seed * 1000 + 1) if labelled else (cfg.n_free, cfg.seed * 1000 + 2)
    env = make_env(cfg.env, num=min(n, 256, GymEnv.max_copies if cfg.env.startswith("gym:") else n), size=cfg.size,
                   max_steps=cfg.episode_len, seed=seed, frame_skip=cfg.frame_skip)
    bar = tqdm(total=n, desc=f"{'labelled' if labelled else 'free'} corpus of {cfg.env}", unit="episode",
               disable=None if progress else True, leave=False)

    def shards():
        for i in range(0, n, 256):
            ep = generate_episodes(cfg, min(256, n - i), seed + i, env)
            yield ep if labelled else {k: ep[k] for k in ("frames", "lengths")}
    write_folder(path, shards(), cfg.env, cfg.size, env.spec, progress=lambda k: bar.update(k - bar.n))
    bar.close()


class ClipSampler:
    """Random clips of T consecutive frames from a split, as float tensors in [-1, 1].

    A clip starting at step s holds frames s..s+T-1 and, when the corpus has actions, the action
    that *led into* each frame: clip_actions[i] = actions[s + i - 1] (so s >= 1). Its generator
    state is part of a checkpoint, so a resumed run does not replay the same batches."""

    def __init__(self, split, clip_len, seed=0, fix="lower --clip_len"):
        self.split, self.T = split, clip_len
        self.rng = np.random.default_rng(seed)
        self.max_start = split["lengths"] - clip_len     # starts are 1..max_start inclusive
        self.ok = np.flatnonzero(self.max_start >= 1)
        if len(self.ok) == 0:
            raise UserError(f"no episode is long enough for clips of {clip_len} frames (the longest holds "
                            f"{split['lengths'].max()} frames, and a clip starts after an episode's first frame): {fix}")

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
    """n deterministic clips of `length` frames (episodes, starts), spread over every episode and never repeated.
    n <= E episodes: the j-th clip comes from episode floor(j E / n), so the picks span the first episode to the
    last, and takes its window j mod (its windows). n > E: the windows (non-overlapping, from frame 1) are taken
    round by round: the first window of every episode, then the second of every episode that has one, and so on.
    Capped at the number of windows."""
    windows = [np.arange(1, L - length + 1, length) for L in lengths]           # starts of non-overlapping windows
    ok = [i for i, w in enumerate(windows) if len(w)]
    if not ok:
        raise UserError(f"no held-out episode is long enough for clips of {length} frames (a clip starts after an "
                        f"episode's first frame, so it needs {length + 1}; the longest holds {max(lengths)}): lower "
                        f"--horizon (or --clip_len), or give longer episodes")
    if n <= len(ok):
        e = [ok[j * len(ok) // n] for j in range(n)]
        return np.array(e), np.array([windows[i][j % len(windows[i])] for j, i in enumerate(e)])
    rounds = [(i, windows[i][r]) for r in range(max(map(len, windows))) for i in ok if r < len(windows[i])]
    e, s = zip(*rounds[:n])
    return np.array(e), np.array(s)


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

def record(env_name, episodes, out, size, episode_len, frames_only, seed, sticky, frame_skip):
    """python data.py --record ENV: sticky-random episodes in the episode format, for train.py --data."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} already exists and is not an empty folder: choose another --out")
    cfg = DataConfig(env=env_name, size=size, episode_len=episode_len, sticky=sticky, frame_skip=frame_skip, seed=seed)
    env = make_env(env_name, num=1, size=size, max_steps=episode_len, frame_skip=frame_skip)
    spec, frame_skip = env.spec, env.frame_skip                            # the number used (0: the game's own)
    from tqdm import tqdm
    bar, t0 = tqdm(total=episodes, desc=f"recording {env_name}", unit="episode", disable=None), time.time()

    def shards():
        for i in range(0, episodes, 256):
            ep = generate_episodes(cfg, min(256, episodes - i), seed * 1000 + i)
            yield {k: ep[k] for k in ("frames", "lengths")} if frames_only else ep
    lengths = []
    n = write_folder(out, (lengths.append(ep["lengths"]) or ep for ep in shards()), env_name, size,
                     None if frames_only else spec, progress=lambda k: bar.update(k - bar.n), frame_skip=frame_skip)
    bar.close()
    print(f"wrote {n} {'action-free' if frames_only else 'labelled'} episodes of {env_name} ({size}x{size}) to {out} "
          f"in {time.time() - t0:.0f} s: {length_note(np.concatenate(lengths), episode_len)}")


def length_note(lengths, episode_len):
    """How long recorded episodes are, in frames (a short one limits train.py's clips: it names the flags that fit)."""
    early = int((lengths < episode_len + 1).sum())
    if not early:
        return f"every one {episode_len + 1} frames ({episode_len} steps)"
    return (f"{early} of {len(lengths)} ended before {episode_len} steps: {lengths.min()} to {lengths.max()} frames, "
            f"median {int(np.median(lengths))} (train.py's clips and --horizon must fit in them)")


def checked(typ, valid):
    """An argparse type: typ(text), refused (a one-line usage error, exit 2) unless valid (envs.AT_LEAST_1 ...) holds."""
    def parse(text):
        v = typ(text)
        if not valid[0](v):
            raise argparse.ArgumentTypeError(f"{text}: must be {valid[1]}")
        return v
    return parse


def main(argv=None):
    positive, fraction, natural = checked(int, AT_LEAST_1), checked(float, FRACTION), checked(int, AT_LEAST_0)
    p = argparse.ArgumentParser(description="Environments and episodes. --list prints the built-in worlds; --preview "
                                "FILE.gif rolls the behaviour policy; --record ENV --out DIR writes episodes for "
                                "train.py --data.", epilog=__doc__.split("\n\n", 3)[3],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", nargs="?", const="worlds", choices=("worlds", "games"),
                   help="print the built-in worlds (--list games: the Procgen games, if procgen2 is installed), one "
                   "per line, nothing else on stdout (gym: takes any gymnasium id)")
    p.add_argument("--env", default="coin", help="coin, pusher, gym:<id>, procgen:<game>")
    p.add_argument("--size", type=positive, default=None, help="frame size (default: 32 for built-in worlds, 64 for games)")
    p.add_argument("--preview", default="", help="write a GIF of a few episodes of the behaviour policy")
    p.add_argument("--record", default="", metavar="ENV", help="record episodes of ENV into --out")
    p.add_argument("--out", default="", help="--record: the folder to write")
    p.add_argument("--episodes", type=positive, default=64, help="--record: how many episodes")
    p.add_argument("--episode_len", type=positive, default=None, help="--record: steps per episode (default 32; 64 for games)")
    p.add_argument("--frames_only", action="store_true", help="--record: leave the actions out (a corpus of videos)")
    p.add_argument("--sticky", type=fraction, default=0.75, help="--record: a random action repeats with this probability")
    p.add_argument("--frame_skip", type=natural, default=0, help="--record, gym: repeat each action this many times "
                   "(0: the game's default, 2 for CartPole's 50 steps a second, 1 for Atari v5, 4 for NoFrameskip-v4)")
    p.add_argument("--seed", type=natural, default=0, help="--record, --preview: the seed of the episodes (worlds and actions)")
    a = p.parse_args(argv)
    if a.list == "games":
        print("\n".join(f"procgen:{g}" for g in need("procgen.env", "procgen").ENV_NAMES))
        return
    if a.list:
        print("\n".join(WORLDS))
        print("(the Procgen games: python data.py --list games; any gymnasium id runs as gym:<id>)", file=sys.stderr)
        return
    idle = [f"--{k}" for k in ("out", "episodes", "frames_only", "sticky") if getattr(a, k) != p.get_default(k)]
    if idle and not a.record:
        raise UserError(f"{', '.join(idle)} {'is' if len(idle) == 1 else 'are'} for --record: add --record ENV, or drop "
                        f"{'it' if len(idle) == 1 else 'them'}")
    env = a.record or a.env
    game = ":" in env
    size, episode_len = a.size or (64 if game else 32), a.episode_len or (64 if game else 32)
    if a.record:
        if not a.out:
            raise UserError("--record needs --out DIR: the folder to write the episodes to")
        return record(a.record, a.episodes, a.out, size, episode_len, a.frames_only, a.seed, a.sticky, a.frame_skip)
    if a.preview:
        check_out_file(a.preview, "--preview", ".gif")
    ep = generate_episodes(DataConfig(env=env, size=size, episode_len=episode_len, frame_skip=a.frame_skip), 4, seed=a.seed)
    if a.preview:
        from PIL import Image
        fr = np.concatenate(list(ep["frames"]), axis=2)                    # (L+1, S, 4S, 3)
        imgs = [Image.fromarray(f).resize((f.shape[1] * 4, f.shape[0] * 4), Image.NEAREST) for f in fr]
        imgs[0].save(a.preview, save_all=True, append_images=imgs[1:], duration=120, loop=0)
        print(f"wrote {a.preview}")
    print(f"{env}: frames {ep['frames'].shape}, mean reward per step {ep['rewards'].mean():.3f}")


if __name__ == "__main__":
    run_cli(main)
