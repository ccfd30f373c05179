"""Diffusion-DPO for the paper's flow objectives (docs/paper.md §7; docs/finetune.md "Preference tuning"): the policy
is the base model with a LoRA, the reference the frozen base (the same network with its adapters switched off, so no
second copy is held). Preferred and rejected image of a pair see the same noise and the same t; with e(.) the
formulation's per-sample loss (rectflow.flow: its weighted error at z_t),

    L = -log sigmoid(-beta (e_pol(x_w) - e_ref(x_w) - (e_pol(x_l) - e_ref(x_l))))

which equals log 2 while the policy is the reference, and whose gradient lowers the policy's error on the preferred
image relative to the reference and raises it on the rejected one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from rectflow.training.model import compute_loss


def dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, per-pair margin) from per-sample errors of the preferred (w) and rejected (l) images; the
    margin -(policy improvement on w - on l) > 0 means the policy prefers the preferred image more than the reference
    does."""
    margin = -((policy_w - ref_w) - (policy_l - ref_l))
    return -F.logsigmoid(beta * margin), margin


@contextlib.contextmanager
def reference(model: torch.nn.Module):
    """The model as the frozen base: every LoRA layer's adapters switched off (peft's flag), restored after; no
    requires_grad is touched, so the optimizer and sharding see nothing change."""
    layers = [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "lora_A")]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, saved):
            m._disable_adapters = flag


def pair_losses(net, model, formulation, x_w, x_l, context, pooled, t, eps, bf16: bool, beta: float):
    """(per-pair DPO loss, margin) of a micro-batch of pairs: the policy's errors with gradients, the reference's
    without; both images of a pair share context, t and noise."""
    x = torch.cat([x_w, x_l])
    twice = [torch.cat([a, a]) for a in (context, pooled, t, eps)]
    policy = compute_loss(net, formulation, x, *twice[:2], twice[2], twice[3], bf16)
    with torch.no_grad(), reference(model):
        ref = compute_loss(net, formulation, x, *twice[:2], twice[2], twice[3], bf16)
    n = len(x_w)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)
