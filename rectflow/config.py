"""The training configuration: one dataclass, read from YAML, overridden from the command line.

Every field carries its help text, which `rectflow train --help` and docs/training.md show. Precedence, lowest first:
the defaults below (a recipe that learns fast on 2 CPU cores), a YAML file (`--config`), direct flags (`--lr 3e-4`),
then `--set key=value` overrides in order. Unknown keys and badly typed values are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rectflow.files import write_text_atomic
from rectflow.flow import Formulation


# the networks rectflow.models.baselines builds (ARCHITECTURES), listed here so the config needs no torch import
ARCHS = ("mmdit", "mmdit3", "dit", "crossdit", "uvit")
# share of training samples with every text encoder dropped when text_drop is null (docs/paper.md §4)
AUTO_UNCOND = 0.1


def _f(default, help: str, choices: tuple | None = None, resume: bool = False):
    """A dataclass field with its help text (and allowed values) in the metadata. resume=True: the field may change
    when a run is resumed (it does not change what the run computes up to its end)."""
    meta = {"help": help, "choices": choices, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run (the run directory is given separately, `--out`)."""

    # data and conditioning
    data: str = _f("shapes", "training data: 'shapes' (procedural scenes), 'emoji' (Noto glyphs) or a folder of "
                             "images with captions")
    data_options: dict = _f({}, "extra keyword arguments for the data set (see rectflow.data.get_dataset)")
    resolution: int = _f(32, "image side in pixels (square); the latent side is resolution / autoencoder factor")
    text_encoder: str = _f("minilm", "text encoder spec: 'minilm' or 'sd3:clip_l=DIR,clip_g=DIR,t5=DIR'")
    autoencoder: str = _f("identity", "autoencoder spec: 'identity' (pixel space), 'sd3-vae:DIR', "
                                      "'small:PATH.safetensors', 'shapes-ae' or 'shapes-ae-f8' (the shipped "
                                      "SmallAEs of the shapes)")
    text_drop: float | None = _f(None, "probability of zeroing each text encoder's output, independently per "
                                       "sample; also what classifier-free guidance relies on. null: automatic, "
                                       "0.1 ** (1 / k) for k text encoders, so that 10% of samples see no text "
                                       "(k = 3: 0.464, docs/paper.md §4; MiniLM's single encoder: 0.1)")
    # the forward process (docs/paper.md §1-3, 5)
    formulation: str = _f("rf/lognorm(0.00, 1.00)", "forward process and loss, any name of docs/paper.md §1-3 "
                                                    "(e.g. rf, rf/lognorm(0.00, 1.00), rf/mode(1.29), eps/linear, "
                                                    "v/cos, edm(0.00, 0.60), edm/rf)")
    shift: float = _f(1.0, "resolution-dependent timestep shift alpha applied to training t (docs/paper.md §5; "
                           "SD3 uses 3.0 at 1024px); also the default shift of sample grids")
    # the model (docs/paper.md §4)
    arch: str = _f("mmdit", "network: 'mmdit' (the paper's MM-DiT, as depth, hidden and heads give it) or a baseline "
                            "of the architecture study (docs/paper.md §4) built at that MM-DiT's parameter count and "
                            "head count: 'mmdit3' (three weight sets), 'crossdit', 'uvit' or 'dit' "
                            "(rectflow.models.baselines)", ARCHS)
    depth: int = _f(6, "number of MM-DiT blocks d")
    hidden: int | None = _f(192, "hidden size; null means 64 * depth as in the paper")
    heads: int | None = _f(3, "attention heads; null means depth (head dim 64) as in the paper")
    patch_size: int = _f(4, "side of the square patches cut from the latent (the paper uses 2 on 32x32 latents)")
    qk_norm: str = _f("rms", "normalisation of queries and keys per head (docs/paper.md §4)", ("none", "rms", "ln"))
    grad_checkpointing: bool = _f(False, "recompute block activations in the backward pass (less memory, slower)")
    compile: bool = _f(False, "torch.compile each transformer block (training and sample grids; the first steps "
                              "pay the compilation)")
    grad_checkpointing_every: int = _f(1, "with grad_checkpointing, recompute every k-th MM-DiT block only (blocks "
                                          "0, k, 2k, ...): memory between none and all; 1: every block")
    instance_prompt: str | None = _f(None, "the caption of every folder image that has none (DreamBooth style, e.g. "
                                           "'a photo of sks dog'); null: such images train with the empty caption")
    class_prompt: str | None = _f(None, "DreamBooth prior preservation: before training the base model draws "
                                        "class_images images of this prompt (e.g. 'a photo of a dog'), and every step "
                                        "adds a batch of them, their loss weighted by prior_weight; null: off")
    class_images: int = _f(100, "how many class images prior preservation generates")
    prior_weight: float = _f(1.0, "weight of the class images' loss against the instance loss")
    buckets: bool = _f(False, "aspect-ratio buckets (folders of images): each image keeps about its shape at "
                              "about resolution^2 pixels, sides multiples of patch x autoencoder factor, aspect "
                              "ratios up to data_options.max_ratio (default 2); batches come from one bucket")
    # fine-tuning (docs/finetune.md)
    init: str | None = _f(None, "start from these weights: a released SD3 / SD3.5 single file, a diffusers folder, a "
                                "rectflow weights file, checkpoint or run directory (its EMA weights); the "
                                "architecture comes from the file (arch, depth, hidden, heads, patch_size and qk_norm "
                                "are then ignored; registers and text_positions stay 0 or match the file's); null: a "
                                "new model")
    lora: int = _f(0, "LoRA rank: train low-rank adapters of lora_targets (peft) and keep the other weights frozen, "
                      "writing diffusers-layout LoRA files; 0: train all weights")
    lora_alpha: float | None = _f(None, "LoRA alpha: the update is scaled by alpha / rank; null: the rank (scale 1)")
    lora_targets: str = _f("attn", "layers the LoRA adapts: 'attn' (the attention projections of both streams), "
                                   "'attn-mlp' (and the MLPs), 'all-linear', or a regex over whole module names "
                                   "(e.g. 'joint_blocks\\.\\d+\\.x_block\\.attn\\.qkv')")
    lora_blocks: str | None = _f(None, "joint blocks the LoRA adapts, e.g. '0-5,12'; null: all")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input")
    frozen_dtype: str | None = _f(None, "dtype of the frozen base weights of a LoRA run (the LoRA stays float32): "
                                        "bf16 halves their memory and needs bf16 autocast; null: bf16 when bf16 is "
                                        "on, else fp32", (None, "bf16", "fp32"))
    # optimisation
    batch_size: int = _f(64, "global batch size (all processes and accumulation micro-steps together)")
    grad_accum: int = _f(1, "gradient accumulation: micro-steps per optimizer step")
    max_steps: int = _f(1500, "optimizer steps to train", resume=True)
    lr: float = _f(1e-3, "AdamW peak learning rate (the paper: 1e-4 at batch 1024)")
    warmup_steps: int = _f(100, "linear learning-rate warm-up steps (the paper: 1000)")
    lr_schedule: str = _f("cosine", "learning rate after warm-up: constant, or cosine decay to min_lr at max_steps",
                          ("constant", "cosine"))
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")
    betas: list = _f([0.9, 0.999], "AdamW betas [beta1, beta2]")
    adam_eps: float | None = _f(None, "AdamW epsilon; null means 1e-15 with qk_norm (docs/paper.md §4) and 1e-8 "
                                      "without")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    bf16: bool = _f(True, "bfloat16 autocast for the model's forward pass, on CPU and GPU (weights and optimizer "
                          "stay float32); on a CPU without native bf16 (AVX512-BF16 or AMX) a run trains in fp32 "
                          "instead (except a LoRA over bf16 frozen weights), where emulated bf16 is 3-90x slower")
    ema_decay: float = _f(0.999, "decay of the exponential moving average of the weights (the paper: 0.99)")
    ema_every: int = _f(1, "update the EMA every N optimizer steps (the paper: every 100)")
    ema_warmup: bool = _f(True, "use decay min(ema_decay, (1 + k) / (10 + k)) at the k-th EMA update, so the EMA of a "
                                "short run is not dominated by the initial weights; off for the paper's setting")
    ema_power: float | None = _f(None, "power-function EMA (EDM2): decay (1 - 1/k)^(gamma + 1) at the k-th update, "
                                       "an average over a fixed share of training however long it runs (6.94: "
                                       "relative width 0.10, 16.97: 0.05); null: the exponential ema_decay")
    optimizer: str = _f("adamw", "adamw, or muon: Muon (orthogonalised momentum, torch.optim.Muon with AdamW-matched "
                                 "update RMS) for the transformer blocks' matrices, AdamW for the rest",
                        ("adamw", "muon"))
    objective: str = _f("flow", "flow: the formulation's loss on the data; dpo: Diffusion-DPO on preference pairs "
                                "(data: a preferences .jsonl), the policy a LoRA (lora > 0) of the init model, the "
                                "reference that model", ("flow", "dpo"))
    dpo_beta: float = _f(1000.0, "DPO: the inverse temperature beta on the per-sample loss differences (errors are "
                                 "means over latent values: larger betas than for sums)")
    contrastive: float = _f(0.0, "contrastive flow matching weight lambda: each sample's loss minus lambda x its "
                                 "error against the target of a batch sample with another caption; 0: off")
    dispersive: float = _f(0.0, "dispersive loss weight (Wang & He 2025): lambda x log mean_ij exp(-||h_i - h_j||^2 / "
                                "d) over the batch's image tokens after the middle block, which spreads the "
                                "representations apart with no positive pairs and no pretrained network; 0: off")
    registers: int = _f(0, "learned register tokens appended to the text tokens of the joint attention (a rectflow "
                           "model option: no released layout has them); 0: none")
    text_positions: int = _f(0, "learned position embeddings of the first N text tokens, added to the context "
                                "stream (a rectflow model option: no released layout has them; the joint attention "
                                "is otherwise blind to word order); N >= the text length, e.g. 12; 0: none")
    route_fraction: float = _f(0.0, "token routing (TREAD): this share of each image's tokens, drawn per sample and "
                                    "step, skips blocks route_start..route_end-1 in training; 0: off")
    route_start: int = _f(1, "token routing: the first block the routed tokens skip")
    route_end: int = _f(-1, "token routing: the block where they rejoin (negative: counted from the end; -1 is the "
                            "last block, which always sees every token)")
    max_bad_steps: int = _f(20, "abort after this many non-finite losses (or gradient norms) in a row; each one "
                                "skips its step", resume=True)
    seed: int = _f(0, "seed of the model init, the data order and all training noise")
    parallel: str = _f("ddp", "several processes (torchrun): ddp replicates the model, fsdp shards model, EMA and "
                              "optimizer over them (FSDP2), hsdp shards within groups of fsdp_shard_size processes "
                              "and replicates across groups", ("ddp", "fsdp", "hsdp"))
    fsdp_shard_size: int = _f(0, "hsdp: processes per shard group (a node's GPUs); 0: LOCAL_WORLD_SIZE")
    fsdp_mixed_precision: bool | None = _f(None, "fsdp/hsdp: bf16 parameters for compute and all-gathers, fp32 "
                                                 "gradient reduction; null: when bf16 is on")
    fsdp_cpu_offload: bool = _f(False, "fsdp/hsdp: keep parameters, gradients and optimizer state on the CPU (the "
                                       "step runs there); frees accelerator memory for larger models")
    device: str = _f("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'; under torchrun each "
                             "process uses cuda:LOCAL_RANK", resume=True)
    # bookkeeping
    checkpoint_every: int = _f(500, "write a checkpoint every N steps (and always at the end); 0: only at the end",
                               resume=True)
    checkpoint_format: str = _f("full", "full: rank 0 writes whole safetensors files (gathered from shards under "
                                        "FSDP); sharded: every rank writes its shards (torch.distributed.checkpoint), "
                                        "rectflow convert consolidates them", ("full", "sharded"))
    checkpoint_async: bool = _f(True, "sharded checkpoints: written by a background thread from a CPU copy while "
                                      "training goes on", resume=True)
    keep_last: int = _f(2, "keep the newest N checkpoints, delete older ones", resume=True)
    log_every: int = _f(10, "write TensorBoard scalars and refresh the progress bar every N steps "
                            "(metrics.jsonl gets every step)", resume=True)
    sample_every: int = _f(500, "write a sample grid of sample_prompts every N steps (and at the end); 0: never",
                           resume=True)
    sample_prompts: list | None = _f(None, "prompts of the sample grids; null means a fixed set chosen for the data",
                                     resume=True)
    sample_steps: int = _f(25, "solver steps of the sample grids", resume=True)
    sample_solver: str = _f("euler", "solver of the sample grids", ("euler", "heun", "dpmpp_2m"), resume=True)
    sample_cfg: float = _f(3.0, "classifier-free guidance scale of the sample grids", resume=True)
    val_every: int = _f(0, "validation loss at docs/paper.md §3's 8 t levels on val_size held-out images (EMA "
                           "weights) every N steps and at the end, logged as val_loss; 0: never", resume=True)
    val_size: int = _f(64, "validation images of the validation loss (the first of the data set's val split)",
                       resume=True)
    workers: int = _f(0, "DataLoader worker processes decoding images ahead of the steps (uncached data: pixel "
                         "space or endless data sets; cached latents are read directly); 0: in the training process",
                      resume=True)
    log_samples: bool = _f(False, "write each step's sample ids (data-set indices, or shard sample keys) to "
                                  "metrics.jsonl as 'samples', in global batch order", resume=True)
    release_encoders: bool | None = _f(None, "once a finite data set's text features and latents are all computed, "
                                             "free the text encoders and the autoencoder's encoder before training; "
                                             "null: when the text encoders are large (over 100M parameters: SD3's)",
                                       resume=True)
    profile_steps: int = _f(0, "write a torch profiler trace (Chrome format, <run>/profile/) of this many steps after "
                               "the first; 0: none", resume=True)
    cache_dir: str | None = _f(None, "folder for cached text features (one file per caption) and latents, shareable "
                                     "between runs; null: text features in memory only, latents in <run>/cache",
                                 resume=True)

    def validate(self) -> "TrainConfig":
        """Check value ranges and choices; raise ValueError naming the field."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"config key {f.name!r}: expected one of {list(choices)}, got {value!r}")
        positive = ["resolution", "depth", "patch_size", "batch_size", "grad_accum", "ema_every", "max_bad_steps",
                    "keep_last", "log_every", "sample_steps", "val_size", "grad_checkpointing_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ["max_steps", "warmup_steps", "checkpoint_every", "sample_every", "val_every", "workers",
                     "profile_steps", "fsdp_shard_size", "registers", "text_positions", "grad_clip", "min_lr",
                     "weight_decay", "shift"]:
            if getattr(self, name) < 0:
                raise ValueError(f"config key {name!r}: expected a value >= 0, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {f.name!r}: expected a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"config key 'lr': expected a value > 0, got {self.lr!r}")
        if not self.shift > 0:
            raise ValueError(f"config key 'shift': expected a value > 0, got {self.shift!r}")
        if self.text_drop is not None and not 0.0 <= self.text_drop <= 1.0:
            raise ValueError(f"config key 'text_drop': expected a probability in [0, 1], got {self.text_drop!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"config key 'ema_decay': expected a value in [0, 1), got {self.ema_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"config key 'betas': expected two values in [0, 1), got {self.betas!r}")
        if self.adam_eps is not None and self.adam_eps <= 0:
            raise ValueError(f"config key 'adam_eps': expected a value > 0 or null, got {self.adam_eps!r}")
        if self.class_prompt is not None and not self.init:
            raise ValueError("config key 'class_prompt': prior preservation needs a base model to draw the class "
                             "images; set init")
        if self.class_images < 1 or self.prior_weight < 0:
            raise ValueError(f"config keys 'class_images' / 'prior_weight': expected >= 1 / >= 0, got "
                             f"{self.class_images!r} / {self.prior_weight!r}")
        if self.objective == "dpo" and not self.lora:
            raise ValueError("config key 'objective': dpo trains a LoRA of the init model (its reference); set lora "
                             "(e.g. 128, the paper's rank) and init")
        if self.dpo_beta <= 0:
            raise ValueError(f"config key 'dpo_beta': expected a value > 0, got {self.dpo_beta!r}")
        if self.ema_power is not None and self.ema_power <= 0:
            raise ValueError(f"config key 'ema_power': expected a value > 0 or null, got {self.ema_power!r}")
        if not 0.0 <= self.contrastive < 1.0:
            raise ValueError(f"config key 'contrastive': expected a weight in [0, 1), got {self.contrastive!r}")
        if self.dispersive < 0:
            raise ValueError(f"config key 'dispersive': expected a weight >= 0, got {self.dispersive!r}")
        if not 0.0 <= self.route_fraction < 1.0:
            raise ValueError(f"config key 'route_fraction': expected a share in [0, 1), got {self.route_fraction!r}")
        if self.arch != "mmdit" and (self.registers or self.text_positions or self.route_fraction or self.dispersive):
            raise ValueError(f"config keys 'registers' / 'text_positions' / 'route_fraction' / 'dispersive': MM-DiT "
                             f"options (joint blocks); arch {self.arch!r} has none of them")
        if self.optimizer == "muon" and self.parallel != "ddp":
            raise ValueError(f"config key 'optimizer': muon is not available with parallel {self.parallel} (its "
                             f"orthogonalisation needs whole matrices); use adamw")
        if self.checkpoint_format == "sharded" and self.lora:
            raise ValueError("config key 'checkpoint_format': a LoRA run's checkpoints are its small adapter files; "
                             "use full")
        if self.lora < 0:
            raise ValueError(f"config key 'lora': expected a rank >= 1, or 0 for no LoRA, got {self.lora!r}")
        if self.lora and not self.init:
            raise ValueError("config key 'lora': a LoRA adapts existing weights; set init (a released file, a "
                             "diffusers folder or a rectflow run) to the model to fine-tune")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"config key 'lora_alpha': expected a value > 0 or null, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"config key 'lora_dropout': expected a value in [0, 1), got {self.lora_dropout!r}")
        if self.frozen_dtype == "bf16" and not self.bf16:
            raise ValueError("config key 'frozen_dtype': bf16 base weights need bf16 autocast (bf16: true)")
        try:
            Formulation.from_name(self.formulation)
        except ValueError as err:
            raise ValueError(f"config key 'formulation': {err}") from None
        if self.batch_size % self.grad_accum:
            raise ValueError(f"config key 'batch_size': {self.batch_size} is not divisible by "
                             f"grad_accum = {self.grad_accum}")
        return self

    def effective_text_drop(self, n_encoders: int) -> float:
        """text_drop, or when null 0.1 ** (1 / k) for k text encoders: 10% of samples fully unconditional
        (docs/paper.md §4)."""
        if self.text_drop is not None:
            return self.text_drop
        return AUTO_UNCOND ** (1 / max(1, n_encoders))

    @property
    def effective_adam_eps(self) -> float:
        """AdamW epsilon: the paper pairs QK-normalisation with eps = 1e-15 (docs/paper.md §4)."""
        if self.adam_eps is not None:
            return self.adam_eps
        return 1e-15 if self.qk_norm != "none" else 1e-8

    @property
    def checkpoint_every_block(self) -> int:
        """The models' gradient_checkpointing value: every k-th block recomputed, 0 for none."""
        return self.grad_checkpointing_every if self.grad_checkpointing else 0

    @property
    def effective_frozen_dtype(self) -> str:
        """frozen_dtype, or when null bf16 under bf16 autocast and fp32 otherwise."""
        return self.frozen_dtype or ("bf16" if self.bf16 else "fp32")

    def to_dict(self) -> dict:
        """Plain dict (YAML/JSON-serialisable), fields in declaration order."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict, checking every key and value type; errors name `source` and the key."""
        return apply_dict(cls(), d, source)

    def save(self, path: str | Path) -> None:
        """Write as YAML with each field's help as a comment above it."""
        lines = ["# rectflow training configuration (docs/training.md)"]
        for f in dataclasses.fields(self):
            lines.append(f"# {f.metadata['help']}")
            lines.append(_yaml_line(f.name, _plain(getattr(self, f.name))))
        write_text_atomic(path, "\n".join(lines) + "\n")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# fields that may change when a run is resumed: those declared with resume=True above
RESUME_CHANGEABLE = frozenset(name for name, f in FIELDS.items() if f.metadata["resume"])


def _yaml_line(name: str, value) -> str:
    """'name: value' with lists and dicts in flow style ([0.9, 0.999])."""
    if isinstance(value, (list, dict)):
        return f"{name}: {yaml.safe_dump(value, default_flow_style=True, width=1000).strip()}"
    return yaml.safe_dump({name: value}, sort_keys=False, width=1000).strip()


def _plain(value):
    """Lists and dicts as plain copies (no shared references between configs)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_type(name: str):
    """The declared type of a field, with Optional unwrapped: (base type, accepts None)."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """Check `value` against field `name`'s type (ints are accepted for floats); raise ValueError naming the key."""
    if name not in FIELDS:
        close = [k for k in FIELDS if k.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{source}: unknown config key {name!r}{hint}; known keys: {', '.join(FIELDS)}")
    tp, nullable = field_type(name)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{source}: config key {name!r} cannot be null (expected {tp.__name__})")
    base = typing.get_origin(tp) or tp
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }[base](value)
    if not ok:
        raise ValueError(f"{source}: config key {name!r} expects {base.__name__}"
                         f"{' or null' if nullable else ''}, got {value!r} ({type(value).__name__})")
    if base is float:
        return float(value)
    return _plain(value)


def apply_dict(cfg: TrainConfig, d: dict, source: str = "config") -> TrainConfig:
    """Return a copy of `cfg` with the keys of `d` replaced (type-checked)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a mapping of config keys, got {type(d).__name__}")
    changes = {k: coerce(k, v, source) for k, v in d.items()}
    return dataclasses.replace(cfg, **changes)


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value parsed as YAML); 'data_options.k=v' sets one entry of a dict field."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {text!r}: value of {key!r} is not valid YAML ({err})") from None
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `--set key=value` strings in order."""
    for text in overrides:
        key, value = parse_override(text)
        if "." in key:
            top, sub = key.split(".", 1)
            if top in FIELDS and field_type(top)[0] is dict:
                value = {**getattr(cfg, top), sub: value}
                key = top
        cfg = apply_dict(cfg, {key: value}, source=f"--set {text}")
    return cfg


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file over `base` (default: the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} " + ("is a directory" if path.is_dir() else "does not exist"))
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    return apply_dict(base or TrainConfig(), d, source=str(path))


RECIPES = Path(__file__).parent / "recipes"  # the demo and study recipes, YAML files shipped with the package


def recipe(name: str) -> dict:
    """The fields of recipe `name` (rectflow/recipes/NAME.yaml) as a dict: what it changes from the defaults."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(known)}")
    d = yaml.safe_load(path.read_text()) or {}
    apply_dict(TrainConfig(), d, source=str(path))  # every key and value checked
    return d
