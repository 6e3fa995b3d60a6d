"""adapter.py — the DWS action module, attached to any backbone from the outside.

Which action drives which frame: a clip's actions[:, i] is the action that *led into* frame i
(taken at frame i-1). It conditions the tokens of frame i only, and since attention is causal
across frames, a token never sees an action that comes after its own frame. For the DiT these are
frame i's patch tokens; for the video GPT they are the N slots that predict frame i's codes
(slots i*N .. i*N+N-1, model.py), so every code of frame i is sampled knowing a_i and no later action.
One code path serves both backbones: it reads only `token_frames` and the modules they expose.

Three kinds, selected by name (`--adapter`):

    film   the DWS module (method.md §1). In every block l, on the input of the feed-forward layer:
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
import torch.nn as nn

from data import UserError
from model import per_token


class ActionEmbed(nn.Module):
    """Discrete actions: a learned table, one row per action. Continuous: a trainable linear embedder."""

    def __init__(self, spec, dim):
        super().__init__()
        self.spec = spec
        if spec["discrete"]:
            self.table = nn.Embedding(spec["n_actions"], dim)
        else:
            self.linear = nn.Linear(spec["action_dim"], dim)

    def forward(self, actions, T):
        """actions (B, T) ints, or (B, T, action_dim) floats -> (B, T, dim)."""
        s = self.spec
        if s["discrete"]:
            if actions.dim() != 2 or actions.shape[1] != T or actions.is_floating_point():
                raise UserError(f"this model takes discrete actions of shape (batch, {T}) with ids in "
                                f"[0, {s['n_actions']}); got {actions.dtype} {tuple(actions.shape)}")
            if actions.numel() and (actions.min() < 0 or actions.max() >= s["n_actions"]):
                raise UserError(f"action ids must lie in [0, {s['n_actions']}); got {actions.min().item()}..{actions.max().item()}")
            return self.table(actions)
        if actions.dim() != 3 or actions.shape[1] != T or actions.shape[2] != s["action_dim"]:
            raise UserError(f"this model takes continuous actions of shape (batch, {T}, {s['action_dim']}); "
                            f"got {tuple(actions.shape)}")
        return self.linear(actions.float())


class FiLMAdapter(nn.Module):
    """The DWS action module: per block, (alpha, beta) = g_l(c_i) modulate the feed-forward input."""

    def __init__(self, backbone, spec, embed_dim=64):
        super().__init__()
        D = backbone.cfg.width
        self.embed = ActionEmbed(spec, embed_dim)
        self.g = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, D), nn.SiLU(), nn.Linear(D, 2 * D))
                               for _ in backbone.blocks)
        for g in self.g:
            nn.init.zeros_(g[-1].weight); nn.init.zeros_(g[-1].bias)
        self._ab = None
        for l, blk in enumerate(backbone.blocks):
            blk.ffn_norm.register_forward_hook(self._hook(l, backbone))

    def condition(self, actions, T):
        c = self.embed(actions, T)                                           # (B, T, E)
        self._ab = [g(c) for g in self.g]                                    # depth x (B, T, 2D)

    def _hook(self, l, backbone):
        def film(module, inputs, out):                                       # out: LN(x), (B, L, D)
            alpha, beta = per_token(self._ab[l], backbone.token_frames).chunk(2, -1)   # (B, L, D) each
            return out * (1 + alpha) + beta
        return film


class InputAdapter(nn.Module):
    """Baseline: a zero-initialised projection of the action added to the frame's input tokens."""

    def __init__(self, backbone, spec, embed_dim=64):
        super().__init__()
        self.embed = ActionEmbed(spec, embed_dim)
        self.proj = nn.Linear(embed_dim, backbone.cfg.width)
        nn.init.zeros_(self.proj.weight); nn.init.zeros_(self.proj.bias)
        self._c = None
        backbone.embed.register_forward_hook(self._hook(backbone))

    def condition(self, actions, T):
        self._c = self.proj(self.embed(actions, T))                          # (B, T, D)

    def _hook(self, backbone):
        def add(module, inputs, out):                                        # out: tokens, (B, L, D)
            return out + per_token(self._c, backbone.token_frames)
        return add


ADAPTERS = {"film": FiLMAdapter, "input": InputAdapter, "none": None}


class WorldModel(nn.Module):
    """A backbone with (optionally) an action adapter attached: model(x, ..., actions=a) -> backbone output.

    Build a fresh one for each copy you need (e.g. EMA weights): the hooks belong to the instance."""

    def __init__(self, backbone, adapter="none", spec=None):
        super().__init__()
        if adapter not in ADAPTERS:
            raise UserError(f"unknown adapter '{adapter}': choose one of {', '.join(ADAPTERS)}")
        self.backbone = backbone
        self.kind = adapter
        self.adapter = ADAPTERS[adapter](backbone, spec) if ADAPTERS[adapter] else None

    def forward(self, x, *args, actions=None, **kw):
        """x (B, T, ...) a clip, pixels (DiT) or codes (GPT); the rest goes to the backbone as is.
        actions (B, T, ...): actions[:, i] leads into frame i."""
        if self.adapter is not None:
            if actions is None:
                raise UserError("this model has an action adapter: pass the actions that lead into each frame")
            self.adapter.condition(actions.to(x.device), x.shape[1])
        return self.backbone(x, *args, **kw)
