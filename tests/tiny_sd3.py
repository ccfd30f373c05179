"""Tiny random SD3-like and SD3.5-like models on disk, built as diffusers' own tests build theirs: an MM-DiT (released
single file and diffusers folder), CLIP-L, CLIP-G and T5 with locally built tokenizers, and a 16-channel VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rectflow.checkpoints import save_diffusers, save_released
from rectflow.models import MMDiT
from test_mmdit import randomize
from test_text import _clip, _t5, _tokenizer

# context width = T5's (96), pooled = CLIP-L's 24 + CLIP-G's 40 projections; 16 latent channels as SD3's VAE. SD3
# files have head dim 64 (read off the hidden size without QK-norm), SD3.5's QK-norm weights tell theirs.
TRANSFORMERS = {
    "sd3": dict(depth=2, num_heads=1, qk_norm=None),
    "sd35": dict(depth=3, num_heads=2, qk_norm="rms", dual_attention_layers=(0, 1)),
}
RESOLUTION = 32  # pixels: a 16 x 16 latent (the VAE halves), 8 x 8 tokens
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TinySD3:
    kind: str  # a key of TRANSFORMERS
    root: Path
    released: Path  # the transformer as a released single file
    diffusers: Path  # the same as a diffusers SD3Transformer2DModel folder
    text_encoder: str  # rectflow's spec of the three encoders
    autoencoder: str  # rectflow's spec of the VAE
    parts: dict  # {name: (model, tokenizer)} of the text encoders
    vae: object


def build(root: Path, kind: str = "sd3") -> TinySD3:
    """Write a tiny random model of `kind` (TRANSFORMERS) with its encoders and VAE under root."""
    from diffusers import AutoencoderKL

    root.mkdir(parents=True, exist_ok=True)
    parts = {"clip_l": (_clip(32, 24, 1), _tokenizer("</s>", "</s>", "<s>")),
             "clip_g": (_clip(48, 40, 2), _tokenizer("!", "</s>", "<s>")),
             "t5": (_t5(96), _tokenizer("<pad>", "</s>", None))}
    for name, (model, tok) in parts.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    vae.save_pretrained(root / "vae")
    model = randomize(MMDiT(hidden_size=64, patch_size=2, in_channels=16, context_dim=96, pooled_dim=64,
                            input_size=16, pos_embed_max_size=12, **TRANSFORMERS[kind]), seed=7)
    save_released(model, root / "transformer.safetensors", prefix=True)
    save_diffusers(model, root / "transformer")
    text = "sd3:" + ",".join(f"{n}={root / n}" for n in parts)
    return TinySD3(kind, root, root / "transformer.safetensors", root / "transformer", text, f"sd3-vae:{root / 'vae'}",
                   parts, vae)


def diffusers_pipeline(tiny: TinySD3):
    """diffusers' StableDiffusion3Pipeline over the same tiny parts (shift 3 as SD3's scheduler config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    p = tiny.parts
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(tiny.diffusers).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny.vae,
        text_encoder=p["clip_l"][0], tokenizer=p["clip_l"][1], text_encoder_2=p["clip_g"][0],
        tokenizer_2=p["clip_g"][1], text_encoder_3=p["t5"][0], tokenizer_3=p["t5"][1])
