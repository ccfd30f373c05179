"""MM-DiT, the text-to-image transformer of SD3 (docs/paper.md §4), with SD3.5's MMDiT-X dual attention.

Two token streams (text context, image patches) with separate weights meet in one joint attention per block; a
conditioning vector c = t_embedder(t) + y_embedder(pooled text) drives every adaLN. Module names mirror the released
checkpoints' keys (`joint_blocks.N.x_block.attn.qkv`, `final_layer.linear`, ...), so a released state dict is a plain
`load_state_dict` (see rectflow.checkpoints for files, the diffusers layout and config inference).

Positions (docs/paper.md §4 "Mixed aspect ratios"): tokens sit on the paper's extended-and-interpolated grid,
centred on the reference side s = input_size / patch_size and scaled by pos_embed_base_size / input_size (the
pretraining side over the current one). With pos_embed_max_size = M the grid is a fixed M x M table (a `pos_embed`
buffer, as in the released files) that is centre-cropped to each input; without it the grid is computed for any
H x W.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rectflow.models.layers import (
    embed_inputs,
    unpatchify,
    init_weights,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    VectorEmbedder,
    gated_residual,
    layer_norm,
    make_qk_norm,
    modulate,
    position_grid,
    sincos_2d,
)
from rectflow.models.released import CheckpointError, check_state_dict, infer_config, metadata_config, read_released

# bf16 CPU attention with at most this many scores per head (L_q * L_k, ~724^2) uses two matmuls instead of SDPA (see
# attention()); above it PyTorch's flash kernel is faster (1.3-1.4x at L = 1024, 3-24 heads) and needs less memory.
MATMUL_ATTENTION_MAX = 1 << 19

CONFIG_KEYS = (
    "depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels", "context_dim", "pooled_dim",
    "input_size", "qk_norm", "dual_attention_layers", "pos_embed_max_size", "pos_embed_base_size", "mlp_ratio",
    "registers", "text_positions",
)
# config key -> what it adds: rectflow's own token options, which no released or diffusers layout has
RECTFLOW_TOKENS: dict[str, str] = {"registers": "register tokens", "text_positions": "learned text positions"}


class SelfAttention(nn.Module):
    """One stream's attention weights: fused QKV projection, per-head QK norm, output projection (not if pre-only)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.pre_only = pre_only
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
        self.ln_q = make_qk_norm(qk_norm, self.head_dim)
        self.ln_k = make_qk_norm(qk_norm, self.head_dim)

    def heads(self, proj: torch.Tensor, parts: int = 3):
        """Split a fused projection [B, L, parts * h] into q, k, v [B, L, H, D] (q None when parts == 2: keys and
        values only), with q and k normalised per head."""
        chunks = proj.unflatten(-1, (parts, self.num_heads, self.head_dim)).unbind(2)
        q, k, v = chunks if parts == 3 else (None, *chunks)
        if self.ln_q is not None:
            q, k = (None if q is None else self.ln_q(q)), self.ln_k(k)
        return q, k, v

    def key_value(self, x: torch.Tensor) -> torch.Tensor:
        """The k, v rows of the fused projection only, [B, L, 2h]: a pre-only stream's queries would be discarded.
        A wrapped projection (a LoRA layer, rectflow.lora) is run whole and sliced: its update spans all rows."""
        if type(self.qkv) is not nn.Linear:
            return self.qkv(x)[..., self.qkv.in_features:]
        h = self.qkv.weight.shape[1]
        return F.linear(x, self.qkv.weight[h:], self.qkv.bias[h:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention over one stream (MMDiT-X's second image attention): [B, L, h] -> [B, L, h]."""
        q, k, v = self.heads(self.qkv(x))
        return self.proj(attention(q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of q, k, v [B, L, H, D] -> [B, L, H * D] over [B, H, L, D] views, no loop over heads.

    F.scaled_dot_product_attention, except for bf16 on the CPU with up to MATMUL_ATTENTION_MAX scores per head: there
    PyTorch's CPU flash kernel is 1.3-3x slower (forward + backward, measured at L 96-512, D 64, 3-24 heads) than two
    bf16 matmuls around a softmax, which are used instead. Their scores are rounded to bf16 before the softmax (as in
    pre-flash autocast attention); against an fp64 reference the error stays at bf16 level (RMS 0.5-1.1% of the
    output's std, vs 0.4-0.5% for the flash kernel and 0.3-0.5% from rounding the inputs alone).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] * k.shape[2] <= MATMUL_ATTENTION_MAX:
        out = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def joint_attention(context_attn: SelfAttention, context_in: torch.Tensor, x_attn: SelfAttention,
                    x_in: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention over the concatenated [context; image] sequence, split back per stream (docs/paper.md §4).

    A pre-only context stream contributes keys and values only (its outputs would be discarded) and gets None back.
    """
    x_qkv = x_attn.qkv(x_in)
    n_ctx = context_in.shape[1]
    if context_attn.pre_only:
        _, ck, cv = context_attn.heads(context_attn.key_value(context_in), parts=2)
        xq, xk, xv = x_attn.heads(x_qkv)
        return None, attention(xq, torch.cat([ck, xk], dim=1), torch.cat([cv, xv], dim=1))
    context_qkv = context_attn.qkv(context_in)
    if context_attn.ln_q is None:
        # one concatenation of the fused projections; q, k, v are then views
        q, k, v = x_attn.heads(torch.cat([context_qkv, x_qkv], dim=1))
    else:
        # each stream normalises with its own QK-norm weights before the sequences meet
        cq, ck, cv = context_attn.heads(context_qkv)
        xq, xk, xv = x_attn.heads(x_qkv)
        q, k, v = torch.cat([cq, xq], dim=1), torch.cat([ck, xk], dim=1), torch.cat([cv, xv], dim=1)
    out = attention(q, k, v)
    return out[:, :n_ctx], out[:, n_ctx:]


class StreamBlock(nn.Module):
    """One stream's half of a joint block: adaLN modulation, attention weights and MLP (docs/paper.md §4).

    The adaLN produces shift, scale, gate for attention and MLP (6 x h); 9 x h with MMDiT-X's second attention
    (its own shift, scale, gate on the same normalised input); 2 x h (shift, scale) for the pre-only last context
    block, which only feeds keys and values to the joint attention.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        if pre_only and dual_attention:
            raise ValueError("a pre-only (last context) block cannot have a second attention")
        self.pre_only = pre_only
        self.n_mod = 2 if pre_only else 9 if dual_attention else 6
        # SiLU is index 0 so the Linear is `adaLN_modulation.1` as in the released files; the model applies SiLU to c
        # once for all blocks and calls the Linear directly.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.n_mod * hidden_size))
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(hidden_size, num_heads, qk_norm) if dual_attention else None
        self.mlp = None if pre_only else Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def modulation(self, c_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The adaLN parameters from SiLU(c) [B, h]: n_mod tensors [B, h]."""
        return self.adaLN_modulation[1](c_act).chunk(self.n_mod, dim=1)

    def pre_attention(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm(x) and the attention input LayerNorm(x) * (1 + scale) + shift of this stream."""
        normed = layer_norm(x)
        return normed, torch.addcmul(mod[0].unsqueeze(1), normed, (1 + mod[1]).unsqueeze(1))

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, normed: torch.Tensor,
                       mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Gated residual updates: joint attention, MMDiT-X second attention, then MLP."""
        x = gated_residual(x, mod[2], self.attn.proj(attn_out))
        if self.attn2 is not None:
            attn2_in = torch.addcmul(mod[6].unsqueeze(1), normed, (1 + mod[7]).unsqueeze(1))
            x = gated_residual(x, mod[8], self.attn2(attn2_in))
        return gated_residual(x, mod[5], self.mlp(modulate(x, mod[3], mod[4])))


class JointBlock(nn.Module):
    """One MM-DiT block: a context stream and an image stream joined in one attention (docs/paper.md §4)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                 pre_only: bool, dual_attention: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c_act: torch.Tensor):
        """(context [B, Lc, h], x [B, Lx, h], SiLU(c) [B, h]) -> updated (context or None if pre-only, x)."""
        c_mod = self.context_block.modulation(c_act)
        x_mod = self.x_block.modulation(c_act)
        c_normed, c_in = self.context_block.pre_attention(context, c_mod)
        x_normed, x_in = self.x_block.pre_attention(x, x_mod)
        c_out, x_out = joint_attention(self.context_block.attn, c_in, self.x_block.attn, x_in)
        x = self.x_block.post_attention(x, x_out, x_normed, x_mod)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, c_out, c_normed, c_mod), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> Linear(h, p * p * C_out) (docs/paper.md §4)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, h] and SiLU(c) -> patch outputs [B, L, p * p * C_out]."""
        shift, scale = self.adaLN_modulation[1](c_act).chunk(2, dim=1)
        return self.linear(modulate(x, shift, scale))


class MMDiT(nn.Module):
    """MM-DiT: model(x [B,C,H,W], t [B] in [0,1], context [B,L,context_dim], y [B,pooled_dim]) -> [B,C_out,H,W]."""

    def __init__(self, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2, in_channels: int = 16,
                 out_channels: int | None = None, context_dim: int = 4096, pooled_dim: int = 2048,
                 input_size: int = 32, qk_norm: str | None = None, dual_attention_layers=(),
                 pos_embed_max_size: int | None = None, pos_embed_base_size: int | None = None,
                 mlp_ratio: float = 4.0, registers: int = 0, text_positions: int = 0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        pos_embed_base_size = input_size if pos_embed_base_size is None else pos_embed_base_size
        dual_attention_layers = sorted(int(i) for i in dual_attention_layers)
        self._check_config(depth, hidden_size, num_heads, patch_size, input_size, dual_attention_layers,
                           pos_embed_max_size)
        self._config = dict(
            depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
            in_channels=in_channels, out_channels=out_channels, context_dim=context_dim, pooled_dim=pooled_dim,
            input_size=input_size, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
            pos_embed_max_size=pos_embed_max_size, pos_embed_base_size=pos_embed_base_size,
            mlp_ratio=float(mlp_ratio), **({"registers": int(registers)} if registers else {}),
            **({"text_positions": int(text_positions)} if text_positions else {}))
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # register tokens (docs/training.md "Learning speed"): not in the released layouts, so only when asked for
        self.registers = nn.Parameter(torch.randn(1, registers, hidden_size) * 0.02) if registers else None
        # learned text positions (a rectflow option too): the joint attention is blind to token order, and a sentence
        # encoder's features carry it only weakly. Zero at init, so adding them to a trained model keeps its output
        self.text_positions = nn.Parameter(torch.zeros(1, text_positions, hidden_size)) if text_positions else None
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=i == depth - 1,
                       dual_attention=i in dual_attention_layers)
            for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self._pos_cache: dict = {}
        if pos_embed_max_size is not None:
            m = pos_embed_max_size
            self.register_buffer("pos_embed", self._grid_embedding(m, m, total=m).unsqueeze(0))
        else:
            self.pos_embed = None
        self.initialize_weights()

    @staticmethod
    def _check_config(depth, hidden_size, num_heads, patch_size, input_size, dual_attention_layers, max_size):
        """Reject configurations the architecture cannot build, naming the offending value."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D position embedding, got {hidden_size}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        bad = [i for i in dual_attention_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside 0..{depth - 1}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"pos_embed_max_size must be a positive token count, got {max_size}")

    # ----- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_depth(cls, d: int, patch_size: int = 2, in_channels: int = 16, out_channels: int | None = None,
                   context_dim: int = 4096, pooled_dim: int = 2048, input_size: int = 32, qk_norm: str | None = None,
                   dual_attention_layers=(), pos_embed_max_size: int | None = None, hidden_size: int | None = None,
                   num_heads: int | None = None, **kw) -> "MMDiT":
        """The paper's size rule (docs/paper.md §4): depth d, hidden 64 d, d heads (head dim 64) unless overridden."""
        return cls(depth=d, hidden_size=64 * d if hidden_size is None else hidden_size,
                   num_heads=d if num_heads is None else num_heads, patch_size=patch_size, in_channels=in_channels,
                   out_channels=out_channels, context_dim=context_dim, pooled_dim=pooled_dim, input_size=input_size,
                   qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
                   pos_embed_max_size=pos_embed_max_size, **kw)

    @classmethod
    def from_config(cls, config: dict) -> "MMDiT":
        """Build from a `model.config` dict (unknown keys are an error, missing ones take the defaults)."""
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown MMDiT config keys {unknown}; accepted: {list(CONFIG_KEYS)}")
        return cls(**config)

    @classmethod
    def from_single_file(cls, path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> "MMDiT":
        """Load a released SD3 / SD3.5 (or rectflow MM-DiT) single file; the config is read off its keys and shapes (or
        a rectflow file's metadata). A file of another architecture is an error (rectflow.checkpoints.load_model
        loads any)."""
        sd, metadata = read_released(path, allow_pickle=allow_pickle)
        config = metadata_config(metadata, path) or infer_config(sd, source=path)
        if config.get("arch", "mmdit") != "mmdit":
            raise CheckpointError(f"{path} holds a {config['arch']!r} model of the architecture study, not an MM-DiT; "
                                  f"load it with rectflow.checkpoints.load_model")
        with torch.device("meta"):  # no memory spent on a random init: the file's tensors are assigned
            model = cls.from_config({k: v for k, v in config.items() if k != "arch"})
        check_state_dict(model, sd, path)
        model.load_state_dict(sd, assign=True)
        return model if dtype is None else model.to(dtype)

    @property
    def config(self) -> dict:
        """The JSON-serialisable constructor arguments (MMDiT.from_config(model.config) rebuilds the model)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    def initialize_weights(self) -> None:
        """DiT-style init: xavier linears, N(0, 0.02) embedder MLPs, zero adaLN (gates) and zero final layer."""
        init_weights(self)

    # ----- positions (docs/paper.md §4 "Mixed aspect ratios") -------------------------------------------------

    def _grid_embedding(self, h: int, w: int, total: int | None = None) -> torch.Tensor:
        """Sin-cos embedding [h * w, hidden] of the extended-and-interpolated grid, centre-cropped to h x w."""
        cfg = self._config
        ref = cfg["input_size"] / cfg["patch_size"]
        scale = cfg["pos_embed_base_size"] / cfg["input_size"]
        pos_y = position_grid(h, ref, scale, total)
        pos_x = position_grid(w, ref, scale, total)
        return sincos_2d(pos_y, pos_x, cfg["hidden_size"]).float()

    def _text_positions(self, length: int) -> torch.Tensor:
        """The learned positions [1, length, hidden] of the first `length` text tokens."""
        if length > self.text_positions.shape[1]:
            raise ValueError(f"{length} text tokens exceed the model's {self.text_positions.shape[1]} learned text "
                             f"positions (text_positions); use a text encoder of at most that length")
        return self.text_positions[:, :length]

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding [1, h * w, hidden] for an h x w token grid (a crop of the table, or computed)."""
        if self.pos_embed is not None:
            m = self._config["pos_embed_max_size"]
            if h > m or w > m:
                raise ValueError(f"a {h} x {w} token grid exceeds the position table's {m} x {m} "
                                 f"(pos_embed_max_size); use smaller inputs or a larger table")
            top, left = (m - h) // 2, (m - w) // 2
            table = self.pos_embed.view(1, m, m, -1)
            return table[:, top:top + h, left:left + w].reshape(1, h * w, -1)
        device = self.x_embedder.proj.weight.device
        key = (h, w, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = self._grid_embedding(h, w).unsqueeze(0).to(device)
        return self._pos_cache[key]

    def set_position_grid(self, input_size: int, pos_embed_base_size: int | None = None) -> None:
        """Re-centre and re-scale the position grid for training at a new resolution (docs/paper.md §4): input_size is
        the new reference latent side, pos_embed_base_size the pretraining one (default: unchanged). A table is
        rebuilt."""
        base = self._config["pos_embed_base_size"] if pos_embed_base_size is None else pos_embed_base_size
        if input_size % self.patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {self.patch_size}")
        self._config.update(input_size=input_size, pos_embed_base_size=base)
        self._pos_cache.clear()
        if self.pos_embed is not None:
            m = self._config["pos_embed_max_size"]
            table = self._grid_embedding(m, m, total=m).unsqueeze(0)
            self.pos_embed.copy_(table.to(self.pos_embed.dtype))

    # ----- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                skip_layers=(), route=None) -> torch.Tensor:
        """Predict the model output for latents x at times t in [0, 1] (t = 0 data, t = 1 noise); the joint blocks
        in skip_layers are left out (both streams pass them unchanged: skip-layer guidance, rectflow.sampling).

        route: (start, end, keep [B, K]) token routing in training (TREAD, docs/training.md "Learning speed"): only
        the image tokens `keep` of each sample go through blocks start..end-1; the others skip them unchanged and
        rejoin before block `end` (positions were added at the embedding, so nothing else changes)."""
        tokens, c_act, h, w, dtype = embed_inputs(self, x, t, y)
        ctx = self.context_embedder(context.to(dtype))
        if self.text_positions is not None:
            ctx = ctx + self._text_positions(ctx.shape[1]).to(ctx.dtype)
        if self.registers is not None:  # learned tokens beside the text: scratch space for the joint attention
            ctx = torch.cat([ctx, self.registers.to(ctx.dtype).expand(ctx.shape[0], -1, -1)], dim=1)
        skip = set(skip_layers or ())
        start, end, keep = route if route is not None else (-1, -1, None)
        for i, block in enumerate(self.joint_blocks):
            if i == start:
                index = keep.to(tokens.device)[..., None].expand(-1, -1, tokens.shape[-1])
                full, tokens = tokens, tokens.gather(1, index)
            if i == end:
                tokens = full.scatter(1, index, tokens)
            if i in skip:
                continue
            every = int(self.gradient_checkpointing)  # True: every block; k: blocks 0, k, 2k, ...
            if every and i % every == 0 and torch.is_grad_enabled():
                ctx, tokens = checkpoint(block, ctx, tokens, c_act, use_reentrant=False)
            else:
                ctx, tokens = block(ctx, tokens, c_act)
        out = self.final_layer(tokens, c_act)
        return self.unpatchify(out, h, w)

    def unpatchify(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Patch outputs [B, h * w, p * p * C] (ordered p, p, C) -> image [B, C, h p, w p]."""
        return unpatchify(out, h, w, self.patch_size, self.out_channels)
