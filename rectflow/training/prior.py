"""DreamBooth's prior preservation: before fine-tuning, the base model draws `class_images` latents of `class_prompt`
(e.g. "a photo of a dog"); every step then adds a batch of them to the instance batch, their loss weighted by
prior_weight, so the model keeps drawing the class while it learns the instance.

The class latents are generated once, with the sample grids' sampler settings and seeds seed + i, and kept in the
cache folder under a key of everything they depend on (the base weights file, prompt, count, resolution, sampler
settings, seed); a grid of the first few is written to <run>/class_images.png to look at. Which class latents a step
uses, and their t and noise, are pure functions of (seed, step), so resume stays exact.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rectflow.files import DamagedFile, atomic_path, check_safetensors
from rectflow.images import save_images
from rectflow.pipeline import Pipeline, generate
from rectflow.training import distributed
from rectflow.training.data import step_indices
from rectflow.training.randomness import generator_for, seed_for

SHOWN = 8  # class images in the grid written for the user


def file_identity(path: Path | None) -> list:
    """A weights file's (or folder's) path, size and modification time: new weights are a new identity."""
    if path is None:
        return []
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


class PriorPreservation:
    """The class latents of a run and the class part of each step's batch."""

    def __init__(self, cfg, base: Path | None, latent_shape: tuple[int, int, int], cache_dir: Path):
        self.cfg, self.latent_shape = cfg, latent_shape
        identity = {"base": file_identity(base), "prompt": cfg.class_prompt, "n": cfg.class_images,
                    "resolution": cfg.resolution, "steps": cfg.sample_steps, "solver": cfg.sample_solver,
                    "cfg_scale": cfg.sample_cfg, "seed": cfg.seed, "formulation": cfg.formulation}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / f"class-{key}.safetensors"
        self.latents: torch.Tensor | None = None

    def _cached(self) -> bool:
        try:
            return self.path.is_file() and "latents" in check_safetensors(self.path)
        except DamagedFile:
            return False

    def prepare(self, pipe: Pipeline, settings: dict, ctx, run_dir: Path, bf16: bool) -> None:
        """Generate the class latents on rank 0 unless cached (with the model as it is now: the base), then load
        them on every rank."""
        cfg = self.cfg
        if ctx.is_main and not self._cached():
            prompts = [cfg.class_prompt] * cfg.class_images
            latents = generate(pipe, prompts, bf16=bf16, progress=True, decode=False, **settings)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                save_file({"latents": latents.contiguous()}, str(tmp), metadata={"prompt": cfg.class_prompt})
            with torch.no_grad():
                shown = pipe.autoencoder.decode(latents[:SHOWN].to(pipe.device)).float().clamp(-1, 1).cpu()
            save_images(shown, prompts[:SHOWN], Path(run_dir) / "class_images.png", {**settings, "class": True},
                        singles=False)
        distributed.barrier(ctx)
        self.latents = load_file(str(self.path))["latents"]
        if tuple(self.latents.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"{self.path}: class latents of shape {tuple(self.latents.shape[1:])}, the run's are "
                             f"{tuple(self.latent_shape)}")

    def step_inputs(self, step: int, batch_size: int, formulation,
                    device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, t, eps) of the class half of step `step`'s global batch (each rank slices it as the instances)."""
        cfg = self.cfg
        order_seed = seed_for(cfg.seed, 0, "class-order")
        x0 = self.latents[step_indices(order_seed, step, batch_size, len(self.latents))]
        t = formulation.sample_t(batch_size, generator=generator_for(cfg.seed, step, "class-t"), shift=cfg.shift)
        g = torch.Generator(device).manual_seed(seed_for(cfg.seed, step, "class-eps"))
        eps = torch.randn((batch_size, *self.latent_shape), generator=g, device=device)
        return x0.to(device), t.to(device), eps
