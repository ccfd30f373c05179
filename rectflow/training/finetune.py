"""Fine-tuning: a run that starts from existing weights (`init`: a released SD3 / SD3.5 file, a diffusers folder, a
rectflow run), training all of them or a LoRA of some layers (rectflow.lora) with the rest frozen.

A LoRA run checkpoints only its adapters, raw and EMA, as diffusers-layout LoRA files (so diffusers' load_lora_weights
and ComfyUI read a run's checkpoint directly); their headers name the base weights and carry the training config, so
`rectflow sample --run` and `--resume` rebuild the model from them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rectflow.checkpoints import load_model, train_config_of, uncond_prompt_of
from rectflow.config import TrainConfig
from rectflow.files import check_safetensors, safetensors_metadata
from rectflow.lora import BASE_KEY, Adapter, adapters, attach, load_adapters, read_lora, write_lora
from rectflow.runs import CONFIG, WEIGHT_FILES, resolve_weights
from rectflow.training.parallel import copy_full_, full_tensor



@dataclass
class Init:
    """The weights a fine-tuning run starts from."""

    model: torch.nn.Module
    path: Path  # the weights file (or diffusers folder) they were read from
    uncond_prompt: str | None  # CFG's unconditional input: "" for released models, None (zeros) for rectflow runs


def init_weights_path(spec: str) -> Path:
    """The weights `init` names: a run directory's latest EMA weights, a checkpoint directory's, else the file or
    diffusers folder itself."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"config key 'init': {spec} does not exist")
    if path.is_dir() and (path / CONFIG).is_file() and (path / "checkpoints").is_dir():
        return resolve_weights(run=str(path))
    if path.is_dir() and any((path / f).is_file() for f in WEIGHT_FILES.values()):
        return resolve_weights(checkpoint=str(path))
    return path


INIT_SHAPE_KEYS = ("patch_size", "in_channels", "context_dim", "pooled_dim")
# released-layout weight -> (axis -> shape key) for reading an init's shapes off a header
SHAPE_OF = {"x_embedder.proj.weight": {1: "in_channels", 3: "patch_size"},
            "context_embedder.weight": {1: "context_dim"}, "y_embedder.mlp.0.weight": {1: "pooled_dim"}}
DIFFUSERS_SHAPE_KEYS = {"patch_size": "patch_size", "in_channels": "in_channels", "context_dim": "joint_attention_dim",
                        "pooled_dim": "pooled_projection_dim"}


def init_shapes(path: Path) -> dict:
    """The init weights' patch size and input widths (patch_size, in_channels, context_dim, pooled_dim), read from
    the file's header or config alone: they are checked before the (long) caching, and the weights are loaded after
    the text encoders are released, so both are never in memory together."""
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "transformer"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"config key 'init': {path} is a folder without config.json (nor "
                                    f"transformer/config.json): not a diffusers model or run")
        config = json.loads((folder / "config.json").read_text())
        if "_rectflow_config" in config:
            return {k: config["_rectflow_config"][k] for k in INIT_SHAPE_KEYS}
        return {k: config[d] for k, d in DIFFUSERS_SHAPE_KEYS.items()}
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"config key 'init': {path} is not a .safetensors file; convert a pickle first "
                         f"(rectflow convert {path} OUT.safetensors --allow-pickle)")
    header = check_safetensors(path)
    meta = header.get("__metadata__") or {}
    if BASE_KEY in meta:  # a LoRA run's weights: its base's
        return init_shapes(Path(meta[BASE_KEY]))
    if "config" in meta:
        config = json.loads(meta["config"])
        if all(k in config for k in INIT_SHAPE_KEYS):
            return {k: config[k] for k in INIT_SHAPE_KEYS}
    out = {}
    for key, entry in header.items():
        for suffix, axes in SHAPE_OF.items():
            if key.endswith(suffix):
                out.update({name: entry["shape"][axis] for axis, name in axes.items()})
    if set(out) != set(INIT_SHAPE_KEYS):
        raise ValueError(f"config key 'init': {path} holds no MM-DiT (no x_embedder / context_embedder / y_embedder "
                         f"weights)")
    return out


def load_init(spec: str) -> Init:
    """The model `init` names, in float32 (a LoRA run's weights: its base with the LoRA merged); frozen parts are
    cast later (attach_lora)."""
    path = init_weights_path(spec)
    init_shapes(path)  # the same checks, before any weight is read
    model = load_model(path).float()
    return Init(model, path.resolve(), uncond_prompt_of(safetensors_metadata(path)))


# what a model's inputs are made with: a fine-tune of a rectflow model takes these from the model's training config
# unless the run names them (a latent model fed pixels does not fit; another text length shifts what it learned)
INHERITED_FROM_INIT = ("autoencoder", "text_encoder")


def init_train_config(spec: str) -> dict | None:
    """The training config recorded in the init weights' header (rectflow runs, checkpoints and the shipped model);
    None for weights without one (released SD3 / SD3.5 files, diffusers folders)."""
    return train_config_of(safetensors_metadata(init_weights_path(spec)))


def inherit_from_init(cfg: TrainConfig, named: set[str]) -> tuple[TrainConfig, dict]:
    """(cfg with the INHERITED_FROM_INIT fields the run did not name taken from the init model's training config,
    those fields and values)."""
    recorded = init_train_config(cfg.init) if cfg.init else None
    if recorded is None:
        return cfg, {}
    taken = {k: recorded[k] for k in INHERITED_FROM_INIT
             if k not in named and k in recorded and recorded[k] != getattr(cfg, k)}
    return dataclasses.replace(cfg, **taken), taken


def check_fits(shapes: dict, text, autoencoder, latent_side: int, source) -> None:
    """The init model (its init_shapes) must take the configured text features and latents."""
    if (shapes["context_dim"], shapes["pooled_dim"]) != (text.context_dim, text.pooled_dim):
        raise ValueError(f"config key 'init': {source} expects context/pooled widths {shapes['context_dim']}/"
                         f"{shapes['pooled_dim']}, the text_encoder gives {text.context_dim}/{text.pooled_dim}; set "
                         f"text_encoder to the model's encoders (e.g. sd3:PIPELINE_DIR)")
    if shapes["in_channels"] != autoencoder.channels:
        raise ValueError(f"config key 'init': {source} takes {shapes['in_channels']}-channel latents, the autoencoder "
                         f"gives {autoencoder.channels}; set autoencoder to the model's (e.g. sd3-vae:DIR)")
    if latent_side % shapes["patch_size"]:
        raise ValueError(f"config key 'resolution': the latent side {latent_side} is not a multiple of the model's "
                         f"patch size {shapes['patch_size']}")


def attach_lora(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Freeze the model in cfg's frozen dtype and attach cfg's LoRA (float32); returns the adapted modules."""
    if cfg.effective_frozen_dtype == "bf16":
        model.to(torch.bfloat16)
    return attach(model, cfg.lora, cfg.lora_alpha, cfg.lora_targets, cfg.lora_blocks, cfg.lora_dropout)


class LoRATraining:
    """The trained adapters of a LoRA run and their EMA: what its checkpoints hold instead of whole models."""

    def __init__(self, model: torch.nn.Module, base: Path):
        self.model, self.base = model, base
        self.live = adapters(model)  # views of the trained parameters
        self.ema = {k: Adapter(a.down.detach().clone(), a.up.detach().clone(), a.alpha) for k, a in self.live.items()}

    def _tensors(self, lora: dict[str, Adapter]) -> list[torch.Tensor]:
        return [t for a in lora.values() for t in (a.down, a.up)]

    def full(self) -> tuple[dict[str, Adapter], dict[str, Adapter]]:
        """The raw and EMA adapters whole (gathered from their shards under FSDP: a collective)."""
        def gather(lora):
            return {k: Adapter(full_tensor(a.down), full_tensor(a.up), a.alpha) for k, a in lora.items()}
        return gather(self.live), gather(self.ema)

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * live."""
        torch._foreach_lerp_(self._tensors(self.ema), [t.detach() for t in self._tensors(self.live)], 1.0 - decay)

    def nonfinite(self, adapters: tuple | None = None) -> str | None:
        """The first adapter tensor (raw or EMA; or of the given full() pair) holding a non-finite value, or None."""
        for kind, lora in zip(("lora", "ema"), adapters or (self.live, self.ema)):
            for name, a in lora.items():
                if not (torch.isfinite(a.down).all() and torch.isfinite(a.up).all()):
                    return f"{kind}.{name}"
        return None

    def write(self, folder: Path, metadata: dict[str, str], adapters: tuple | None = None) -> None:
        """Raw and EMA adapters (or the given full() pair) as diffusers-layout LoRA files, named as a full run's
        weights are."""
        live, ema = adapters or (self.live, self.ema)
        # the model-file keys (format, config) stay out: this is a LoRA file, whose base is named instead
        header = {**{k: v for k, v in metadata.items() if k not in ("format", "config")}, BASE_KEY: str(self.base)}
        write_lora(live, folder / WEIGHT_FILES["raw"], "diffusers", {**header, "rectflow.weights": "raw"})
        write_lora(ema, folder / WEIGHT_FILES["ema"], "diffusers", {**header, "rectflow.weights": "ema"})

    def load(self, folder: Path) -> None:
        """Resume: the raw adapters into the model, the EMA ones into self.ema."""
        raw, _ = read_lora(folder / WEIGHT_FILES["raw"])
        load_adapters(self.model, raw, source=folder / WEIGHT_FILES["raw"], copy=copy_full_)
        ema, _ = read_lora(folder / WEIGHT_FILES["ema"])
        with torch.no_grad():
            for name, a in ema.items():
                copy_full_(self.ema[name].down, a.down)
                copy_full_(self.ema[name].up, a.up)

    @contextlib.contextmanager
    def ema_weights(self):
        """The model with the EMA adapters in place of the trained ones (for sample grids), restored after."""
        live = self._tensors(self.live)
        saved = [t.detach().clone() for t in live]
        with torch.no_grad():  # one copy_ per tensor: sharded (DTensor) adapters have no _foreach_copy_
            for t, e in zip(live, self._tensors(self.ema)):
                t.copy_(e)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for t, e in zip(live, saved):
                    t.copy_(e)
