"""The network a config asks for (its MM-DiT, or a baseline of the architecture study at that size) and the
training loss of one batch.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from rectflow.config import TrainConfig
from rectflow.models import baselines
from rectflow.models.mmdit import RECTFLOW_TOKENS, MMDiT


def build_model(cfg: TrainConfig, in_channels: int, latent_size: int, context_dim: int, pooled_dim: int,
                context_splits: list[int] | None = None):
    """The network of the config: its MM-DiT (docs/paper.md §4), or a baseline of `cfg.arch` at that MM-DiT's size.

    context_splits: token counts of the context's parts (SD3: [CLIP, T5]), the streams of mmdit3's extra weight set;
    None splits the context into halves (rectflow.models.baselines.MMDiT3).
    """
    kw = {k: getattr(cfg, k) for k in RECTFLOW_TOKENS if getattr(cfg, k)}
    if cfg.hidden is not None:
        kw["hidden_size"] = cfg.hidden
    if cfg.heads is not None:
        kw["num_heads"] = cfg.heads
    # a baseline only needs the MM-DiT's config and parameter count: build that on the meta device (no memory, no
    # init, no random draws, so the baseline's init is the same as if it were built alone)
    with torch.device("meta") if cfg.arch != "mmdit" else contextlib.nullcontext():
        model = MMDiT.from_depth(cfg.depth, patch_size=cfg.patch_size, in_channels=in_channels,
                                 context_dim=context_dim, pooled_dim=pooled_dim, input_size=latent_size,
                                 qk_norm=None if cfg.qk_norm == "none" else cfg.qk_norm, **kw)
    if cfg.arch != "mmdit":
        options = {"context_splits": context_splits} if cfg.arch == "mmdit3" else {}
        model = baselines.from_config(baselines.matched(cfg.arch, model, **options))
    model.gradient_checkpointing = cfg.checkpoint_every_block
    warn_patch_bottleneck(cfg.patch_size, in_channels, model.config["hidden_size"])
    return model


def warn_patch_bottleneck(patch: int, channels: int, hidden: int) -> None:
    """Warn when a patch holds more values than the hidden width: the linear patch embedding and output layer then
    have rank `hidden`, so the velocity of the remaining directions is always zero and that part of the initial
    noise stays in every sample (sampling cannot remove it, however long the model trains)."""
    if patch * patch * channels > hidden:
        warnings.warn(f"patch_size {patch} x {patch} x {channels} channels = {patch * patch * channels} values per "
                      f"token exceeds the hidden width {hidden}: samples will keep "
                      f"{1 - hidden / (patch * patch * channels):.0%} of the noise; use a smaller patch_size or a "
                      f"larger hidden", stacklevel=3)


def context_splits(text) -> list[int] | None:
    """Token counts of the distinct sequence ranges of a text encoder's parts, in order (SD3: [CLIP, T5]); None
    when all parts share one range (MiniLM)."""
    spans = sorted({(part.seq.start or 0, part.seq.stop) for part in text.parts.values()})
    if len(spans) < 2 or any(stop is None for _, stop in spans):
        return None
    return [stop - start for start, stop in spans]


def compute_loss(model, formulation, x0, context, pooled, t, eps, bf16: bool, negatives=None, contrastive=0.0,
                 **model_kw) -> torch.Tensor:
    """Per-sample loss of the formulation (contrastive with negatives and a weight); the network runs under bf16
    autocast, the loss maths in float32. model_kw go to the network (route: token routing)."""
    def model_fn(z_in, t_in):
        with torch.autocast(z_in.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z_in, t_in, context, pooled, **model_kw)
        return out.float()
    return formulation.training_loss(model_fn, x0, t=t, eps=eps, negatives=negatives, contrastive=contrastive)


def dispersive_loss(h: torch.Tensor) -> torch.Tensor:
    """Dispersive loss (Wang & He 2025, InfoNCE with L2 distance and no positives) of representations h [B, ...]:
    log of the mean over all B x B pairs (the diagonal's zeros included) of exp(-||h_i - h_j||^2 / d), d the
    flattened size. Lowest when the batch's representations lie far apart."""
    flat = h.flatten(1).float()
    d2 = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    return torch.logsumexp(-d2.flatten(), 0) - math.log(d2.numel())


@contextlib.contextmanager
def block_output(block: torch.nn.Module):
    """Capture a joint block's image-token output during the forward passes inside the context: yields a dict
    whose "x" is the last one."""
    seen: dict = {}
    handle = block.register_forward_hook(lambda module, args, out: seen.__setitem__("x", out[1]))
    try:
        yield seen
    finally:
        handle.remove()


def negative_indices(captions: list[str]) -> torch.Tensor:
    """For each sample the next one in the batch (cyclically) with a different caption, or itself when all share
    one: contrastive flow matching's negatives, a pure function of the batch."""
    n = len(captions)
    out = []
    for i, caption in enumerate(captions):
        out.append(next(((i + k) % n for k in range(1, n) if captions[(i + k) % n] != caption), i))
    return torch.tensor(out)


def route_indices(n_tokens: int, fraction: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Token routing: per sample, the sorted indices [B, K] of the tokens that go through the routed blocks (the
    other `fraction` of them skip), drawn from the generator."""
    keep = max(1, round(n_tokens * (1.0 - fraction)))
    order = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1)
    return order[:, :keep].sort(dim=1).values



def route_blocks(cfg: TrainConfig, depth: int) -> tuple[int, int]:
    """Token routing's (first routed block, block where the tokens rejoin) of a config for a model of `depth`
    blocks: 0 <= start < end <= depth - 1 (the last block and the output layer see every token)."""
    end = cfg.route_end % depth if cfg.route_end < 0 else cfg.route_end
    if not 0 <= cfg.route_start < end <= depth - 1:
        raise ValueError(f"config keys 'route_start' / 'route_end': {cfg.route_start} / {cfg.route_end} do not give "
                         f"0 <= start < end <= {depth - 1} for this {depth}-block model")
    return cfg.route_start, end
