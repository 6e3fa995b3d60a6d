"""adapter.py — the DWS action module, attached to any backbone from the outside.

Which action drives which frame: a clip's actions[:, i] is the action that *led into* frame i
(taken at frame i-1). It conditions the tokens of frame i only, and since attention is causal
across frames, a token never sees an action that comes after its own frame. For the DiT these are
frame i's patch tokens; for the video GPT they are the N slots that predict frame i's codes
(slots i*N .. i*N+N-1, model.py), so every code of frame i is sampled knowing a_i and no later action.
One code path serves both backbones: it reads only `token_frames` and the modules they expose.

Three kinds, selected by name (`--adapter`):

    film   the DWS universal action module. In every block l, on the input of the feed-forward layer:
               x_i <- x_i + FFN( LN(x_i) * (1 + alpha_i) + beta_i ),   (alpha_i, beta_i) = g_l(c_i)
           c_i is frame i's action embedding and g_l two linear layers (Linear -> SiLU -> Linear to
           2D), the last zero-initialised: attaching it to a trained backbone changes no output.
    input  the input-level baseline (as in iVideoGPT): one zero-initialised linear projection of
           c_i added to every input token of frame i.
    none   the pre-trained model as is: actions are ignored.

The adapter never edits the backbone's code: it registers forward hooks on the modules the
backbone exposes (`blocks[l].ffn_norm` for film, `embed` for input) and reads
`backbone.token_frames` to broadcast each frame's (alpha, beta) to that frame's tokens.
"""
import functools

import torch
import torch.nn as nn

from envs import UserError
from model import per_token


def check_actions(actions, spec, T, values=False):
    """Raise a UserError unless actions fit the spec: (B, T) integer ids in [0, n_actions) for discrete actions,
    (B, T, action_dim) finite floats for continuous ones. Shapes and types are checked on every forward; values
    (values=True) only once per rollout, since reading them makes a GPU wait."""
    n, A = spec["n_actions"], spec["action_dim"]
    if spec["discrete"]:
        if actions.dim() != 2 or actions.shape[1] != T or actions.is_floating_point() or actions.dtype == torch.bool:
            raise UserError(f"this model takes discrete actions of shape (batch, {T}) with integer ids in [0, {n}); "
                            f"got {actions.dtype} {tuple(actions.shape)}")
        if values and actions.numel() and (actions.min() < 0 or actions.max() >= n):
            raise UserError(f"action ids must lie in [0, {n}); got {actions.min().item()}..{actions.max().item()}")
    elif actions.dim() != 3 or actions.shape[1] != T or actions.shape[2] != A or not actions.is_floating_point():
        raise UserError(f"this model takes continuous actions of shape (batch, {T}, {A}), floats in [-1, 1]; "
                        f"got {actions.dtype} {tuple(actions.shape)}")
    elif values and not torch.isfinite(actions).all():
        raise UserError("the continuous actions hold NaN or inf: pass finite values in [-1, 1]")


class ActionEmbed(nn.Module):
    """Discrete actions: a learned table, one row per action. Continuous: a trainable linear embedder."""

    def __init__(self, spec, dim):
        super().__init__()
        self.spec = spec
        if spec["discrete"]:
            self.table = nn.Embedding(spec["n_actions"], dim)
        else:
            self.linear = nn.Linear(spec["action_dim"], dim)

    def forward(self, actions):
        """actions (B, T) ints, or (B, T, action_dim) floats -> (B, T, dim)."""
        return self.table(actions) if self.spec["discrete"] else self.linear(actions.float())


class Adapter(nn.Module):
    """What the two adapters share: an action embedding, and conditioning that lives for one forward pass only.

    condition(actions) stores what the hooks read; WorldModel clears it when the backbone returns, so a backbone
    called on its own afterwards fails loudly instead of reusing stale actions. The hooks are bound methods: a
    copy.deepcopy of the WorldModel (an EMA copy, say) gets hooks bound to the copy, reading the copy's actions."""

    def __init__(self, backbone, spec, embed_dim):
        super().__init__()
        self.embed = ActionEmbed(spec, embed_dim)
        object.__setattr__(self, "backbone", backbone)   # read by the hooks, not a submodule of the adapter
        self.cond = None

    def modulation(self, i):
        """The i-th per-frame conditioning tensor (B, T, K), broadcast to the backbone's current tokens (B, L, K)."""
        if self.cond is None:
            raise RuntimeError("this backbone has an action adapter attached: call its WorldModel with actions, "
                               "not the backbone on its own")
        return per_token(self.cond[i], self.backbone.token_frames)


class FiLMAdapter(Adapter):
    """The DWS action module: per block, (alpha, beta) = g_l(c_i) modulate the feed-forward input."""

    def __init__(self, backbone, spec, embed_dim=64):
        super().__init__(backbone, spec, embed_dim)
        D = backbone.cfg.width
        self.g = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, D), nn.SiLU(), nn.Linear(D, 2 * D))
                               for _ in backbone.blocks)
        for g in self.g:
            nn.init.zeros_(g[-1].weight); nn.init.zeros_(g[-1].bias)
        for l, blk in enumerate(backbone.blocks):
            blk.ffn_norm.register_forward_hook(functools.partial(self.film, l))

    def condition(self, actions):
        c = self.embed(actions)                                              # (B, T, E)
        self.cond = [g(c) for g in self.g]                                   # depth x (B, T, 2D)

    def film(self, l, module, inputs, out):                                  # out: LN(x), (B, L, D)
        alpha, beta = self.modulation(l).chunk(2, -1)                        # (B, L, D) each
        return out * (1 + alpha) + beta


class InputAdapter(Adapter):
    """Baseline: a zero-initialised projection of the action added to the frame's input tokens."""

    def __init__(self, backbone, spec, embed_dim=64):
        super().__init__(backbone, spec, embed_dim)
        self.proj = nn.Linear(embed_dim, backbone.cfg.width)
        nn.init.zeros_(self.proj.weight); nn.init.zeros_(self.proj.bias)
        backbone.embed.register_forward_hook(self.add)

    def condition(self, actions):
        self.cond = [self.proj(self.embed(actions))]                         # (B, T, D)

    def add(self, module, inputs, out):                                      # out: tokens, (B, L, D)
        return out + self.modulation(0)


ADAPTERS = {"film": FiLMAdapter, "input": InputAdapter, "none": None}


class WorldModel(nn.Module):
    """A backbone with (optionally) an action adapter attached: model(x, ..., actions=a) -> backbone output.
    copy.deepcopy gives an independent, working copy (hooks included)."""

    def __init__(self, backbone, adapter="none", spec=None):
        super().__init__()
        if adapter not in ADAPTERS:
            raise UserError(f"unknown adapter '{adapter}': choose one of {', '.join(ADAPTERS)}")
        self.backbone = backbone
        self.kind, self.spec = adapter, spec
        self.adapter = ADAPTERS[adapter](backbone, spec) if ADAPTERS[adapter] else None

    def forward(self, x, *args, actions=None, **kw):
        """x (B, T, ...) a clip, pixels (DiT) or codes (GPT); the rest goes to the backbone as is.
        actions (B, T, ...): actions[:, i] leads into frame i."""
        if self.adapter is None:
            return self.backbone(x, *args, **kw)
        if actions is None:
            raise UserError("this model has an action adapter: pass the actions that lead into each frame")
        if actions.shape[0] != x.shape[0]:
            raise UserError(f"a batch of {x.shape[0]} clips needs {x.shape[0]} action sequences; got {actions.shape[0]}")
        check_actions(actions, self.spec, x.shape[1])
        self.adapter.condition(actions.to(x.device))
        try:
            return self.backbone(x, *args, **kw)
        finally:
            self.adapter.cond = None
