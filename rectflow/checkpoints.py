"""Convert MM-DiT weights between the released (SD3 / SD3.5) layout, the diffusers layout and rectflow's own files.

rectflow's module names are the released checkpoints' keys, so one state dict serves three layouts. A released single
file holds `joint_blocks.N.x_block.attn.qkv.weight` and so on, optionally under `model.diffusion_model.` (a VAE and
text encoders bundled in the same file are ignored); its config is read off the keys and shapes. A rectflow file is
the same in safetensors with the model config as JSON in the metadata. A diffusers folder holds SD3Transformer2DModel's
state dict (diffusion_pytorch_model.safetensors, or shards) and config.json.

Pickle files (.ckpt, .pt, .pth, .bin) are read only with allow_pickle=True (--allow-pickle), then through
torch.load(weights_only=True). Every write goes to a temporary file that is renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rectflow.files import (SHARDED_INFO, atomic_path, check_safetensors, read_json, safetensors_metadata, write_json,
                            write_text_atomic)
from rectflow.lora import BASE_KEY, apply_loras, merge, read_lora
from rectflow.models import baselines
from rectflow.models.layouts import CONTEXT_BLOCK, GLOBAL, X_BLOCK
from rectflow.models.mmdit import RECTFLOW_TOKENS, MMDiT
from rectflow.runs import CHECKPOINTS, WEIGHT_FILES, is_complete, resolve_weights
from rectflow.models.released import (FORMAT_TAG, OTHER_COMPONENTS, PICKLE_SUFFIXES, PREFIX,  # noqa: F401
                                      CheckpointError, _listing, _read_pickle, _read_safetensors, check_state_dict,
                                      infer_config, metadata_config, read_released)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_QK_NORM = {None: None, "rms": "rms_norm", "ln": "layer_norm"}
UNCOND_KEY = "rectflow.uncond_prompt"  # header key: JSON of the prompt whose encoding is CFG's unconditional input
TRAIN_CONFIG_KEY = "rectflow.train_config"  # header key: JSON of the training config of a rectflow run's weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (rectflow.files.atomic_path)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ----- the released layout ---------------------------------------------------------------------------------------


def build_model(config: dict, sd: dict, source, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of `config` holding exactly the tensors of `sd` (checked first; no memory spent on a random init):
    an MMDiT, or the architecture-study baseline its "arch" key names (rectflow.models.baselines)."""
    with torch.device("meta"):
        if "arch" not in config:
            model = MMDiT.from_config(config)
        else:
            try:
                model = baselines.from_config(config)
            except (TypeError, ValueError) as err:  # an unknown arch or key: name the file
                raise CheckpointError(f"{source}: cannot build the stored {config['arch']!r} model ({err})") from err
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, assign=True)
    return model if dtype is None else model.to(dtype)




def from_single_file(path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> torch.nn.Module:
    """An MMDiT from a released SD3 / SD3.5 single file (config inferred), or the model of a rectflow file (config
    in metadata; a baseline's has an "arch" key)."""
    sd, metadata = read_released(path, allow_pickle=allow_pickle)
    config = metadata_config(metadata, path) or infer_config(sd, source=path)
    return build_model(config, sd, path, dtype)


def uncond_prompt_of(metadata: dict[str, str]) -> str | None:
    """CFG's unconditional prompt of a weights file: as recorded, else "" for released files (SD3's reference
    sampler) and None (zeros, what text dropout taught) for rectflow training files."""
    if UNCOND_KEY in metadata:
        return json.loads(metadata[UNCOND_KEY])
    return None if TRAIN_CONFIG_KEY in metadata else ""


def train_config_of(metadata: dict[str, str]) -> dict | None:
    """The training config a weights header records (rectflow runs, checkpoints, the shipped model), or None (released
    SD3 / SD3.5 files and other weights)."""
    return json.loads(metadata[TRAIN_CONFIG_KEY]) if TRAIN_CONFIG_KEY in metadata else None


def model_hash(path) -> str | None:
    """The file's 'Model hash' as AUTOMATIC1111 and Civitai show it (AutoV2: the first 10 hex digits of its
    SHA-256); remembered per (path, size, mtime) in the user's cache so a 16 GB file is read once. None for folders."""
    path = Path(path)
    if not path.is_file():
        return None
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rectflow" / "model_hashes.json"
    try:
        known = read_json(cache) or {}
    except (ValueError, OSError):  # a damaged cache file is rebuilt
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
        known[key] = digest.hexdigest()[:10]
        try:
            write_json(cache, known)
        except OSError:  # a read-only home: the hash is still right, only not remembered
            pass
    return known[key]


def save_released(model: MMDiT, path, prefix: bool = False) -> None:
    """Write the state dict in the released single-file layout (optionally under `model.diffusion_model.`)."""
    head = PREFIX if prefix else ""
    _atomic_save({head + k: v for k, v in model.state_dict().items()}, Path(path))


def save_model(model: MMDiT, path) -> None:
    """Write a rectflow file: released-layout safetensors with the config as JSON in the metadata."""
    metadata = {"format": FORMAT_TAG, "config": json.dumps(model.config)}
    _atomic_save(model.state_dict(), Path(path), metadata=metadata)


def load_model(path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> torch.nn.Module:
    """Load any supported checkpoint: a rectflow file (an MM-DiT or a baseline, rectflow.models.baselines), a
    released file, a diffusers folder, or a LoRA run's weights (its base with the LoRA merged)."""
    path = Path(path)
    if path.is_dir() and (path / SHARDED_INFO).is_file():
        return load_sharded(path, dtype)
    if path.is_dir():
        return load_diffusers(path, dtype=dtype, allow_pickle=allow_pickle)
    base = _lora_base(path)
    if base is not None:  # a LoRA run's checkpoint: its base weights with the LoRA merged
        model = load_model(base, allow_pickle=allow_pickle).float()
        merge(model, read_lora(path)[0], source=f"LoRA file {path}")
        return model if dtype is None else model.to(dtype)
    return from_single_file(path, dtype=dtype, allow_pickle=allow_pickle)


def load_sharded(folder: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of a sharded weights folder (checkpoint_format: sharded), consolidated in this process: built from
    its recorded config, every tensor read whole from the shards by torch.distributed.checkpoint (whatever the
    number of processes that wrote them)."""
    import torch.distributed.checkpoint as dcp  # only sharded checkpoints need it

    meta = safetensors_metadata(folder)
    config = metadata_config(meta, folder)
    if config is None or "rectflow.dcp_key" not in meta:
        raise CheckpointError(f"{folder / SHARDED_INFO}: no rectflow model config or dcp_key")
    with torch.device("meta"):
        model = MMDiT.from_config(config) if "arch" not in config else baselines.from_config(config)
    model.to_empty(device="cpu")
    key = meta["rectflow.dcp_key"]
    target = {key: model.state_dict()}  # the model's own tensors: loading fills them in place
    try:
        dcp.load(target, checkpoint_id=str(folder), no_dist=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: the shards do not load into the recorded model ({err})") from err
    return model if dtype is None else model.to(dtype)


def _lora_base(path: Path) -> Path | None:
    """The base weights a training run's LoRA file names in its header, or None for other files."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    base = (check_safetensors(path).get("__metadata__") or {}).get(BASE_KEY)
    if base is None:
        return None
    if not Path(base).exists():
        raise FileNotFoundError(f"{path} is a LoRA of {base}, which does not exist (moved?); sample with the base "
                                f"file and --lora {path}")
    return Path(base)


# ----- the diffusers layout --------------------------------------------------------------------------------------

def _module_map(depth: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(released module, diffusers modules, swap) for a model of `depth` blocks. diffusers orders the 2-output adaLN
    (final layer, pre-only last context block) as (scale, shift) where the released files have (shift, scale)."""
    pairs = [(r, d, r == "final_layer.adaLN_modulation.1") for r, d in GLOBAL]
    for i in range(depth):
        pairs += [(f"joint_blocks.{i}.x_block.{r}", tuple(f"transformer_blocks.{i}.{m}" for m in d), False)
                  for r, d in X_BLOCK]
        pairs += [(f"joint_blocks.{i}.context_block.{r}", tuple(f"transformer_blocks.{i}.{m}" for m in d),
                   i == depth - 1 and r == "adaLN_modulation.1") for r, d in CONTEXT_BLOCK]
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _split_key(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _depth_of(keys, pattern: str, source) -> int:
    """Number of blocks from keys like `<pattern>.N.`."""
    blocks = {int(m.group(1)) for k in keys for m in [re.match(pattern + r"\.(\d+)\.", k)] if m}
    if not blocks:
        raise CheckpointError(f"{source}: no {pattern}.N.* keys")
    return max(blocks) + 1


def to_diffusers_state_dict(sd: dict, source="state dict") -> dict:
    """Released-layout state dict -> SD3Transformer2DModel state dict (q, k, v split; 2-output adaLN swapped)."""
    table = {r: (d, swap) for r, d, swap in _module_map(_depth_of(sd, "joint_blocks", source))}
    out, unknown = {}, []
    for key, value in sd.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        module, param = _split_key(key)
        if module not in table:
            unknown.append(key)
            continue
        targets, swap = table[module]
        value = _swap_halves(value) if swap else value
        for target, part in zip(targets, value.chunk(len(targets), dim=0)):
            out[f"{target}.{param}"] = part
    if unknown:
        raise CheckpointError(f"{source}: keys with no diffusers counterpart [{len(unknown)}]: {_listing(unknown)}")
    return out


def from_diffusers_state_dict(dsd: dict, source="diffusers state dict") -> dict:
    """SD3Transformer2DModel state dict -> released-layout state dict (the inverse of to_diffusers_state_dict)."""
    reverse = {}
    for released, targets, swap in _module_map(_depth_of(dsd, "transformer_blocks", source)):
        for i, target in enumerate(targets):
            reverse[target] = (released, i, len(targets), swap)
    parts: dict[str, list] = {}
    swaps, unknown = {}, []
    for key, value in dsd.items():
        if key == "pos_embed.pos_embed":
            parts["pos_embed"] = [value]
            continue
        module, param = _split_key(key)
        if module not in reverse:
            unknown.append(key)
            continue
        released, i, n, swap = reverse[module]
        parts.setdefault(f"{released}.{param}", [None] * n)[i] = value
        swaps[f"{released}.{param}"] = swap
    if unknown:
        raise CheckpointError(f"{source}: keys with no released counterpart [{len(unknown)}]: {_listing(unknown)}")
    incomplete = sorted(k for k, v in parts.items() if any(p is None for p in v))
    if incomplete:
        raise CheckpointError(f"{source}: q/k/v projections incomplete for {_listing(incomplete)}")
    out = {}
    for key, pieces in parts.items():
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        out[key] = _swap_halves(value) if swaps.get(key) else value
    return out


def diffusers_config(config: dict, pos_embed_max_size: int | None = None) -> dict:
    """The SD3Transformer2DModel config.json of a rectflow config (with the rectflow config kept under a private
    key that diffusers ignores, so the way back is exact)."""
    for key, what in RECTFLOW_TOKENS.items():
        if config.get(key):
            raise CheckpointError(f"a model with {config[key]} {what} has no diffusers layout (SD3's transformer has "
                                  f"none); keep it in the rectflow layout")
    if config["mlp_ratio"] != 4.0:
        raise CheckpointError(f"the diffusers layout has MLP ratio 4; this model has {config['mlp_ratio']}")
    max_size = config["pos_embed_max_size"] or pos_embed_max_size
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": config["input_size"], "patch_size": config["patch_size"],
        "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "num_layers": config["depth"], "num_attention_heads": config["num_heads"],
        "attention_head_dim": config["hidden_size"] // config["num_heads"],
        "joint_attention_dim": config["context_dim"], "caption_projection_dim": config["hidden_size"],
        "pooled_projection_dim": config["pooled_dim"], "pos_embed_max_size": max_size,
        "dual_attention_layers": list(config["dual_attention_layers"]),
        "qk_norm": DIFFUSERS_QK_NORM[config["qk_norm"]],
        "_rectflow_config": config,
    }


def save_diffusers(model: MMDiT, folder, pos_embed_max_size: int | None = None) -> None:
    """Write a diffusers SD3Transformer2DModel folder (config.json + diffusion_pytorch_model.safetensors).

    diffusers always crops a fixed table; a model that computes positions on the fly gets its grid materialised as
    a pos_embed_max_size^2 table, which must then be given.
    """
    folder = Path(folder)
    sd = dict(model.state_dict())
    if model.pos_embed is None:
        if pos_embed_max_size is None:
            raise CheckpointError("this model computes positions on the fly; the diffusers layout needs a fixed "
                                  "table: pass pos_embed_max_size (--pos-embed-max-size), the largest token side")
        m = pos_embed_max_size
        sd["pos_embed"] = model._grid_embedding(m, m, total=m).unsqueeze(0).to(model.x_embedder.proj.weight.dtype)
    config = diffusers_config(model.config, pos_embed_max_size)
    _atomic_save(to_diffusers_state_dict(sd), folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")


def _read_diffusers_weights(folder: Path, allow_pickle: bool) -> dict:
    """The state dict of a diffusers model folder: single or sharded safetensors, or (opt-in) a pickle .bin."""
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return _read_safetensors(folder / DIFFUSERS_WEIGHTS)[0]
    if (folder / DIFFUSERS_INDEX).is_file():
        weight_map = json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_safetensors(folder / shard)[0])
        return sd
    if (folder / "diffusion_pytorch_model.bin").is_file():
        return _read_pickle(folder / "diffusion_pytorch_model.bin", allow_pickle)
    raise CheckpointError(f"{folder} has no {DIFFUSERS_WEIGHTS} (nor a sharded index or .bin)")


def load_diffusers(folder, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> MMDiT:
    """An MMDiT from a diffusers SD3Transformer2DModel folder (or a pipeline folder with a transformer/ subfolder)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json)")
    dconfig = json.loads((folder / "config.json").read_text())
    sd = from_diffusers_state_dict(_read_diffusers_weights(folder, allow_pickle), source=folder)
    config = dconfig.get("_rectflow_config")
    if config is None:
        config = infer_config(sd, source=folder, num_heads=dconfig.get("num_attention_heads"),
                              input_size=dconfig.get("sample_size"))
        projection = dconfig.get("caption_projection_dim", config["hidden_size"])
        if projection != config["hidden_size"]:
            raise CheckpointError(f"{folder}: caption_projection_dim {projection} differs from the hidden size "
                                  f"{config['hidden_size']}; MM-DiT needs them equal")
    elif config.get("pos_embed_max_size") is None:
        sd.pop("pos_embed", None)  # the table was materialised on export; this model computes it
    return build_model(config, sd, folder, dtype)


# ----- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rectflow convert`."""
    parser.add_argument("src", help="a released SD3/SD3.5 or rectflow .safetensors file, a diffusers folder, or a "
                                    "training run or checkpoint folder (sharded checkpoints are consolidated)")
    parser.add_argument("--weights", choices=sorted(WEIGHT_FILES), default=None,
                        help="of a run or checkpoint folder: the EMA (default) or the raw weights")
    parser.add_argument("dst", help="output file (rectflow, sd3) or folder (diffusers)")
    parser.add_argument("--to", choices=["rectflow", "diffusers", "sd3"], default=None,
                        help="output layout; unset: rectflow for a .safetensors dst, else diffusers")
    parser.add_argument("--prefix", action="store_true",
                        help="with --to sd3: put the keys under model.diffusion_model. as the released files do")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights; unset keeps the stored dtype")
    parser.add_argument("--pos-embed-max-size", type=int, default=None,
                        help="with --to diffusers, for models without a position table: the table side to write")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt/.pt/.bin sources (loaded with torch.load(weights_only=True))")
    parser.add_argument("--merge-lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="bake a LoRA (any layout rectflow convert-lora reads) into the weights, scaled "
                             "(default 1); repeatable, applied in order")


def source_weights(src: str, weights: str | None) -> Path:
    """The weights `rectflow convert` reads: a run's or checkpoint folder's (rectflow.runs.resolve_weights; EMA
    unless asked), else src itself."""
    path = Path(src)
    if (path / CHECKPOINTS).is_dir():
        return resolve_weights(run=src, weights=weights)
    if path.is_dir() and is_complete(path):
        return resolve_weights(checkpoint=src, weights=weights)
    if weights is not None:
        raise ValueError(f"--weights picks the weights of a run or checkpoint folder; {src} is neither")
    return path


def run(args) -> int:
    """Convert args.src to args.dst."""
    to = args.to or ("rectflow" if str(args.dst).endswith(".safetensors") else "diffusers")
    if args.prefix and to != "sd3":
        print("rectflow convert: error: --prefix only applies to --to sd3", file=sys.stderr)
        return 2
    try:
        model = load_model(source_weights(args.src, args.weights), allow_pickle=args.allow_pickle)
        apply_loras(model, args.merge_lora)  # before any cast: the update is added in float32
        if args.dtype:
            model = model.to(DTYPES[args.dtype])
        if "arch" in model.config and to != "rectflow":
            raise CheckpointError(f"{args.src} holds a {model.config['arch']} model (an architecture-study baseline); "
                                  f"only MM-DiTs have the {to} layout: use --to rectflow")
        if to == "rectflow":
            save_model(model, args.dst)
        elif to == "sd3":
            save_released(model, args.dst, prefix=args.prefix)
        else:
            save_diffusers(model, args.dst, pos_embed_max_size=args.pos_embed_max_size)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and DamagedFile are ValueErrors
        print(f"rectflow convert: error: {err}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({to} layout, {n / 1e6:.1f}M parameters, config {json.dumps(model.config)})")
    return 0
