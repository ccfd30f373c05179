"""The image-text encoder interface that CLIP score and FID read (rectflow.evaluate.features picks an encoder; the
offline scorer, rectflow.evaluate.scorer, and CLIPEncoder implement it)."""
from __future__ import annotations

import torch
from torch import nn


class ImageTextEncoder(nn.Module):
    """Base class: batched, gradient-free feature extraction; subclasses define the two towers."""

    name: str = "unnamed"
    batch_size: int = 64

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, D] for images in [-1, 1] (subclass hook, one batch)."""
        raise NotImplementedError

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """Text features [B, D] (subclass hook, one batch)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live."""
        return next(self.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, D] in float32 on the CPU, computed in batches."""
        chunks = [self.encode_images(images[i:i + self.batch_size].to(self.device, torch.float32)).float().cpu()
                  for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Text features [B, D] in float32 on the CPU, computed in batches."""
        chunks = [self.encode_texts(list(captions[i:i + self.batch_size])).float().cpu()
                  for i in range(0, len(captions), self.batch_size)]
        return torch.cat(chunks)
