"""The architecture study's baselines (docs/paper.md §4): DiT, CrossDiT, UViT and MM-DiT with three weight sets.

(Over 400 lines on purpose: the four networks of one study and the parameter matching that makes them comparable
read side by side, each class short.)

All share MM-DiT's interface and pieces (rectflow.models.layers, the MM-DiT stream block and final layer):
model(x [B,C,H,W], t [B] in [0,1], context [B,L,context_dim], y [B,pooled_dim]) -> [B,C_out,H,W], a JSON config
(`model.config`, with an "arch" key) and `from_config`. The conditioning vector c = t_embedder(t) + y_embedder(y)
drives every adaLN, exactly as in MM-DiT, so the variants differ only in how text and image tokens meet:

- dit: text and image tokens concatenated into one sequence, one weight set for both (the paper's "vanilla DiT").
- crossdit: image tokens self-attend, then cross-attend to the (embedded, otherwise unprocessed) text tokens.
- uvit: dit's blocks with long skip connections from each shallow block to its mirror among the deep blocks
  (U-ViT style: the deep block's input is Linear(2h, h) of [tokens; skipped tokens]).
- mmdit3: MM-DiT with one weight set per text part plus the image stream ("CLIP and T5 separate"). The context is
  cut along the sequence by `context_splits` (token counts, e.g. [77, 77] for SD3's CLIP + T5 context). With a
  single-encoder context (MiniLM) and context_splits=None, the first ceil(L/2) tokens form one part and the rest the
  other: the extra weight set then separates the two halves of one caption's tokens, which is the closest a
  one-encoder setup gets to the paper's study.

`matched(arch, target)` picks depth and width so a baseline's parameter count is within 5% of a target (an MM-DiT,
its config, or a count); `from_config` builds any of these or a plain MM-DiT.
"""
from __future__ import annotations

import math

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
    make_qk_norm,
    modulate,
    position_grid,
    sincos_2d,
)
from rectflow.models.mmdit import FinalLayer, MMDiT, SelfAttention, StreamBlock, attention

COMMON_KEYS = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels", "context_dim",
               "pooled_dim", "input_size", "qk_norm", "mlp_ratio")
IO_KEYS = ("patch_size", "in_channels", "out_channels", "context_dim", "pooled_dim", "input_size", "qk_norm",
           "mlp_ratio")  # what a matched model copies from its target


# The baselines use MM-DiT's per-stream block (StreamBlock) as a container of weights, through its module names,
# which mirror the released checkpoints' keys: adaLN_modulation.1, attn.qkv, attn.ln_q / ln_k, attn.proj, mlp.


def stream_modulation(block: StreamBlock, c_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """adaLN parameters from SiLU(c): shift, scale, gate for attention and MLP (shift, scale if pre-only)."""
    out = block.adaLN_modulation[1](c_act)
    return out.chunk(out.shape[1] // c_act.shape[1], dim=1)


def stream_qkv(block: StreamBlock, x: torch.Tensor, mod: tuple[torch.Tensor, ...], num_heads: int):
    """q, k, v [B, L, H, D] of a stream: modulated LayerNorm, fused projection, per-head QK norm."""
    q, k, v = block.attn.qkv(modulate(x, mod[0], mod[1])).unflatten(-1, (3, num_heads, -1)).unbind(2)
    if block.attn.ln_q is not None:
        q, k = block.attn.ln_q(q), block.attn.ln_k(k)
    return q, k, v


def stream_update(block: StreamBlock, x: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...]):
    """Gated residual updates of a stream: attention output projection, then the adaLN MLP."""
    x = gated_residual(x, mod[2], block.attn.proj(attn_out))
    return gated_residual(x, mod[5], block.mlp(modulate(x, mod[3], mod[4])))


def self_attention_step(block: StreamBlock, tokens: torch.Tensor, c_act: torch.Tensor, num_heads: int):
    """A DiT block out of one MM-DiT stream block: adaLN, self-attention over its own tokens, MLP."""
    mod = stream_modulation(block, c_act)
    return stream_update(block, tokens, attention(*stream_qkv(block, tokens, mod, num_heads)), mod)


class Baseline(nn.Module):
    """What every variant shares: embedders, position grid, final layer, init, config and unpatchify."""

    arch = ""
    EXTRA_KEYS: tuple[str, ...] = ()

    def __init__(self, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2, in_channels: int = 16,
                 out_channels: int | None = None, context_dim: int = 4096, pooled_dim: int = 2048,
                 input_size: int = 32, qk_norm: str | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        problems = [f"depth must be >= 1, got {depth}"] if depth < 1 else []
        if hidden_size % num_heads:
            problems.append(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            problems.append(f"hidden_size must be divisible by 4 (2-D sin-cos positions), got {hidden_size}")
        if input_size % patch_size:
            problems.append(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self._config = dict(arch=self.arch, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
                            context_dim=context_dim, pooled_dim=pooled_dim, input_size=input_size, qk_norm=qk_norm,
                            mlp_ratio=float(mlp_ratio))
        self.patch_size, self.out_channels = patch_size, out_channels
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self._pos_cache: dict = {}

    @classmethod
    def from_config(cls, config: dict) -> "Baseline":
        """Build from `model.config` (its "arch" must name this class; unknown keys are an error)."""
        config = dict(config)
        arch = config.pop("arch", cls.arch)
        if arch != cls.arch:
            raise ValueError(f"config has arch {arch!r}, expected {cls.arch!r} for {cls.__name__}")
        unknown = sorted(set(config) - set(COMMON_KEYS) - set(cls.EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} config keys {unknown}; accepted: "
                             f"{['arch', *COMMON_KEYS, *cls.EXTRA_KEYS]}")
        return cls(**config)

    @property
    def config(self) -> dict:
        """The JSON-serialisable constructor arguments plus "arch" (from_config(model.config) rebuilds it)."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self._config.items()}

    def initialize_weights(self) -> None:
        """MM-DiT's init: xavier linears, N(0, 0.02) embedder MLPs, zero adaLN and final layer (output starts at 0)."""
        init_weights(self)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Sin-cos embedding [1, h * w, hidden] of the token grid, centred on the reference grid as in MM-DiT."""
        device = self.x_embedder.proj.weight.device
        key = (h, w, device)
        if key not in self._pos_cache:
            ref = self._config["input_size"] / self.patch_size
            emb = sincos_2d(position_grid(h, ref, 1.0), position_grid(w, ref, 1.0), self._config["hidden_size"])
            self._pos_cache[key] = emb.float().unsqueeze(0).to(device)
        return self._pos_cache[key]

    def _call(self, fn, *args):
        """Run one block, recomputing it in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def mix(self, ctx: torch.Tensor, tokens: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """The variant's transformer: (text tokens, image tokens, SiLU(c)) -> image tokens."""
        raise NotImplementedError  # each architecture defines how text and image tokens meet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the model output for latents x at times t in [0, 1] (t = 0 data, t = 1 noise)."""
        tokens, c_act, h, w, dtype = embed_inputs(self, x, t, y)
        tokens = self.mix(self.context_embedder(context.to(dtype)), tokens, c_act)
        return self.unpatchify(self.final_layer(tokens, c_act), h, w)

    def unpatchify(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Patch outputs [B, h * w, p * p * C] (ordered p, p, C, as MM-DiT) -> image [B, C, h p, w p]."""
        return unpatchify(out, h, w, self.patch_size, self.out_channels)


class DiT(Baseline):
    """Vanilla DiT for text: [text; image] tokens in one sequence, one weight set (docs/paper.md §4, architecture
    study)."""

    arch = "dit"

    def __init__(self, depth: int, hidden_size: int, num_heads: int, **kw):
        super().__init__(depth, hidden_size, num_heads, **kw)
        mlp_ratio, qk_norm = self._config["mlp_ratio"], self._config["qk_norm"]
        self.blocks = nn.ModuleList(StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.initialize_weights()

    def mix(self, ctx, tokens, c_act):
        """Joint self-attention over the concatenated sequence; the image tokens are read off its end."""
        n_ctx = ctx.shape[1]
        seq = torch.cat([ctx, tokens], dim=1)
        for block in self.blocks:
            seq = self._call(self_attention_step, block, seq, c_act, self._config["num_heads"])
        return seq[:, n_ctx:]


class UViT(DiT):
    """DiT with long skips: block depth-1-i takes Linear(2h, h)([tokens; output of block i]) for i < depth // 2."""

    arch = "uvit"

    def __init__(self, depth: int, hidden_size: int, num_heads: int, **kw):
        super().__init__(depth, hidden_size, num_heads, **kw)
        self.skips = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2))
        self.initialize_weights()

    def mix(self, ctx, tokens, c_act):
        """Shallow blocks push their outputs, the mirrored deep blocks pop and fuse them (U-Net-like)."""
        n_ctx, depth, n_skip = ctx.shape[1], len(self.blocks), len(self.skips)
        seq, stack = torch.cat([ctx, tokens], dim=1), []
        for i, block in enumerate(self.blocks):
            if i >= depth - n_skip:
                seq = self.skips[i - (depth - n_skip)](torch.cat([seq, stack.pop()], dim=-1))
            seq = self._call(self_attention_step, block, seq, c_act, self._config["num_heads"])
            if i < n_skip:
                stack.append(seq)
        return seq[:, n_ctx:]


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text tokens, then an output projection."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.ln_q = make_qk_norm(qk_norm, self.head_dim)
        self.ln_k = make_qk_norm(qk_norm, self.head_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """x [B, Lx, h] attends to ctx [B, Lc, h] -> [B, Lx, h]."""
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = self.kv(ctx).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return self.proj(attention(q, k, v))


class CrossBlock(nn.Module):
    """DiT block with cross-attention: adaLN self-attention, cross-attention to the text, adaLN MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """Update image tokens x [B, Lx, h] given text tokens ctx and SiLU(c)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation[1](c_act).chunk(6, dim=1)
        x = gated_residual(x, gate1, self.attn(modulate(x, shift1, scale1)))
        # the cross-attention is not modulated (t and y already steer the other two sub-layers)
        x = x + self.cross_attn(F.layer_norm(x, x.shape[-1:], eps=1e-6), ctx)
        return gated_residual(x, gate2, self.mlp(modulate(x, shift2, scale2)))


class CrossDiT(Baseline):
    """DiT whose image tokens cross-attend to the text tokens (docs/paper.md §4 architecture study)."""

    arch = "crossdit"

    def __init__(self, depth: int, hidden_size: int, num_heads: int, **kw):
        super().__init__(depth, hidden_size, num_heads, **kw)
        mlp_ratio, qk_norm = self._config["mlp_ratio"], self._config["qk_norm"]
        self.blocks = nn.ModuleList(CrossBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.initialize_weights()

    def mix(self, ctx, tokens, c_act):
        """Every block reads the same embedded text tokens."""
        for block in self.blocks:
            tokens = self._call(block, tokens, ctx, c_act)
        return tokens


class MultiStreamBlock(nn.Module):
    """A joint block with one weight set per text part plus the image stream; one attention over all tokens."""

    def __init__(self, n_text: int, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: str | None,
                 pre_only: bool):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        self.context_blocks = nn.ModuleList(
            StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only) for _ in range(n_text))
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(self, *args: torch.Tensor) -> tuple:
        """(text parts 1..k, image tokens, SiLU(c)) -> the updated streams (text ones None if pre-only)."""
        *streams, c_act = args
        blocks = [*self.context_blocks, self.x_block]
        mods = [stream_modulation(b, c_act) for b in blocks]
        # each stream projects (and QK-normalises) with its own weights before the sequences meet
        qkv = [stream_qkv(b, s, m, self.num_heads) for b, s, m in zip(blocks, streams, mods)]
        k, v = (torch.cat([part[i] for part in qkv], dim=1) for i in (1, 2))
        if self.pre_only:  # the text streams' outputs would be discarded: only the image tokens query
            return (*[None] * len(self.context_blocks), stream_update(self.x_block, streams[-1],
                                                                      attention(qkv[-1][0], k, v), mods[-1]))
        q = torch.cat([part[0] for part in qkv], dim=1)
        outs = attention(q, k, v).split([s.shape[1] for s in streams], dim=1)
        return tuple(stream_update(b, s, o, m) for b, s, o, m in zip(blocks, streams, outs, mods))


class MMDiT3(Baseline):
    """MM-DiT with 3 weight sets: separate streams for the two context parts (CLIP, T5) and the image."""

    arch = "mmdit3"
    EXTRA_KEYS = ("context_splits",)

    def __init__(self, depth: int, hidden_size: int, num_heads: int, context_splits=None, **kw):
        super().__init__(depth, hidden_size, num_heads, **kw)
        if context_splits is not None:
            context_splits = [int(n) for n in context_splits]
            if len(context_splits) != 2 or min(context_splits) < 0:
                raise ValueError(f"context_splits must be two token counts >= 0 (e.g. [77, 77]), got {context_splits}")
        self._config["context_splits"] = context_splits
        mlp_ratio, qk_norm = self._config["mlp_ratio"], self._config["qk_norm"]
        self.joint_blocks = nn.ModuleList(
            MultiStreamBlock(2, hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=i == depth - 1)
            for i in range(depth))
        self.initialize_weights()

    def split_context(self, ctx: torch.Tensor) -> list[torch.Tensor]:
        """The context's two parts along the sequence: context_splits, or halves (first ceil(L/2)) when None."""
        n = ctx.shape[1]
        splits = self._config["context_splits"] or [math.ceil(n / 2), n - math.ceil(n / 2)]
        if sum(splits) != n:
            raise ValueError(f"context has {n} tokens but context_splits {splits} add up to {sum(splits)}")
        return list(ctx.split(splits, dim=1))

    def mix(self, ctx, tokens, c_act):
        """All three streams attend jointly in every block; the text streams stop after the last block's QKV."""
        streams = [*self.split_context(ctx), tokens]
        for block in self.joint_blocks:
            streams = list(self._call(block, *streams, c_act))
        return streams[-1]


ARCHITECTURES = {"mmdit": MMDiT, "mmdit3": MMDiT3, "crossdit": CrossDiT, "uvit": UViT, "dit": DiT}


def from_config(config: dict) -> nn.Module:
    """Any study architecture from its config; a config without "arch" (or with "mmdit") is a plain MM-DiT."""
    config = dict(config)
    arch = config.pop("arch", "mmdit")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
    if arch == "mmdit":
        return MMDiT.from_config(config)
    return ARCHITECTURES[arch].from_config(config)


def arch_config(model: nn.Module) -> dict:
    """A model's config with its "arch" key (MM-DiT's own config has none)."""
    return {"arch": "mmdit", **model.config}


def count_parameters(config: dict) -> int:
    """Number of parameters of the model `config` describes (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = from_config(config)
    return sum(p.numel() for p in model.parameters())


def _hidden_step(num_heads: int) -> int:
    """Widths must split into the heads and into 4 sin-cos quarters."""
    return num_heads * 4 // math.gcd(num_heads, 4)


def _best_width(base: dict, depth: int, target: int, step: int) -> tuple[int, int]:
    """(hidden, params) at this depth whose count is closest to target; counts grow with width, so bisect."""
    def count(k):
        return count_parameters({**base, "depth": depth, "hidden_size": k * step})
    lo, hi = 1, 2
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(count(k) - target))
    return best * step, count(best)


def _mlp_fit(config: dict, target: int) -> tuple[dict, int]:
    """The config with the MLP width that brings the count closest to target (counts are linear in it)."""
    h = config["hidden_size"]

    def with_mlp(m):
        return {**config, "mlp_ratio": (m + 0.5) / h}  # int(h * ratio) == m exactly, whatever the rounding
    lo, hi = 2 * h, 6 * h
    n_lo, n_hi = count_parameters(with_mlp(lo)), count_parameters(with_mlp(hi))
    m = min(max(round(lo + (target - n_lo) * (hi - lo) / (n_hi - n_lo)), h), 8 * h)
    fitted = with_mlp(m)
    return fitted, count_parameters(fitted)


def matched(arch: str, target, tolerance: float = 0.05, depth: int | None = None, max_depth: int | None = None,
            **config) -> dict:
    """A config of `arch` whose parameter count is within `tolerance` of `target`.

    target: an MM-DiT (or any model here), its config dict, or a parameter count (then pass the io keys in
    **config: patch_size, in_channels, context_dim, pooled_dim, input_size, depth and num_heads as a reference).
    The target's io settings and head count are kept. Depths are tried nearest the target's (or `depth`) first,
    up to max_depth (default 2 x depth + 4); at each, the closest width (a multiple of lcm(heads, 4)), and if that
    misses, the MLP ratio is adjusted (tiny models, whose width steps are coarse, need it).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
    if isinstance(target, nn.Module):
        target = arch_config(target)
    if isinstance(target, dict):
        ref = {**target, **config}
        n_target = count_parameters(target)
    else:
        ref, n_target = dict(config), int(target)
    ref_depth = depth or ref.get("depth")
    num_heads = ref.get("num_heads")
    if ref_depth is None or num_heads is None:
        raise ValueError("matched: give the reference depth and num_heads (in the target config or as keywords)")
    base = {k: ref[k] for k in IO_KEYS if k in ref}
    base["num_heads"] = num_heads
    if arch == "mmdit3" and "context_splits" in ref:
        base["context_splits"] = ref["context_splits"]
    base = {"arch": arch, **base}
    depths = [depth] if depth else sorted(range(1, (max_depth or 2 * ref_depth + 4) + 1),
                                          key=lambda d: (abs(d - ref_depth), d))
    best = None
    for d in depths:
        hidden, n = _best_width(base, d, n_target, _hidden_step(num_heads))
        candidates = [({**base, "depth": d, "hidden_size": hidden}, n)]
        if abs(n - n_target) > tolerance * n_target:
            candidates.append(_mlp_fit(candidates[0][0], n_target))
        for cfg, n in candidates:
            err = abs(n - n_target) / n_target
            if best is None or err < best[0]:
                best = (err, cfg)
            if err <= tolerance:
                return cfg
    raise ValueError(f"matched: no {arch} with {num_heads} heads at depths {depths[0]}..{max(depths)} comes within "
                     f"{tolerance:.0%} of {n_target} parameters (closest: {best[1]}, off by {best[0]:.1%})")
