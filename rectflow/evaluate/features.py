"""Pluggable image-text encoders for CLIP score and FID (docs/paper.md §3 uses CLIP L/14 for both).

An encoder maps images ([-1, 1], NCHW, any size) and captions into one embedding space:

    encoder.image_features(images) -> [B, D]     (unnormalised; FID fits Gaussians to these)
    encoder.text_features(captions) -> [B, D]    (unnormalised; CLIP score takes cosines)
    encoder.name                                 (stated next to every number it produces)

Two kinds: a real CLIP (transformers CLIPModel from a local folder, e.g. CLIP L/14 as in the paper) and the small
offline scorer that rectflow trains on its built-in data (rectflow.evaluate.scorer). Numbers from the two are not
comparable with each other, nor the scorer's with published ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rectflow.evaluate.encoder import ImageTextEncoder
from rectflow.evaluate.scorer import Scorer

# OpenAI CLIP's image normalisation, used when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased) and crop the centre size x size, as CLIP does."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


class CLIPEncoder(ImageTextEncoder):
    """A transformers CLIPModel and its tokenizer from a local folder; images preprocessed with torch ops."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a CLIP model folder (no config.json)")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.name = f"clip:{folder.name}"
        size, mean, std = self._preprocessing(folder)
        self.image_size = size
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self.max_length = min(self.model.config.text_config.max_position_embeddings,
                              getattr(self.tokenizer, "model_max_length", 77) or 77)

    def _preprocessing(self, folder: Path) -> tuple[int, tuple, tuple]:
        """Crop size and normalisation from preprocessor_config.json, else the model's size and OpenAI's mean/std."""
        size, mean, std = self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
        path = folder / "preprocessor_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            crop = cfg.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return size, mean, std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP pixel_values: to [0, 1], resize + centre crop, normalise with CLIP mean/std."""
        x = resize_center_crop((images + 1) / 2, self.image_size).clamp(0, 1)
        return (x - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (vision pooler output -> visual_projection)."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return self.model.visual_projection(pooled)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """Projected text embeddings (text pooler output at the end-of-text token -> text_projection)."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled)


def load_encoder(spec: str = "scorer", device: str | torch.device = "cpu") -> ImageTextEncoder:
    """Encoder from a spec: "scorer" (the shipped offline scorer), "scorer:FILE.safetensors", or "clip:DIR"."""
    kind, _, arg = spec.partition(":")
    if kind == "clip":
        if not arg:
            raise ValueError('encoder spec "clip:DIR" needs the folder of a transformers CLIPModel')
        return CLIPEncoder(arg, device=device)
    if kind == "scorer":
        return Scorer.load(arg or None, device=device)
    raise ValueError(f'unknown encoder spec {spec!r}: expected "scorer", "scorer:FILE.safetensors" or "clip:DIR"')
