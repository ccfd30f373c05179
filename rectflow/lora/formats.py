"""LoRA files: the rectflow, diffusers/PEFT, kohya and ComfyUI layouts (rectflow.lora), detected from the keys on
reading, any of them written, with their alphas."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rectflow.files import atomic_path, check_safetensors
from rectflow.lora.adapter import (BLOCK_FORWARD, GLOBAL_FORWARD, Adapter, diffusers_modules,
                                   from_diffusers, to_diffusers)
from rectflow.runs import resolve_weights

FORMATS = ("rectflow", "diffusers", "kohya", "comfy")
RECTFLOW_TAG = "rectflow-lora"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # the header key diffusers' save_lora_weights writes
BASE_KEY = "rectflow.lora_base"  # header key of a training run's LoRA files: the weights file the LoRA adapts
# key prefixes of text-encoder LoRAs (kohya te1-3, diffusers text_encoder(_2)): rectflow adapts the transformer only
TEXT_ENCODER_KEYS = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|text_encoders\.)")


RECTFLOW_ROOTS = {"joint_blocks", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"}
DIFFUSERS_ROOTS = {"transformer", "base_model", "transformer_blocks", "time_text_embed", "pos_embed",
                   "context_embedder", "proj_out", "norm_out"}


def detect_format(keys) -> str:
    """Which of FORMATS a LoRA's keys are in (OneTrainer's lora_transformer_ keys count as diffusers)."""
    keys = [k for k in keys if not TEXT_ENCODER_KEYS.match(k)]
    if not keys:
        raise ValueError("no transformer LoRA keys")
    roots = {k.split(".")[0] for k in keys}
    if all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if roots == {"diffusion_model"}:
        return "comfy"
    if roots <= RECTFLOW_ROOTS:
        return "rectflow"
    if roots <= DIFFUSERS_ROOTS or all(k.startswith("lora_transformer_") for k in keys):
        return "diffusers"
    raise ValueError(f"keys in no known LoRA layout (e.g. {sorted(keys)[:3]}); expected rectflow "
                     f"(joint_blocks.N...lora_A.weight), diffusers (transformer.transformer_blocks.N...lora_A.weight), "
                     f"kohya (lora_unet_...lora_down.weight) or comfy (diffusion_model....lora_down.weight)")


def _pairs(tensors: dict, down: str, up: str, source) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{module: (down, up, alpha or None)} from keys `<module>.<down>`, `<module>.<up>`, `<module>.alpha`."""
    modules = sorted({k[:-len(s) - 1] for k in tensors for s in (down, up) if k.endswith("." + s)})
    out, problems = {}, []
    for m in modules:
        a, b = tensors.get(f"{m}.{down}"), tensors.get(f"{m}.{up}")
        if a is None or b is None:
            problems.append(f"{m}: its {down if a is None else up} is missing")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{m}: {down} {tuple(a.shape)} and {up} {tuple(b.shape)} are not a rank-r pair")
        else:
            alpha = tensors.get(f"{m}.alpha")
            out[m] = (a, b, None if alpha is None else float(alpha))
    known = {f"{m}.{s}" for m in modules for s in (down, up, "alpha")}
    unknown = sorted(set(tensors) - known)
    if unknown:
        problems.append(f"keys that are not LoRA weights ({down}/{up}/alpha): {unknown[:4]}"
                        f"{' ...' if len(unknown) > 4 else ''}")
    if problems:
        raise ValueError(f"LoRA file {source}: " + "; ".join(problems))
    return out


def _diffusers_alphas(metadata: dict, source) -> tuple[float | None, dict]:
    """(lora_alpha, alpha_pattern) of diffusers' adapter metadata (None: not recorded, alpha = rank)."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: header {DIFFUSERS_METADATA!r} is not JSON ({err})") from None
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    return config.get("lora_alpha"), config.get("alpha_pattern") or {}


def _diffusers_name(key_module: str) -> str:
    """A diffusers module name without the prefixes other tools add (transformer., base_model.model., OneTrainer's
    lora_transformer_ with underscores is resolved by read_lora)."""
    for prefix in ("transformer.", "base_model.model."):
        key_module = key_module.removeprefix(prefix)
    return key_module


def _underscore_table(names) -> dict[str, str]:
    """{name with dots as underscores: name}: kohya and OneTrainer flatten module names."""
    return {n.replace(".", "_"): n for n in names}


def _released_names(depth: int) -> list[str]:
    """Every linear module of an MM-DiT of `depth` blocks (with MMDiT-X's second attention) in the released layout."""
    return list(GLOBAL_FORWARD) + [f"joint_blocks.{i}.{r}" for i in range(depth) for r in BLOCK_FORWARD]


def _unflatten(modules: dict, prefix: str, names_of_depth, source) -> dict:
    """Map `prefix` + flattened module names back to dotted names."""
    depth = 1 + max((int(m.group(1)) for k in modules for m in [re.search(r"_blocks_(\d+)_", k)] if m), default=0)
    table = _underscore_table(names_of_depth(depth))
    out, bad = {}, []
    for k, v in modules.items():
        name = table.get(k.removeprefix(prefix))
        if name is None:
            bad.append(k)
        else:
            out[name] = v
    if bad:
        raise ValueError(f"{source}: modules with no MM-DiT counterpart: {bad[:4]}")
    return out


def read_lora(path) -> tuple[dict[str, Adapter], str]:
    """(adapters in rectflow's layout, format) of a LoRA file in any of FORMATS (or of a LoRA run directory or
    checkpoint directory: its EMA LoRA); text-encoder parts are skipped with a warning (rectflow adapts the
    transformer only)."""
    path = Path(path)
    if path.is_dir():  # a LoRA run (its latest EMA LoRA) or one of its checkpoint directories
        path = resolve_weights(run=str(path)) if (path / "checkpoints").is_dir() else resolve_weights(
            checkpoint=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA file {path}: only .safetensors LoRAs are read (never pickles)")
    metadata = check_safetensors(path).get("__metadata__") or {}
    tensors = load_file(str(path))
    text = sorted(k for k in tensors if TEXT_ENCODER_KEYS.match(k))
    if text:
        warnings.warn(f"{path}: skipping {len(text)} text-encoder LoRA tensors ({text[0]} ...); rectflow applies "
                      f"the transformer part only", stacklevel=2)
        tensors = {k: v for k, v in tensors.items() if k not in set(text)}
    try:
        fmt = detect_format(tensors)
    except ValueError as err:
        raise ValueError(f"LoRA file {path}: {err}") from None
    if fmt in ("kohya", "comfy"):
        pairs = _pairs(tensors, "lora_down.weight", "lora_up.weight", path)
        if fmt == "kohya":
            pairs = _unflatten(pairs, "lora_unet_", _released_names, path)
        else:
            pairs = {k.removeprefix("diffusion_model."): v for k, v in pairs.items()}
        lora = {m: Adapter(a, b, float(a.shape[0]) if alpha is None else alpha) for m, (a, b, alpha) in pairs.items()}
    elif fmt == "rectflow":
        alphas = json.loads(metadata.get("rectflow.lora_alphas", "{}"))
        pairs = _pairs(tensors, "lora_A.weight", "lora_B.weight", path)
        lora = {m: Adapter(a, b, float(alphas.get(m, a.shape[0]) if alpha is None else alpha))
                for m, (a, b, alpha) in pairs.items()}
    else:
        lora = from_diffusers(_read_diffusers(tensors, metadata, path), source=str(path))
    return lora, fmt


def _read_diffusers(tensors: dict, metadata: dict, source) -> dict[str, Adapter]:
    """diffusers-module adapters of a diffusers / PEFT / OneTrainer file."""
    if all(k.startswith("lora_transformer_") for k in tensors):  # OneTrainer: flattened diffusers names
        pairs = _pairs(tensors, "lora_down.weight", "lora_up.weight", source)
        names = lambda depth: [d for r in _released_names(depth) for d in diffusers_modules(r)]  # noqa: E731
        pairs = _unflatten(pairs, "lora_transformer_", names, source)
    else:
        pairs = {_diffusers_name(m): v for m, v in _pairs(tensors, "lora_A.weight", "lora_B.weight", source).items()}
    alpha, pattern = _diffusers_alphas(metadata, source)
    out = {}
    for module, (a, b, stored) in pairs.items():
        value = stored if stored is not None else pattern.get(module, alpha)
        out[module] = Adapter(a, b, float(a.shape[0]) if value is None else float(value))
    return out


def _diffusers_metadata(adapters: dict[str, Adapter]) -> dict:
    """The LoraConfig kwargs diffusers' load_lora_weights builds the adapter from: the most common rank and alpha,
    the others per module."""
    ranks = [a.rank for a in adapters.values()]
    alphas = [a.alpha for a in adapters.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(adapters),
            "rank_pattern": {m: a.rank for m, a in adapters.items() if a.rank != r},
            "alpha_pattern": {m: a.alpha for m, a in adapters.items() if a.alpha != alpha},
            "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}


def lora_tensors(lora: dict[str, Adapter], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a rectflow-layout LoRA written in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {list(FORMATS)}")
    tensors, metadata = {}, {"format": "pt"}
    if fmt == "diffusers":
        adapters = to_diffusers(lora)
        for m, a in adapters.items():
            tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"] = a.down, a.up
        config = {f"transformer.{k}": v for k, v in _diffusers_metadata(adapters).items()}
        metadata[DIFFUSERS_METADATA] = json.dumps(config, indent=2, sort_keys=True)
    elif fmt == "rectflow":
        for m, a in lora.items():
            tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a.down, a.up
        metadata.update({"format": RECTFLOW_TAG, "rectflow.lora_alphas": json.dumps({m: a.alpha for m, a in
                                                                                     lora.items()})})
    else:
        for m, a in lora.items():
            key = "lora_unet_" + m.replace(".", "_") if fmt == "kohya" else "diffusion_model." + m
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a.down, a.up
            tensors[f"{key}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    # copies: the split q, k, v share one A, and safetensors stores no shared memory
    return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata


def write_lora(lora: dict[str, Adapter], path, fmt: str = "diffusers", metadata: dict | None = None) -> None:
    """Write a LoRA file atomically in `fmt` (extra header metadata: strings, e.g. the training config)."""
    tensors, header = lora_tensors(lora, fmt)
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={**header, **(metadata or {})})


def parse_spec(spec: str) -> tuple[str, float]:
    """'FILE[:SCALE]' -> (file, scale); a Windows drive colon or a colon without a number belongs to the file."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0
