"""Nearest-glyph top-1 on emoji: the share of generated images whose nearest training glyph is the prompted one.

FID and CLIP score say whether samples look like emoji and match their caption in the scorer's eyes; they do not say
whether the model draws *the* glyph it was asked for out of 3,591. This metric does: each sample is prompted with a
training glyph's caption, and it counts as correct when, among all training glyphs, the one nearest to it in the
image-text encoder's image features (cosine similarity, the space FID uses) carries that caption. Validation
captions cannot be used here (their glyphs are not among the training glyphs), so the prompts are training captions
drawn with the evaluation seed. Chance level is 1 / (number of training glyphs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def glyph_indices(dataset, n: int, seed: int) -> list[int]:
    """Indices of n training glyphs drawn without replacement (all of them, shuffled, when n >= the data set): their
    captions are the prompts."""
    g = torch.Generator().manual_seed(seed)
    return [int(i) for i in torch.randperm(len(dataset), generator=g)[:n]]


@torch.no_grad()
def reference_features(encoder, dataset) -> torch.Tensor:
    """Unit image features [N, D] of every glyph of the data set (the encoder batches them)."""
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return F.normalize(encoder.image_features(images), dim=-1)


def nearest_top1(image_features: torch.Tensor, prompts: list[str], reference: torch.Tensor,
                 reference_captions: list[str]) -> dict:
    """{"top1": share of images whose nearest reference glyph has the image's prompt, "n", "chance"}."""
    if len(prompts) != image_features.shape[0]:
        raise ValueError(f"nearest-glyph top-1 needs one prompt per image: {len(prompts)} prompts, "
                         f"{image_features.shape[0]} images")
    if reference.shape[0] != len(reference_captions):
        raise ValueError(f"{reference.shape[0]} reference features for {len(reference_captions)} captions")
    nearest = (F.normalize(image_features.float(), dim=-1) @ reference.T).argmax(-1)
    hits = [reference_captions[int(j)] == p for j, p in zip(nearest, prompts)]
    return {"top1": sum(hits) / max(len(hits), 1), "n": len(hits), "chance": 1.0 / len(reference_captions)}
