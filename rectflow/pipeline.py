"""The sampling pipeline: everything that turns prompts into images with a trained or released model.

The data path (STYLE.md): prompts -> text encoder -> noise -> time grid -> solver (with classifier-free and skip-layer
guidance) -> model -> autoencoder decode. `load_pipeline` assembles a Pipeline from a training run (its config.yaml and
latest checkpoint) or a weights file (rectflow files carry their model and training configs in the metadata; a
released SD3 file needs a text encoder and autoencoder spec), with LoRAs merged and the memory options applied;
`generate` draws images (or latents, or image-to-image from latents). `rectflow sample` (rectflow.sample) is the
command line over it.

Classifier-free guidance's unconditional branch: rectflow runs learned it from text dropout to zeros, so it is zeros;
released SD3 files (and fine-tunes of them) are sampled, as SD3's reference code does, with the encoding of the empty
prompt ""; a negative prompt replaces either with the encoding of its text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from rectflow.autoencoder import load_autoencoder
from rectflow.checkpoints import load_model as load_weights
from rectflow.checkpoints import train_config_of, uncond_prompt_of
from rectflow.data.folder import UnusableImage, fit, load_image
from rectflow.files import check_safetensors, safetensors_metadata
from rectflow.flow import Formulation
from rectflow.lora import apply_loras
from rectflow.presets import PRESETS, recognise
from rectflow.presets import preset as preset_settings
from rectflow.runs import CONFIG, resolve_weights
from rectflow.sampling import SkipLayerGuidance, guided, sample
from rectflow.text import load_text_encoder

# docs/paper.md §6: the released models' inference settings
DEFAULTS_FOR_RELEASED = {"formulation": "rf", "shift": 3.0, "schedule": "sd3"}
RELEASED_RESOLUTION = 1024  # the side their shift of 3 was chosen for (docs/paper.md §5)
DEFAULT_SAMPLER = {"steps": 28, "solver": "euler", "cfg_scale": 4.0}


@dataclass
class Pipeline:
    """What sampling needs: the network, its forward process, text encoder and autoencoder, and the image side."""

    model: torch.nn.Module
    formulation: object
    text_encoder: object
    autoencoder: object
    resolution: int
    train_config: dict = field(default_factory=dict)
    source: str = ""
    weights: str | None = None  # "ema" or "raw" as the loaded file says (None: not a rectflow training file)
    uncond_prompt: str | None = None  # CFG's unconditional branch: this prompt's encoding; None: zeros
    loras: list = field(default_factory=list)  # the LoRAs merged into the model: [{file, scale, format}]
    preset: str | None = None  # the sampler preset (rectflow.presets) chosen for this model

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        side = self.resolution // self.autoencoder.factor
        return (self.autoencoder.channels, side, side)

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device


# ---------------------------------------------------------------- loading


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata (empty for files without it); the header is checked as it is read."""
    return check_safetensors(path).get("__metadata__") or {}


def load_model(path: Path, device="cpu", dtype: torch.dtype | None = None,
               meta: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(network, training config dict or {}) from a rectflow weights file (an MM-DiT, or a baseline of the
    architecture study: its config's "arch" key picks the class) or a released SD3 single file; in dtype when given
    (bf16 halves the memory), else float32 on the CPU. meta: the file's metadata when already read."""
    meta = safetensors_metadata(path) if meta is None else meta
    model = load_weights(path)
    if dtype is not None:
        model = model.to(dtype)
    elif torch.device(device).type == "cpu":
        model = model.float()  # files may store bf16/fp16 (the shipped model, released files); fp16 is unusable on CPU
    train_config = train_config_of(meta) or {}
    return model.to(device).eval().requires_grad_(False), train_config


def load_pipeline(run: str | None = None, checkpoint: str | None = None, weights: str | None = None, device="cpu",
                  formulation: str | None = None, text_encoder: str | None = None, autoencoder: str | None = None,
                  resolution: int | None = None, step_dir: str | Path | None = None, loras=(),
                  preset: str | None = None, t5_length: int | None = None, no_t5: bool = False,
                  dtype: torch.dtype | None = None) -> Pipeline:
    """Everything needed to sample, from a run or a weights file; explicit arguments override the run's config.

    weights: see resolve_weights. step_dir: a checkpoint directory of `run` to load instead of its latest (so that
    several weight sets come from one checkpoint while the run goes on writing new ones). loras: 'FILE[:SCALE]'
    LoRAs merged into the weights in order (rectflow.lora). preset: a name of rectflow.presets, 'auto' (the one a
    released model's architecture matches) or None; its T5 length applies unless t5_length is given. no_t5: T5 is
    not loaded, zeros take its place (as SD3 was trained to accept, docs/paper.md §4). dtype: of every component
    (bf16: half the memory; sample with bf16 autocast).
    """
    path = resolve_weights(run, checkpoint, weights) if step_dir is None else resolve_weights(
        None, str(step_dir), weights or "ema")
    meta = safetensors_metadata(path)
    model, cfg = load_model(path, device, dtype, meta)
    applied = apply_loras(model, loras)
    released = not cfg  # no rectflow training config in the file: a released model
    kind = meta.get("rectflow.weights") or (None if released else weights)
    if run is not None and (Path(run) / CONFIG).is_file():
        cfg = {**cfg, **(yaml.safe_load((Path(run) / CONFIG).read_text()) or {})}
    text_spec = text_encoder or cfg.get("text_encoder")
    if text_spec is None:
        raise ValueError(f"{path} carries no training config: give --text-encoder (e.g. 'sd3:clip_l=DIR,clip_g=DIR,"
                         f"t5=DIR') and --autoencoder (e.g. 'sd3-vae:DIR')")
    ae = load_autoencoder(autoencoder or cfg.get("autoencoder", "identity"), dtype=dtype).to(device).eval()
    name = (recognise(model.config, path) if released else None) if preset == "auto" else preset
    if name is not None:
        preset_settings(name)  # an unknown name is an error naming the presets
    length = t5_length or (PRESETS[name]["t5_length"] if name else None)
    without = ("t5",) if no_t5 else ()
    text = load_text_encoder(text_spec, dtype=dtype, t5_length=length, without=without,
                             dims={"t5": model.config["context_dim"]} if no_t5 else None).to(device).eval()
    form = Formulation.from_name(formulation or cfg.get("formulation", DEFAULTS_FOR_RELEASED["formulation"]))
    side = resolution or cfg.get("resolution") or model.config["input_size"] * ae.factor
    _check_conditioning(model, text, path)
    # released SD3 models (and fine-tunes of them) take the empty prompt's encoding as the unconditional input (SD3's
    # reference sampler); rectflow runs from scratch were trained with text dropout to zeros
    return Pipeline(model, form, text, ae, int(side), cfg, source=str(path), weights=kind,
                    uncond_prompt=uncond_prompt_of(meta) if meta else ("" if released else None), loras=applied,
                    preset=name)


def _check_conditioning(model, text, path) -> None:
    """The text encoder's widths must match what the model was trained with."""
    mc = model.config
    if (mc["context_dim"], mc["pooled_dim"]) != (text.context_dim, text.pooled_dim):
        raise ValueError(f"{path}: model expects context/pooled widths {mc['context_dim']}/{mc['pooled_dim']}, the "
                         f"text encoder gives {text.context_dim}/{text.pooled_dim}; pass the matching --text-encoder")


# ---------------------------------------------------------------- generation


def keep_encoders(text_encoder, context: torch.Tensor, pooled: torch.Tensor,
                  names) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the outputs of every encoder not in `names` (docs/paper.md §4: any subset can be used at inference)."""
    if names is None:
        return context, pooled
    known = list(text_encoder.encoder_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--encoders: unknown or unloaded encoder(s) {unknown}; this text encoder has {known}")
    context, pooled = context.clone(), pooled.clone()
    for name, part in text_encoder.parts.items():
        if name not in names:  # each encoder fills its own slice of context and pooled (rectflow.text.Part)
            context[:, part.seq, part.channels] = 0
            pooled[:, part.pooled] = 0
    return context, pooled


def release_text_encoder(pipe: Pipeline) -> None:
    """Free the text encoders' weights (T5-XXL alone is 4.7B parameters) before the transformer runs."""
    models = getattr(pipe.text_encoder, "models", None)
    if isinstance(models, torch.nn.ModuleDict):
        models.clear()
    elif hasattr(pipe.text_encoder, "model"):
        pipe.text_encoder.model = None


@torch.no_grad()
def uncond_features(pipe: Pipeline, negative_prompt: str | None = None, encoders=None):
    """(context [1, L, Dc], pooled [1, Dp]) of CFG's unconditional branch: the encoding of `negative_prompt`, else
    of the pipeline's uncond_prompt; None when neither is set (guided() then uses zeros)."""
    text = negative_prompt if negative_prompt is not None else pipe.uncond_prompt
    if text is None:
        return None
    context, pooled = pipe.text_encoder.encode([text])
    return keep_encoders(pipe.text_encoder, context, pooled, encoders)  # absent encoders give zeros, as for prompts


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], steps: int = 28, solver: str = "euler", cfg_scale: float = 4.0,
             shift: float = 1.0, schedule: str = "linear", seed: int = 0, batch_size: int = 8, encoders=None,
             bf16: bool = False, progress: bool = False, negative_prompt: str | None = None,
             decode: bool = True, slg: SkipLayerGuidance | None = None, init_latents: torch.Tensor | None = None,
             strength: float = 1.0, release_text: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for the prompts (decode=False: their latents); image i starts from noise seeded
    by seed + i. slg: skip-layer guidance (rectflow.sampling.SkipLayerGuidance), with CFG on. init_latents [N or 1,
    C, h, w]: image-to-image from these latents (pipe.autoencoder.encode of the images) at `strength`. release_text:
    free the text encoders once every prompt is encoded (one-shot use: the pipeline cannot encode afterwards). mask
    [N or 1, 1, h, w] (1: redraw, 0: keep) with init_latents: inpainting (rectflow.sampling.sample).

    negative_prompt: its encoding is CFG's unconditional branch (default: see uncond_features).
    """
    device, out = pipe.device, []
    if slg is not None:
        depth = len(getattr(pipe.model, "joint_blocks", ()))
        if not depth or max(slg.layers) >= depth:
            raise ValueError(f"--slg-layers {list(slg.layers)}: the model has joint blocks 0-{depth - 1}" if depth else
                             "skip-layer guidance needs an MM-DiT (joint blocks to skip)")
    if init_latents is not None and (init_latents.shape[0] not in (1, len(prompts))
                                     or tuple(init_latents.shape[1:]) != pipe.latent_shape()):
        raise ValueError(f"image-to-image: {init_latents.shape[0]} init latents of shape "
                         f"{tuple(init_latents.shape[1:])} for {len(prompts)} prompts; expected 1 or one per prompt of "
                         f"shape {pipe.latent_shape()}")
    # every prompt is encoded before the first denoising step, so the text encoders can go first (release_text)
    uncond = uncond_features(pipe, negative_prompt, encoders) if cfg_scale != 1 else None
    starts = list(range(0, len(prompts), batch_size))
    features = [keep_encoders(pipe.text_encoder, *pipe.text_encoder.encode(prompts[lo:lo + batch_size]), encoders)
                for lo in starts]
    if release_text:
        release_text_encoder(pipe)
    chunks = starts
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, unit="batch", desc="sampling")
    for lo, (context, pooled) in zip(chunks, features):
        batch = prompts[lo:lo + batch_size]
        noise = torch.stack([torch.randn(pipe.latent_shape(), generator=torch.Generator().manual_seed(seed + lo + i))
                             for i in range(len(batch))]).to(device)
        u_context, u_pooled = (None, None) if uncond is None else (
            u.to(device).expand(len(batch), *u.shape[1:]) for u in uncond)
        net = guided(pipe.model, context.to(device), pooled.to(device), cfg_scale, u_context, u_pooled, slg, steps)

        def model_fn(z, t):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return net(z, t).float()

        init = part = None
        if init_latents is not None:
            init = init_latents.expand(len(prompts), *init_latents.shape[1:])[lo:lo + len(batch)].to(device)
        if mask is not None:
            part = mask.expand(len(prompts), *mask.shape[1:])[lo:lo + len(batch)].to(device)
        x0 = sample(model_fn, pipe.formulation, noise, steps=steps, solver=solver, shift=shift, schedule=schedule,
                    on_step=net.on_step, init=init, strength=strength, mask=part)
        out.append(pipe.autoencoder.decode(x0).float().clamp(-1, 1).cpu() if decode else x0.float().cpu())
    return torch.cat(out)


def _fitted(pipe: Pipeline, paths, flag: str) -> list:
    """Image files centre-cropped to squares of the pipeline's resolution (LANCZOS); errors name the flag."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")
        try:
            image, _ = load_image(Path(path))
        except UnusableImage as err:
            raise ValueError(f"{flag} {path}: {err}") from None
        images.append(fit(image, pipe.resolution, "center"))
    return images


def load_masks(pipe: Pipeline, paths) -> torch.Tensor:
    """Inpainting masks [N, 1, h, w] at the latent resolution from image files (white: redraw, black: keep), cropped
    and resized as encode_images crops the images, then binarised at 0.5 and resized by nearest neighbour, as
    diffusers' mask processor does."""
    masks = [torch.from_numpy((np.asarray(m.convert("L"), dtype=np.float32) / 255 >= 0.5).astype(np.float32))[None]
             for m in _fitted(pipe, paths, "--mask")]
    return torch.nn.functional.interpolate(torch.stack(masks), size=pipe.latent_shape()[1:])


@torch.no_grad()
def encode_images(pipe: Pipeline, paths) -> torch.Tensor:
    """Latents of image files for image-to-image: each centre-cropped to a square and resized to the pipeline's
    resolution (LANCZOS), then encoded (the SD3 VAE's posterior mean, so the same file gives the same latents)."""
    images = [torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
              for im in _fitted(pipe, paths, "--init-image")]
    return pipe.autoencoder.encode(torch.stack(images).to(pipe.device)).float().cpu()
