"""Validation loss (docs/paper.md §3): the model's own objective at 8 equally spaced t, each level separately, then
the mean.

The levels are the midpoints of 8 equal bins of [0, 1]:

    t_i = (i + 0.5) / 8 = 0.0625, 0.1875, ..., 0.9375        (i = 0..7)

equally spaced, and clear of the endpoints where some formulations are undefined (EDM's sigma is infinite at t = 1,
eps-prediction cannot recover x0 where a_t = 0). Each t is in the formulation's own time, so the numbers compare runs
of one formulation (and, for the rf family, whose per-t loss is the plain velocity MSE, across its samplers).

At level t the loss is formulation.training_loss(model, x0, t, eps) averaged over a fixed set of validation images
with their captions (full conditioning, no dropout). The noise of image i is seeded by (seed, i) alone and is the same
at all 8 levels, so a rerun on the same device gives the same digits, whatever the batch size.
"""
from __future__ import annotations

import hashlib

import torch

T_LEVELS: tuple[float, ...] = tuple((i + 0.5) / 8 for i in range(8))


def noise_for(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed standard-normal noise of validation image `index`."""
    digest = hashlib.sha256(f"rectflow-val-eps/{seed}/{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def validation_loss(model, formulation, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, seed: int = 0,
                    levels=T_LEVELS, batch_size: int = 64, bf16: bool = False) -> dict:
    """Per-level mean loss and their mean, for latents x0 [N, C, h, w] with their text features (on any device)."""
    device = next(model.parameters()).device
    n = x0.shape[0]
    eps = torch.stack([noise_for(seed, i, tuple(x0.shape[1:])) for i in range(n)])
    losses = []
    for t in levels:
        total = torch.zeros((), dtype=torch.float64)
        for lo in range(0, n, batch_size):
            sl = slice(lo, lo + batch_size)
            c, y = context[sl].to(device), pooled[sl].to(device)

            def model_fn(z_in, t_in, c=c, y=y):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return model(z_in, t_in, c, y).float()

            x = x0[sl].to(device)
            t_batch = torch.full((x.shape[0],), t, device=device)
            per_sample = formulation.training_loss(model_fn, x, t=t_batch, eps=eps[sl].to(device))
            total += per_sample.double().sum().cpu()
        losses.append(float(total / n))
    return {"t": [float(t) for t in levels], "loss": losses, "mean": sum(losses) / len(losses), "n": n, "seed": seed}


@torch.no_grad()
def validation_inputs(dataset, n: int, text_encoder, autoencoder, device="cpu") -> tuple[torch.Tensor, ...]:
    """(x0 latents, context, pooled) of the first n validation items; each caption is encoded alone (as in training)."""
    n = min(n, len(dataset))
    if n < 1:
        raise ValueError("validation loss needs at least one validation item (the data set's val split is empty)")
    items = [dataset[i] for i in range(n)]
    if all("latent" in it for it in items):  # precomputed shards (rectflow cache)
        x0 = torch.stack([it["latent"] for it in items])
    else:
        images = torch.stack([it["image"] for it in items]).to(device)
        x0 = torch.cat([autoencoder.encode(images[i:i + 64]).float() for i in range(0, n, 64)]).cpu()
    if all("context" in it for it in items):
        return x0, torch.stack([it["context"] for it in items]), torch.stack([it["pooled"] for it in items])
    encoded = {c: text_encoder.encode([c]) for c in dict.fromkeys(it["caption"] for it in items)}
    context = torch.cat([encoded[it["caption"]][0].float().cpu() for it in items])
    pooled = torch.cat([encoded[it["caption"]][1].float().cpu() for it in items])
    return x0, context, pooled
