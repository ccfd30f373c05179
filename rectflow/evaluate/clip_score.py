"""CLIP score (docs/paper.md §3: "CLIP score with CLIP L/14"): how well generated images match their prompts.

    CLIP score(image, caption) = 100 * max(cos(E_img(image), E_txt(caption)), 0)

the usual definition (Hessel et al. 2021 with w = 100, as torchmetrics' CLIPScore computes it), averaged over the
images. docs/paper.md §3 / Table 2 print it as a fraction (.250), i.e. divided by 100; rectflow reports the 0-100
scale. The number depends on the encoder: every report names it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rectflow.evaluate.encoder import ImageTextEncoder


def clip_scores(encoder: ImageTextEncoder, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Per-image CLIP scores [B] (0-100) of images in [-1, 1] against their captions."""
    if len(images) != len(captions):
        raise ValueError(f"CLIP score needs one caption per image: {len(images)} images, {len(captions)} captions")
    return scores_from_features(encoder.image_features(images), encoder.text_features(captions))


def scores_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) between matching rows of two feature matrices."""
    cos = F.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def clip_score(encoder: ImageTextEncoder, images: torch.Tensor, captions: list[str]) -> float:
    """Mean CLIP score (0-100) of images against their captions."""
    return float(clip_scores(encoder, images, captions).mean())
