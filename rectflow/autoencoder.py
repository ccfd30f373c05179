"""Autoencoders between images and the latents the flow models (docs/paper.md §4, autoencoder channels).

Every autoencoder maps images [B, 3, H, W] in [-1, 1] to latents [B, channels, H / factor, W / factor] that are
already normalised (scale and shift applied), and back:

    Identity()                 pixel space: channels 3, factor 1
    SD3VAE.from_folder(DIR)    the released 16-channel SD3 VAE (diffusers AutoencoderKL), z = (mean - shift) * scale
    SmallAE(channels, factor)  a small conv autoencoder trained here (train_small_ae), saved as safetensors
    load_autoencoder("identity" | "sd3-vae:DIR" | "small:PATH.safetensors" | "shapes-ae" | "shapes-ae-f8")

"shapes-ae" and "shapes-ae-f8" are the SmallAEs shipped for the built-in shapes, trained by
scripts/train_shapes_ae.py: rectflow/assets/shapes_ae.safetensors (4 channels, factor 4, width 32; its
reconstructions read back exactly by the shapes detector) and shapes_ae_f8.safetensors (16 channels, factor 8: a
32 px image is 4 x 4 latents, 16 tokens at patch 1; 87% of validation scenes read back exactly).

encode_dataset() encodes a data set once into a latent file, so training on latents skips the encoder.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rectflow.files import atomic_path, check_safetensors

log = logging.getLogger(__name__)


class Autoencoder(nn.Module):
    """Base: encode(images) -> normalised latents, decode(latents) -> images; channels, factor, spec."""

    channels: int
    factor: int
    spec: str  # what load_autoencoder() needs to rebuild it

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release_encoder(self) -> None:
        """Free the encoding half once every latent is cached (training then only decodes, for sample grids)."""

    def enable_tiling(self) -> None:
        """Decode large images in tiles (SD3's VAE; small ones have nothing to tile)."""

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image."""
        width = height if width is None else width
        if height % self.factor or width % self.factor:
            raise ValueError(f"image size {height}x{width} is not divisible by the autoencoder factor {self.factor}")
        return self.channels, height // self.factor, width // self.factor


class Identity(Autoencoder):
    """Pixel space: the latents are the images."""

    channels, factor, spec = 3, 1, "identity"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class SD3VAE(Autoencoder):
    """A diffusers AutoencoderKL with SD3's latent normalisation z = (mean - shift_factor) * scaling_factor
    (1.5305 and 0.0609 for the released VAE, read from its config). encode uses the posterior mean: the released
    VAE's posterior std is tiny, and a deterministic encoder makes latent caches reproducible."""

    def __init__(self, vae, spec: str = "sd3-vae"):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.scale = float(config.scaling_factor)
        self.shift = float(config.shift_factor or 0.0)
        self.channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.spec = spec

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype | None = None) -> "SD3VAE":
        """Load from a diffusers-format VAE folder, or a pipeline folder with a vae/ subfolder."""
        from diffusers import AutoencoderKL

        path = Path(path).expanduser()
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path} or {path / 'vae'}: "
                                    f"expected a diffusers AutoencoderKL folder")
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, **kwargs)
        return cls(vae, spec=f"sd3-vae:{path.resolve()}")

    def release_encoder(self) -> None:
        self.vae.encoder, self.vae.quant_conv = None, None

    def enable_tiling(self) -> None:
        self.vae.enable_tiling()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> (posterior mean - shift) * scale, float32."""
        if self.vae.encoder is None:
            raise RuntimeError(f"{self.spec}: the encoder was released after the latents were cached")
        mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return ((mean.float() - self.shift) * self.scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (not clamped), float32."""
        z = latents / self.scale + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups."""
    return nn.GroupNorm(math.gcd(8, c), c, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-norm residual block of two 3x3 convolutions."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SmallAE(Autoencoder):
    """A small convolutional autoencoder: log2(factor) stride-2 stages (width doubling, at most 4x), one residual
    block per stage. The encoder predicts a diagonal Gaussian (mean, log-variance); encode() returns the normalised
    mean (mean - shift) * scale, with shift and scale set from data after training (see train_small_ae)."""

    def __init__(self, channels: int = 4, factor: int = 4, width: int = 64):
        super().__init__()
        if factor not in (1, 2, 4, 8, 16):
            raise ValueError(f"SmallAE factor must be a power of two up to 16, got {factor}")
        self.channels, self.factor, self.width = channels, factor, width
        widths = [width * min(2**i, 4) for i in range(int(math.log2(factor)) + 1)]
        enc = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths, widths[1:]):
            enc += [ResBlock(c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 2 * channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(channels, widths[-1], 3, padding=1), ResBlock(widths[-1])]
        for c_in, c_out in zip(widths[::-1], widths[::-1][1:]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), ResBlock(c_out)]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.spec = "small"

    @property
    def config(self) -> dict:
        """Constructor arguments (stored with the weights)."""
        return {"channels": self.channels, "factor": self.factor, "width": self.width}

    def release_encoder(self) -> None:
        self.encoder = None

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised posterior (mean, log-variance), log-variance clamped for stability."""
        if self.encoder is None:
            raise RuntimeError(f"{self.spec}: the encoder was released after the latents were cached")
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> normalised latents (posterior mean - shift) * scale."""
        return (self.posterior(images)[0] - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (not clamped)."""
        return self.decoder(latents / self.scale + self.shift)

    def save(self, path: str | Path) -> None:
        """Weights, scale and shift as safetensors; the config in the file's metadata."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:  # a crash leaves the old file, never half a new one
            save_file(state, str(tmp), metadata={"rectflow": "SmallAE", "config": json.dumps(self.config)})

    @classmethod
    def from_file(cls, path: str | Path) -> "SmallAE":
        """Load a SmallAE written by save()."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SmallAE weights not found: {path}")
        check_safetensors(path)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("rectflow") != "SmallAE" or "config" not in metadata:
            raise ValueError(f"{path}: not a SmallAE file (metadata rectflow={metadata.get('rectflow')!r}, "
                             f"expected 'SmallAE' with a config)")
        model = cls(**json.loads(metadata["config"]))
        model.load_state_dict(load_file(str(path)))
        model.spec = f"small:{path.resolve()}"
        return model


def _batch(dataset, indices) -> torch.Tensor:
    """Stack the images of dataset items."""
    return torch.stack([dataset[int(i)]["image"] for i in indices])


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean L1 or MSE."""
    if loss == "l1":
        return (recon - images).abs().mean()
    if loss == "mse":
        return F.mse_loss(recon, images)
    raise ValueError(f"unknown reconstruction loss {loss!r}; expected 'l1' or 'mse'")


@torch.no_grad()
def fit_latent_stats(model: SmallAE, dataset, batches: int = 8, batch: int = 64, seed: int = 0) -> None:
    """Set model.shift, model.scale so the posterior means of data have mean 0 and std 1 (one scalar each, as SD3)."""
    g = torch.Generator().manual_seed(seed + 1)
    device = model.shift.device
    means = [model.posterior(_batch(dataset, torch.randint(len(dataset), (batch,), generator=g)).to(device))[0]
             for _ in range(batches)]
    z = torch.cat(means).double()
    model.shift.fill_(z.mean().item())
    model.scale.fill_(1.0 / max(z.std().item(), 1e-8))


def train_small_ae(dataset, channels: int = 4, factor: int = 4, steps: int = 2000, batch: int = 32,
                   lr: float = 1e-3, loss: str = "l1", kl_weight: float = 1e-6, width: int = 64, seed: int = 0,
                   device: str | torch.device | None = None,
                   callback: Callable[[int, float], None] | None = None, progress: bool = True) -> SmallAE:
    """Train a SmallAE on a data set's images (AdamW, random batches), then fit its latent scale and shift.

    Objective: L1 or MSE reconstruction + kl_weight * KL(posterior || N(0, I)) (mean per element). With
    kl_weight > 0 the decoder sees posterior samples, which keeps the latent space smooth for the flow model;
    with 0 it is a plain autoencoder on the mean. callback(step, loss) is called after every step; progress shows a
    bar on stderr.
    """
    from tqdm import tqdm
    torch.manual_seed(seed)
    model = SmallAE(channels, factor, width).to(device or "cpu").train()
    device = model.shift.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), unit="step", desc=f"small AE ({channels} ch)", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images = _batch(dataset, torch.randint(len(dataset), (batch,), generator=g)).to(device)
        mean, logvar = model.posterior(images)
        if kl_weight > 0:
            z = mean + torch.randn(mean.shape, generator=g).to(device) * (0.5 * logvar).exp()
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        else:
            z, kl = mean, mean.new_zeros(())
        value = reconstruction_loss(model.decoder(z), images, loss) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if callback is not None:
            callback(step, value.item())
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{value.item():.4f}")
            log.info("small AE step %d/%d: loss %.4f (kl %.3g)", step + 1, steps, value.item(), kl.item())
    model.eval()
    fit_latent_stats(model, dataset, seed=seed)
    return model


@torch.no_grad()
def encode_dataset(autoencoder: Autoencoder, dataset, path: str | Path | None = None, n: int | None = None,
                   batch: int = 64) -> dict:
    """Encode items 0..n-1 of a data set once: {"latents": [n, C, h, w], "captions": [...], "metas": [...]}.

    With path, also write it as safetensors (captions, metas and the autoencoder spec in the metadata);
    load_latents(path) reads it back. n defaults to len(dataset) and is required for endless data sets.
    """
    if n is None:
        if len(dataset) > 10**7:
            raise ValueError(f"data set has {len(dataset)} items (endless?): pass n, the number of items to encode")
        n = len(dataset)
    device = next(autoencoder.parameters(), torch.empty(0)).device
    latents, captions, metas = [], [], []
    for start in range(0, n, batch):
        items = [dataset[i] for i in range(start, min(start + batch, n))]
        latents.append(autoencoder.encode(torch.stack([it["image"] for it in items]).to(device)).float().cpu())
        captions += [it["caption"] for it in items]
        metas += [it["meta"] for it in items]
    out = {"latents": torch.cat(latents), "captions": captions, "metas": metas}
    if path is not None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"latents": out["latents"].contiguous()}, str(tmp),
                      metadata={"captions": json.dumps(captions), "metas": json.dumps(metas),
                                "autoencoder": autoencoder.spec})
    return out


def load_latents(path: str | Path) -> dict:
    """Read a latent file written by encode_dataset: latents, captions, metas, autoencoder spec."""
    from safetensors import safe_open

    check_safetensors(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if "latents" not in f.keys() or "captions" not in metadata:
            raise ValueError(f"{path}: not a latent file written by encode_dataset (needs 'latents' and captions)")
        latents = f.get_tensor("latents")
    return {"latents": latents, "captions": json.loads(metadata["captions"]),
            "metas": json.loads(metadata.get("metas", "[]")), "autoencoder": metadata.get("autoencoder", "")}


SHAPES_AE = Path(__file__).parent / "assets" / "shapes_ae.safetensors"
SHAPES_AE_F8 = Path(__file__).parent / "assets" / "shapes_ae_f8.safetensors"
SHIPPED = {"shapes-ae": SHAPES_AE, "shapes-ae-f8": SHAPES_AE_F8}


def load_autoencoder(spec: str, dtype: torch.dtype | None = None) -> Autoencoder:
    """'identity', 'sd3-vae:DIR' (diffusers AutoencoderKL folder or pipeline folder), 'small:PATH.safetensors' or
    'shapes-ae' / 'shapes-ae-f8' (the shipped SmallAEs of the built-in shapes)."""
    kind, _, rest = spec.partition(":")
    if spec == "identity":
        return Identity()
    if spec in SHIPPED:
        model = SmallAE.from_file(SHIPPED[spec])
        model.spec = spec  # a run's config names the shipped file, wherever the package is installed
        return model
    if kind == "sd3-vae" and rest:
        return SD3VAE.from_folder(rest, dtype=dtype)
    if kind == "small" and rest:
        return SmallAE.from_file(rest)
    raise ValueError(f"unknown autoencoder spec {spec!r}: expected 'identity', 'sd3-vae:DIR', 'small:PATH', "
                     f"'shapes-ae' or 'shapes-ae-f8'")
