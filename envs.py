"""envs.py — every environment by name, behind one batched interface: the built-in worlds, gymnasium, Procgen.

    coin                 built-in, discrete actions (5)    in the spirit of Procgen CoinRun: steer onto the coin
    pusher               built-in, continuous actions (2)  in the spirit of BAIR robot pushing: push the block home
    gym:<id>             any gymnasium environment that renders rgb_array, e.g. gym:ALE/Breakout-v5, gym:CartPole-v1,
                         gym:MountainCarContinuous-v0 (pip install -r requirements-games.txt)
    procgen:<game>       a Procgen game through procgen2, e.g. procgen:coinrun (64x64 natively)

An environment holds N copies stepped at once, gymnasium-style, with frames as uint8 (N, S, S, 3) at the size asked:

    obs, info = env.reset(seed)                        frames of the N copies
    obs, reward, terminated, truncated, info = env.step(actions)        (N,) ids or (N, A) vectors in [-1, 1]
    state = env.get_state(); env.set_state(state)      where the simulator can be saved (env.restorable): the
                                                       true-simulator planner and the counterfactual control measure
    env.spec                                           the action space, as models and checkpoints record it,
                                                       with the keys that play it (left, right, up, down, space, none)

A game's copy whose episode ends stays ended (its last frame, reward 0) until the next reset; a built-in world
keeps stepping after its end (only pusher ends, when the block is home), and callers stop reading it there. The
built-in worlds draw the controlled object in a colour nothing else uses, so `locate_agent` reads its position off
any frame; an external game has no such colour (agent_size None). This file is first in the project's data flow:
the errors every script reports and the command-line runner live here too.
"""
import contextlib
import difflib
import copy
import importlib.util
import io
import json
import os
import signal
import sys
import warnings

import numpy as np


# what a numeric flag may be: (test, the words an error gives), for train.py and mbrl.py's configs (train.opt) and
# data.py's flags (checked)
ABOVE_0, AT_LEAST_0, AT_LEAST_1, AT_LEAST_2 = ((lambda v: v > 0, "above 0"), (lambda v: v >= 0, "0 or more"),
                                               (lambda v: v >= 1, "1 or more"), (lambda v: v >= 2, "2 or more"))
FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")


class UserError(Exception):
    """A mistake in what the user asked for. Scripts print it as one line and exit with code 2."""


class Stopped(Exception):
    """A run stopped by a signal after saving its work; the message says how to resume. Exit code 128 + signal."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2, no traceback. A kill
    (SIGTERM) stops it as Ctrl-C does, so that what it cleans up on the way out (half-written folders) is cleaned."""
    if "LOCAL_RANK" not in os.environ:                       # (torchrun's workers keep the default: a worker waiting
        signal.signal(signal.SIGTERM, interrupt)             #  in a collective would never reach a Python handler)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def interrupt(signum, frame):
    """A signal handler: raise KeyboardInterrupt (with the signal's number) where the program is."""
    stop = KeyboardInterrupt()
    stop.signum = signum
    raise stop


# ----------------------------------------------------------------------------------------------
# the interface

KEYS = ("left", "right", "up", "down", "space", "none")     # what play and --keys can press


def check_size(size, flag=""):
    """Frames are square, size x size pixels: a multiple of 8 (patches and tokenizer cells tile it), 16 or more."""
    if size < 16 or size % 8:
        raise UserError(f"{flag + str(size) + ': ' if flag else ''}frames of {size} px are not supported: use a multiple "
                        f"of 8, at least 16 (32 or 64)")


def check_folder(path, flag, holds):
    """A folder flag's value: a UserError if it names something that exists and is not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file: pass a folder (it holds {holds})")


def action_space(spec):
    """A spec's action space without its key map (the keys only play it): what two specs must share."""
    return {k: spec.get(k) for k in ("discrete", "n_actions", "action_dim")}


def check_out_file(path, flag, ext):
    """A file a run will write, checked before the work that fills it: its kind, and a folder to put it in."""
    if not path.lower().endswith(ext):
        raise UserError(f"{flag} should name a {ext} file; got '{path}'")
    folder = os.path.dirname(path) or "."
    check_folder(folder, flag, f"the {ext} file")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: no folder '{folder}' to write into: create it first")
    existed = os.path.exists(path)
    try:                                                  # a probe: opened for appending, so nothing in it is lost
        open(path, "a").close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot be written ({e.strerror}): name a file in a folder of yours") from None
    if not existed:
        os.remove(path)


@contextlib.contextmanager
def claimed(folder):
    """Mark `folder` as written by this process while the block runs (`folder/.running` holds its pid), so that a
    second run started into the same folder stops with a UserError instead of overwriting the first one's files.
    A mark whose process is gone (a run killed outright) is taken over. The mark appears whole or not at all: it is
    written aside and linked into place, which fails where a mark exists."""
    os.makedirs(folder, exist_ok=True)
    mark, mine = os.path.join(folder, ".running"), os.path.join(folder, f".running.{os.getpid()}")
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(mine, mark)
                break
            except FileExistsError:
                pid = marked_pid(mark)
                if pid is not None and pid != os.getpid() and process_alive(pid):
                    raise UserError(f"another run (process {pid}) is writing to {folder}: let it finish, stop it, or "
                                    f"pass another --out (if no run is writing there, delete {mark})") from None
                os.remove(mark)                              # unreadable, ours, or left by a process that is gone
        else:
            raise UserError(f"cannot mark {folder} as in use: delete {mark} and start again")
    finally:
        os.remove(mine)
    try:
        yield
    finally:
        if marked_pid(mark) == os.getpid():
            os.remove(mark)


def marked_pid(mark):
    try:
        with open(mark) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    """Whether a process with this id runs (on Windows, where os.kill would end it, every mark counts as alive).
    A zombie (killed, not yet reaped by its parent: 'Z' in /proc/<pid>/stat on Linux) runs no more."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                  # someone else's process
        return True
    if not os.path.isdir("/proc/self"):                      # no /proc (macOS): os.kill's answer stands
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # the state follows the name, in parentheses
    except OSError:                                          # gone since os.kill
        return False


class Env:
    """What every environment shares: its size, its action space (spec), action checks, random actions."""
    name = ""
    discrete = True
    n_actions = 0        # discrete: actions are ints in [0, n_actions)
    action_dim = 0       # continuous: actions are float vectors in [-1, 1]^action_dim
    agent_size = None    # the controlled object's size, where it has a colour of its own (built-in worlds)
    restorable = True    # get_state / set_state work
    frame_skip = 1       # game frames per action (the built-in worlds and Procgen: one; GymEnv: its own or auto_skip)
    keys = {}            # key name -> action

    def __init__(self, num, size, max_steps):
        check_size(size)
        self.num, self.size, self.max_steps = num, size, max_steps

    @property
    def spec(self):
        return dict(discrete=self.discrete, n_actions=self.n_actions, action_dim=self.action_dim, keys=dict(self.keys))

    def check_actions(self, a, batch_shape):
        """Validate a batch of actions; a mistake is a UserError that says what shape was expected."""
        want = batch_shape if self.discrete else batch_shape + (self.action_dim,)
        if tuple(a.shape) != tuple(want):
            kind = f"ints in [0, {self.n_actions})" if self.discrete else f"floats of size {self.action_dim}"
            raise UserError(f"'{self.name}' takes actions of shape {tuple(want)} ({kind}); got shape {tuple(a.shape)}")
        if self.discrete:
            if np.any((a < 0) | (a >= self.n_actions)) or (a.dtype.kind == "f" and np.any(a != np.round(a))):
                raise UserError(f"'{self.name}' takes action ids in [0, {self.n_actions}); got {a.ravel()[:8]}")
            return a.astype(np.int64)
        return np.clip(a.astype(np.float32), -1, 1)

    def random_action(self, rng):
        if self.discrete:
            return rng.integers(0, self.n_actions, self.num)
        return rng.uniform(-1, 1, (self.num, self.action_dim)).astype(np.float32)

    def tile(self, state, n):
        """A state of n times as many copies, each copy repeated n times in a row (a planner's candidates)."""
        rep = lambda v: [x for x in v for _ in range(n)] if isinstance(v, list) else \
            np.repeat(v, n, 0) if isinstance(v, np.ndarray) else v
        return {k: (v if k == "rng" else rep(v)) for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# the built-in worlds

AGENT_RGB = np.array([235, 50, 50], np.uint8)   # reserved for the controlled object, in every world


class World(Env):
    """A built-in world: N copies stepped at once in numpy, seeded and deterministic.

    Positions are object centres in [0, 1]^2 (x right, y down); sizes are fractions of the frame,
    so the same world renders at any resolution. Subclasses define the objects and the rules.
    """
    agent_size = 0.2

    def __init__(self, num=1, size=32, max_steps=32, seed=0):
        super().__init__(num, size, max_steps)
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

    def _place(self, n, size):
        return self.rng.uniform(size / 2, 1 - size / 2, (n, 2))


class Coin(World):
    """Discrete game: the red agent moves one step up/down/left/right (or stays); touching the
    yellow coin gives reward 1 and the coin reappears elsewhere. Actions: 0 stay, 1 up, 2 down,
    3 left, 4 right. The episode ends after max_steps."""
    name, discrete, n_actions = "coin", True, 5
    keys = dict(none=0, up=1, down=2, left=3, right=4, space=0)
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
    keys = dict(none=[0, 0], up=[0, -1], down=[0, 1], left=[-1, 0], right=[1, 0], space=[0, 0])
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
# games written by others: gymnasium and Procgen

GAMES_HINT = "pip install -r requirements-games.txt (gymnasium, ale-py, procgen2, pygame-ce)"


def need(module, what):
    """Import an optional game package, or raise a UserError that says what to install."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):                      # procgen's old gym prints a warning
            return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(f"{what} needs the optional game packages: {GAMES_HINT}") from None


def resize(frames, size):
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8, pillow's bilinear filter (it averages when it shrinks)."""
    if frames.shape[1:3] == (size, size):
        return frames
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def keys_for(n_actions, meanings=None, action_dim=0):
    """The keys that play an action space: by the game's own action names where it has them (Atari: NOOP, FIRE,
    LEFT, ...; a game with no UP or DOWN takes up and down as RIGHT and LEFT, its one axis: in Pong RIGHT moves the
    paddle up), else by convention (2 actions: left, right; 3: left, none, right; vectors: arrows on x, then y; 4 or
    more unnamed ids in the order none, left, right, up, down, space: a guess, which sample.py --keymap corrects)."""
    if action_dim:
        x = lambda v: [float(v)] + [0.0] * (action_dim - 1)
        y = lambda v: [0.0, float(v)] + [0.0] * (action_dim - 2) if action_dim > 1 else x(0)
        return dict(left=x(-1), right=x(1), up=y(-1), down=y(1), space=x(0), none=x(0))
    if meanings:
        by_name = {m.upper(): i for i, m in enumerate(meanings)}
        vertical = "UP" in by_name or "DOWN" in by_name
        names = dict(left="LEFT", right="RIGHT", up="UP" if vertical else "RIGHT", down="DOWN" if vertical else "LEFT",
                     space="FIRE", none="NOOP")
        return {k: by_name.get(v, 0) for k, v in names.items()}
    order = {2: ("left", "right"), 3: ("left", "none", "right")}.get(n_actions, ("none", "left", "right", "up", "down", "space"))
    keys = {k: i for i, k in enumerate(order) if i < n_actions}
    return {k: keys.get(k, keys.get("none", 0)) for k in KEYS}


def time_limit(env):
    """The wrapper of a gymnasium env that counts its steps to truncation (TimeLimit), or None."""
    while env is not None and not hasattr(env, "_elapsed_steps"):
        env = getattr(env, "env", None)
    return env


GYM_WARNED = {}                                    # the gymnasium warnings GymEnv has shown (shown once)


class GymEnv(Env):
    """N copies of a gymnasium environment, stepped one after another; frames resized to size x size. Discrete(n)
    actions are ids; Box(A,) actions are vectors in [-1, 1]^A, scaled to the environment's bounds. The frame is the
    observation where that is an image (Atari), else env.render(). Each action is repeated frame_skip times; 0 picks
    it from the game (auto_skip). Atari games are made with repeat_action_probability=0: sticky actions would
    make a replay from a restored state inexact. States: Atari's cloneState, else a copy of the environment's own
    attributes (classic control keeps its whole state there). Making and seeding a copy can be slow (Atari reloads
    its ROM: ~0.2 s), so a reset without a seed continues each copy's own random stream instead, and the copies a
    larger state needed (a planner's candidates, set_state) are kept for the next one."""
    max_copies = 16

    control_hz = 25      # the agent's step rate that auto_skip aims for, in steps per second of game time

    def __init__(self, env_id, num=1, size=64, max_steps=64, seed=0, frame_skip=0):
        super().__init__(num, size, max_steps)
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")                   # frames are rendered off screen
        os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")                # else SDL (pygame) swallows SIGINT/SIGTERM
        self.gym = need("gymnasium", f"gym:{env_id}")
        self.id, self.name, self.kw, self.seed = env_id, f"gym:{env_id}", {}, int(seed)
        if env_id.startswith("ALE/"):
            self.gym.register_envs(need("ale_py", f"gym:{env_id}"))
        elif importlib.util.find_spec("ale_py"):                              # Atari's older ids (PongNoFrameskip-v4)
            with contextlib.suppress(UserError):                              # (a broken ale-py install: not Atari's id)
                self.gym.register_envs(need("ale_py", f"gym:{env_id}"))
        if "ale_py" in str(getattr(self.gym.envs.registry.get(env_id), "entry_point", "")):
            self.kw = dict(repeat_action_probability=0.0)                    # no sticky actions: replays are exact
        self.pool = [self._make(i) for i in range(num)]                      # every copy made so far, kept
        self.envs = self.pool[:num]                                           # the copies in use
        space, u = self.envs[0].action_space, self.envs[0].unwrapped
        self.discrete = isinstance(space, self.gym.spaces.Discrete)
        if not self.discrete and not (isinstance(space, self.gym.spaces.Box) and len(space.shape) == 1):
            raise UserError(f"gym:{env_id} has {space} actions: nanoworld takes Discrete(n) or Box(A,) spaces")
        self.n_actions = int(space.n) if self.discrete else 0
        self.action_dim = 0 if self.discrete else int(space.shape[0])
        self.low, self.high = (None, None) if self.discrete else (space.low, space.high)
        meanings = u.get_action_meanings() if hasattr(u, "get_action_meanings") else None
        self.keys = keys_for(self.n_actions, meanings, self.action_dim)
        self.image_obs = len(self.envs[0].observation_space.shape or ()) == 3
        self.atari = hasattr(u, "ale")                                        # states through the emulator's own clone
        if self.atari and isinstance(getattr(u, "_frameskip", 1), tuple):
            raise UserError(f"gym:{env_id} skips a random number of frames each step, so a replay from a saved state "
                            f"is not exact: use its NoFrameskip-v4 or ALE/...-v5 id")
        self.frame_skip = frame_skip or self.auto_skip()

    def auto_skip(self):
        """The frame skip where the game has none: games seen through their rendering (classic control, MuJoCo) step
        at their render_fps; an action's effect on a small frame is visible only over a few of CartPole's 50 steps a
        second, so they repeat each action to act at about control_hz. Games whose observation is the image (Atari's
        v5 skips 4 frames itself) keep their own rate."""
        if self.atari and getattr(self.envs[0].unwrapped, "_frameskip", None) == 1:   # *NoFrameskip ids: Atari's 60 Hz
            return 4                                                                  # as v5 does (15 actions a second)
        fps = self.envs[0].metadata.get("render_fps") or self.control_hz
        return 1 if self.image_obs else max(1, round(fps / self.control_hz))

    def _make(self, i):
        """Copy i, reset once with seed + i (gymnasium refuses a step before a reset, even into a restored state).
        Gymnasium's warnings while making it are shown only if it is made: a refused id's error says it all."""
        first = lambda e: (str(e).splitlines() or [""])[0][:200].rstrip(".")
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                env = self.gym.make(self.id, render_mode="rgb_array", **self.kw)
        except self.gym.error.Error as e:
            if isinstance(e, self.gym.error.DependencyNotInstalled):         # the id is right: a package is missing
                raise UserError(f"gym:{self.id} could not be made: {first(e)}") from None
            raise UserError(f"gym:{self.id}: {first(e)}; the id is a gymnasium id, e.g. gym:CartPole-v1, "
                            f"gym:ALE/Breakout-v5") from None
        except Exception as e:                                                # the game's own code: a missing module
            raise UserError(f"gym:{self.id} could not be made: {type(e).__name__}: {first(e)} "
                            f"(install what it needs, or pick another game)") from None
        for w in said:                                                        # (once each, as unrecorded ones are)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=GYM_WARNED)
        env.reset(seed=self.seed + i)
        return env

    def _frame(self, env, obs):
        return obs if self.image_obs else env.render()

    draw = True          # False: steps skip drawing (a planner that only needs rewards), frames stay as they were

    def reset(self, seed=None):
        """Every copy back to a start; with a seed, copy i is seeded with seed + i (Atari then reloads its ROM)."""
        obs = [self._frame(e, e.reset(seed=None if seed is None else int(seed) + i)[0]) for i, e in enumerate(self.envs)]
        self.last, self.done, self.t = resize(np.stack(obs), self.size), np.zeros(self.num, bool), 0
        return self.last.copy(), {}

    def step(self, action):
        a = self.check_actions(np.asarray(action), (self.num,))
        if not self.discrete:
            a = self.low + (a + 1) / 2 * (self.high - self.low)
        reward, was, ended = np.zeros(self.num, np.float32), self.done, self.done.copy()
        for i, e in enumerate(self.envs):
            if was[i]:
                continue
            for _ in range(self.frame_skip):
                obs, r, term, trunc, _ = e.step(a[i])
                reward[i] += r
                if term or trunc:
                    ended[i] = True
                    break
            if self.draw:
                self.last[i] = resize(self._frame(e, obs)[None], self.size)[0]
        self.done, self.t = ended, self.t + 1
        return self.last.copy(), reward, ended & ~was, np.full(self.num, self.t >= self.max_steps), {}

    def _snapshot(self, e):
        """A copy's state: the game's own, and the step count of its time limit (a wrapper's, not the game's)."""
        game = e.unwrapped.ale.cloneState() if self.atari else \
            {k: copy.deepcopy(v) for k, v in vars(e.unwrapped).items() if k not in self.not_state}
        limit = time_limit(e)
        return dict(game=game, steps=limit._elapsed_steps if limit else None)

    not_state = ("screen", "clock", "spec", "render_mode", "isopen",              # the window, not the simulation,
                 "action_space", "observation_space")                         # nor the spaces (and their samplers)

    @property
    def restorable(self):
        """Atari, and any game whose whole state copies (classic control); not one holding, e.g., a physics engine."""
        try:
            self._snapshot(self.envs[0])
        except Exception:                                                     # deepcopy refused an attribute
            return False
        return True

    def _restore(self, e, snap):
        if self.atari:
            e.unwrapped.ale.restoreState(snap["game"])
        else:
            for k, v in snap["game"].items():
                setattr(e.unwrapped, k, copy.deepcopy(v))
        if limit := time_limit(e):
            limit._elapsed_steps = snap["steps"]

    def get_state(self):
        return dict(envs=[self._snapshot(e) for e in self.envs], last=self.last.copy(), done=self.done.copy(), t=self.t)

    def set_state(self, state):
        n = len(state["envs"])
        while len(self.pool) < n:                                             # more copies than ever: make them once
            self.pool.append(self._make(len(self.pool)))
        self.envs, self.num = self.pool[:n], n
        for e, snap in zip(self.envs, state["envs"]):
            self._restore(e, snap)
        self.last, self.done, self.t = state["last"].copy(), state["done"].copy(), state["t"]


class ProcgenEnv(Env):
    """N worlds of a Procgen game (procgen2's ProcgenGym3Env, easy levels, every level allowed), 64x64 natively. Its
    episodes restart on their own; here a world whose episode ends keeps its last frame until the next reset.
    States: the game's own get_state / set_state (every world at once)."""

    def __init__(self, game, num=1, size=64, max_steps=64, seed=0):
        super().__init__(num, size, max_steps)
        self.procgen = need("procgen", f"procgen:{game}")
        games = need("procgen.env", f"procgen:{game}").ENV_NAMES
        if game not in games:                                     # procgen itself aborts the process on one
            raise UserError(f"procgen:{game} is not a Procgen game: choose one of "
                            f"{', '.join('procgen:' + g for g in games)}")
        self.game, self.name, self.seed, self.base, self.resets = game, f"procgen:{game}", seed, int(seed), 0
        self.env = self._make(num, seed)
        self.n_actions = self.env.ac_space.eltype.n
        names = {tuple(c): i for i, c in enumerate(self.env.combos)}
        pick = dict(left=("LEFT",), right=("RIGHT",), up=("UP",), down=("DOWN",), space=("D",), none=())
        self.keys = {k: names.get(v, names.get((), 0)) for k, v in pick.items()}

    def _make(self, num, seed):
        try:
            return self.procgen.ProcgenGym3Env(num=num, env_name=self.game, distribution_mode="easy", num_levels=0,
                                               start_level=int(seed) % 2 ** 31, rand_seed=int(seed) % 2 ** 31)
        except Exception as e:
            raise UserError(f"procgen:{self.game}: {str(e).splitlines()[0][:200]}") from None

    def reset(self, seed=None):
        """New levels for every world (a game of its own has no reset): the k-th reset after a seed s draws its levels
        from the seed sequence (s, k), so corpora made from nearby seeds do not share levels (s + k would)."""
        self.base, self.resets = (self.base, self.resets + 1) if seed is None else (int(seed), 0)
        self.seed = int(np.random.SeedSequence([self.base, self.resets]).generate_state(1)[0])
        self.env = self._make(self.num, self.seed)
        self.last, self.done, self.t = resize(self.env.observe()[1]["rgb"], self.size), np.zeros(self.num, bool), 0
        return self.last.copy(), {}

    def step(self, action):
        a = self.check_actions(np.asarray(action), (self.num,))
        self.env.act(a.astype(np.int32))
        rew, obs, first = self.env.observe()
        ended = first & ~self.done                                             # a new episode began: this one ended
        live = ~self.done & ~ended
        if live.any():
            self.last[live] = resize(obs["rgb"][live], self.size)
        reward = np.where(self.done, 0, rew).astype(np.float32)
        self.done, self.t = self.done | ended, self.t + 1
        return self.last.copy(), reward, ended, np.full(self.num, self.t >= self.max_steps), {}

    def get_state(self):
        return dict(env=list(self.env.get_state()), last=self.last.copy(), done=self.done.copy(), t=self.t)

    def set_state(self, state):
        if len(state["env"]) != self.num:                                    # another number of worlds: a new batch
            self.num = len(state["env"])
            self.env = self._make(self.num, self.seed)
        self.env.set_state(state["env"])
        self.last, self.done, self.t = state["last"].copy(), state["done"].copy(), state["t"]


def make_env(name, num=1, size=32, max_steps=32, seed=0, frame_skip=0):
    """The environment called `name`: a built-in world, gym:<id> or procgen:<game>. frame_skip (gym): each action
    repeated this many times, 0: the game's own choice (GymEnv.auto_skip)."""
    if frame_skip < 0:
        raise UserError(f"--frame_skip {frame_skip}: pass 1 or more (each action repeated that many times), "
                        f"or 0 for the game's default")
    if num < 1:
        raise UserError(f"{name}: {num} copies asked for; need at least 1 (episodes, clips or worlds)")
    if name.startswith("gym:"):
        return GymEnv(name[4:], num, size, max_steps, seed, frame_skip)
    if frame_skip > 1:
        raise UserError(f"--frame_skip {frame_skip} is for gym: games; '{name}' shows every step of its own: drop it")
    if name.startswith("procgen:"):
        return ProcgenEnv(name[8:], num, size, max_steps, seed)
    if name not in WORLDS:
        near = difflib.get_close_matches(name, WORLDS, n=1)
        raise UserError(f"unknown environment '{name}': " + (f"did you mean '{near[0]}'? " if near else "") +
                        f"choose one of {', '.join(WORLDS)}, gym:<gymnasium id> or procgen:<game> "
                        f"(python data.py --list; --list games)")
    return WORLDS[name](num=num, size=size, max_steps=max_steps, seed=seed)
