"""LoRA, low-rank adaptation of MM-DiT's linear layers: the files other tools read, merging, and training with peft.

A LoRA of a linear layer W [out, in] is a down projection A [r, in], an up projection B [out, r] and alpha: the layer
becomes W + (alpha / r) B A (times a user scale when applied). rectflow holds a LoRA as {module name: Adapter}, the
module names in rectflow's (= the released files') layout, where q, k and v are one fused `qkv` projection.

File formats (all are read, detected from the keys; `rectflow convert-lora --to` writes any):
  rectflow   joint_blocks.N.x_block.attn.qkv.lora_A.weight / .lora_B.weight, the alphas in the metadata
  diffusers  transformer.transformer_blocks.N.attn.to_q.lora_A.weight / .lora_B.weight (the PEFT layout, q, k, v
             separate), alpha in the `lora_adapter_metadata` header diffusers writes and its load_lora_weights reads
  kohya      lora_unet_joint_blocks_N_x_block_attn_qkv.lora_down.weight / .lora_up.weight / .alpha (sd-scripts' SD3)
  comfy      diffusion_model.joint_blocks.N.x_block.attn.qkv.lora_down.weight / .lora_up.weight / .alpha (ComfyUI's
             own key names; ComfyUI reads kohya and diffusers files too)

Fused <-> split, exactly: a fused qkv LoRA (A, B) is three q, k, v LoRAs sharing A, each with a third of B's rows
(same rank, same alpha). Three q, k, v LoRAs sharing one A fuse back to it; others fuse block-diagonally,
A = [Aq; Ak; Av] (rank 3r), B = diag(Bq, Bk, Bv) with alpha 3 alpha (the same alpha / r), which splits back exactly.
diffusers orders the two-output adaLN (final layer, pre-only last context block) as (scale, shift), the released
layout (shift, scale): B's row halves are swapped (rectflow.checkpoints).
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from rectflow.models.layouts import CONTEXT_BLOCK, GLOBAL, X_BLOCK
from rectflow.files import atomic_path, check_safetensors
from rectflow.runs import resolve_weights

FORMATS = ("rectflow", "diffusers", "kohya", "comfy")
RECTFLOW_TAG = "rectflow-lora"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # the header key diffusers' save_lora_weights writes
BASE_KEY = "rectflow.lora_base"  # header key of a training run's LoRA files: the weights file the LoRA adapts
# target presets (regexes over module names; anything else given is itself a regex)
TARGETS = {
    "attn": r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.(qkv|proj)",
    "attn-mlp": r"joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])",
    "all-linear": r".*",
}
# key prefixes of text-encoder LoRAs (kohya te1-3, diffusers text_encoder(_2)): rectflow adapts the transformer only
TEXT_ENCODER_KEYS = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|text_encoders\.)")


@dataclass
class Adapter:
    """One layer's LoRA: down A [r, in], up B [out, r], alpha (the update is alpha / r * B @ A)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update alpha / r * B @ A [out, in], in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


# ----- released <-> diffusers module names -----------------------------------------------------------------------

def _tables():
    """(released -> diffusers modules, diffusers module -> (released, part, parts)) over block-relative names."""
    forward = {}
    for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
        for r, d in table:
            forward[f"{stream}.{r}"] = d
    reverse = {m: (r, i, len(d)) for r, d in forward.items() for i, m in enumerate(d)}
    return forward, reverse


BLOCK_FORWARD, BLOCK_REVERSE = _tables()
GLOBAL_FORWARD = dict(GLOBAL)
GLOBAL_REVERSE = {d[0]: r for r, d in GLOBAL}


def diffusers_modules(module: str) -> tuple[str, ...]:
    """The diffusers module(s) of a released-layout module (three for a fused qkv)."""
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in BLOCK_FORWARD:
        return tuple(f"transformer_blocks.{m.group(1)}.{d}" for d in BLOCK_FORWARD[m.group(2)])
    if module in GLOBAL_FORWARD:
        return GLOBAL_FORWARD[module]
    raise ValueError(f"module {module!r} has no diffusers counterpart")


def released_module(module: str) -> tuple[str, int, int]:
    """(released module, part, parts) of a diffusers module: to_k is part 1 of 3 of its stream's qkv."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in BLOCK_REVERSE:
        r, i, n = BLOCK_REVERSE[m.group(2)]
        return f"joint_blocks.{m.group(1)}.{r}", i, n
    if module in GLOBAL_REVERSE:
        return GLOBAL_REVERSE[module], 0, 1
    raise ValueError(f"module {module!r} is not a module of diffusers' SD3Transformer2DModel")


def _swapped(module: str, adapter: Adapter) -> bool:
    """Whether diffusers orders this module's output rows (scale, shift): the final adaLN, and the pre-only last
    context block's, recognised by its two outputs per hidden unit."""
    if module == "final_layer.adaLN_modulation.1":
        return True
    return module.endswith("context_block.adaLN_modulation.1") and adapter.up.shape[0] == 2 * adapter.down.shape[1]


def _swap_up(adapter: Adapter) -> Adapter:
    """The same adapter with B's two row halves exchanged."""
    a, b = adapter.up.chunk(2, dim=0)
    return Adapter(adapter.down, torch.cat([b, a], dim=0), adapter.alpha)


def split(adapter: Adapter, parts: int) -> list[Adapter]:
    """A fused adapter as `parts` adapters of its output row blocks: per part A, B block and alpha of a block-diagonal
    fused one (see fuse), else the shared A with each B row block (exact either way)."""
    rows = adapter.up.chunk(parts, dim=0)
    r = adapter.rank
    if r % parts == 0 and parts > 1:
        k = r // parts
        blocks = [row.split(k, dim=1) for row in rows]
        if all(not blk.any() for i, row in enumerate(blocks) for j, blk in enumerate(row) if i != j):
            return [Adapter(down, blocks[i][i], adapter.alpha / parts)
                    for i, down in enumerate(adapter.down.split(k, dim=0))]
    return [Adapter(adapter.down, row, adapter.alpha) for row in rows]


def fuse(adapters: list[Adapter], source: str = "LoRA") -> Adapter:
    """The fused adapter of q, k, v (or any row blocks): the shared A when they share one (same alpha), else
    block-diagonal with A stacked (needs one scale alpha / r for all)."""
    first = adapters[0]
    if all(a.down.shape == first.down.shape and torch.equal(a.down, first.down) and a.alpha == first.alpha
           for a in adapters):
        return Adapter(first.down, torch.cat([a.up for a in adapters], dim=0), first.alpha)
    scales = {a.scale for a in adapters}
    if len(scales) > 1:
        raise ValueError(f"{source}: the q, k, v LoRAs have different scales alpha / rank {sorted(scales)}; they "
                         f"cannot be fused exactly into one qkv LoRA")
    up = torch.block_diag(*[a.up for a in adapters])
    down = torch.cat([a.down for a in adapters], dim=0)
    return Adapter(down, up, first.scale * down.shape[0])


def to_diffusers(lora: dict[str, Adapter]) -> dict[str, Adapter]:
    """rectflow-layout adapters -> diffusers-module adapters (fused qkv split, adaLN halves swapped)."""
    out = {}
    for module, adapter in lora.items():
        if _swapped(module, adapter):
            adapter = _swap_up(adapter)
        targets = diffusers_modules(module)
        for target, part in zip(targets, split(adapter, len(targets)) if len(targets) > 1 else [adapter]):
            out[target] = part
    return out


def from_diffusers(lora: dict[str, Adapter], source: str = "LoRA") -> dict[str, Adapter]:
    """diffusers-module adapters -> rectflow layout (q, k, v fused; a qkv needs all three or a zero part is used)."""
    groups: dict[str, list] = {}
    for module, adapter in lora.items():
        released, i, n = released_module(module)
        groups.setdefault(released, [None] * n)[i] = adapter
    out = {}
    for released, parts in groups.items():
        if any(p is None for p in parts):
            # a LoRA on some of q, k, v only: the missing ones are zero updates of the same rank and scale
            ref = next(p for p in parts if p is not None)
            parts = [p if p is not None else Adapter(torch.zeros_like(ref.down), torch.zeros_like(ref.up), ref.alpha)
                     for p in parts]
        adapter = parts[0] if len(parts) == 1 else fuse(parts, f"{source}: {released}")
        out[released] = _swap_up(adapter) if _swapped(released, adapter) else adapter
    return out


# ----- files -----------------------------------------------------------------------------------------------------

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


# ----- applying to a model ---------------------------------------------------------------------------------------

def check_lora(model: nn.Module, lora: dict[str, Adapter], source) -> None:
    """Every adapted module must be a linear layer of the model with the adapter's shapes."""
    modules = dict(model.named_modules())
    problems = []
    for name, a in sorted(lora.items()):
        layer = modules.get(name)
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None or weight.ndim != 2:
            problems.append(f"{name}: not a linear layer of this model")
        elif (a.up.shape[0], a.down.shape[1]) != tuple(weight.shape):
            problems.append(f"{name}: LoRA is {a.up.shape[0]} x {a.down.shape[1]}, the layer {tuple(weight.shape)}")
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{source} does not fit this model: {'; '.join(problems[:4])}{more}")


@torch.no_grad()
def merge(model: nn.Module, lora: dict[str, Adapter], scale: float = 1.0, source="LoRA") -> None:
    """W <- W + scale * alpha / r * B @ A for every adapted layer (in float32, stored in W's dtype)."""
    check_lora(model, lora, source)
    modules = dict(model.named_modules())
    for name, a in lora.items():
        w = modules[name].weight
        w.copy_((w.float() + scale * a.delta().to(w.device)).to(w.dtype))


def apply_loras(model: nn.Module, specs) -> list[dict]:
    """Merge each 'FILE[:SCALE]' LoRA (any format) into the model in turn; returns [{file, scale, format}]."""
    applied = []
    for spec in specs or ():
        path, scale = parse_spec(spec)
        lora, fmt = read_lora(path)
        merge(model, lora, scale, source=f"LoRA file {path}")
        applied.append({"file": str(path), "scale": scale, "format": fmt})
    return applied


# ----- training (peft) -------------------------------------------------------------------------------------------

def parse_blocks(spec: str | None) -> set[int] | None:
    """'0-5,12' -> {0, 1, 2, 3, 4, 5, 12}; None or '' -> None (all blocks)."""
    if not spec:
        return None
    blocks = set()
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"lora_blocks: {part.strip()!r} in {spec!r} is not a block index or range like 0-5")
        if lo_i < 0 or hi_i < lo_i:
            raise ValueError(f"lora_blocks: bad range {part.strip()!r} in {spec!r}")
        blocks |= set(range(lo_i, hi_i + 1))
    return blocks


def select_modules(model: nn.Module, targets: str, blocks: str | None = None) -> list[str]:
    """Names of the linear layers a LoRA adapts: `targets` is a preset of TARGETS or a regex matched against
    whole module names; `blocks` restricts block modules to those joint blocks."""
    pattern = TARGETS.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"lora_targets: {targets!r} is neither a preset {list(TARGETS)} nor a regex ({err})")
    wanted = parse_blocks(blocks)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not regex.fullmatch(name):
            continue
        m = re.match(r"joint_blocks\.(\d+)\.", name)
        if wanted is not None and (m is None or int(m.group(1)) not in wanted):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"lora_targets {targets!r} with lora_blocks {blocks!r} selects no linear layer of the model")
    depth = len(getattr(model, "joint_blocks", []))
    if wanted is not None and max(wanted) >= depth:
        raise ValueError(f"lora_blocks {blocks!r}: the model has blocks 0-{depth - 1}")
    return names


def attach(model: nn.Module, rank: int, alpha: float | None, targets: str = "attn", blocks: str | None = None,
           dropout: float = 0.0) -> list[str]:
    """Add trainable LoRA layers (peft, zero-initialised B so the model is unchanged) to the selected linear layers
    and freeze everything else; the LoRA weights are float32 whatever the base's dtype. Returns the module names."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    names = select_modules(model, targets, blocks)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=names,
                        lora_dropout=dropout, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return names


def _lora_layers(model: nn.Module):
    """(module name, peft LoRA layer) pairs of a model with attached LoRAs."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield name, module


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The model's attached LoRAs (views of the trained weights) as {module name: Adapter}."""
    return {name: Adapter(m.lora_A["default"].weight, m.lora_B["default"].weight, float(m.lora_alpha["default"]))
            for name, m in _lora_layers(model)}


@torch.no_grad()
def load_adapters(model: nn.Module, lora: dict[str, Adapter], source="LoRA") -> None:
    """Copy a LoRA into the model's attached layers (resume): the same modules, ranks and alphas."""
    have = adapters(model)
    if set(have) != set(lora):
        missing, extra = sorted(set(have) - set(lora)), sorted(set(lora) - set(have))
        raise ValueError(f"{source}: LoRA modules differ from the run's (missing {missing[:3]}, extra {extra[:3]})")
    for name, a in lora.items():
        if (have[name].down.shape, have[name].up.shape, have[name].alpha) != (a.down.shape, a.up.shape, a.alpha):
            raise ValueError(f"{source}: {name} has rank/alpha {a.rank}/{a.alpha}, the run "
                             f"{have[name].rank}/{have[name].alpha}")
        have[name].down.copy_(a.down)
        have[name].up.copy_(a.up)


# ----- command line: rectflow convert-lora -----------------------------------------------------------------------

def add_arguments(parser) -> None:
    """Arguments of `rectflow convert-lora`."""
    parser.add_argument("src", help="a LoRA .safetensors file in any layout (rectflow, diffusers/PEFT, kohya, comfy, "
                        "OneTrainer)")
    parser.add_argument("dst", help="the converted .safetensors file")
    parser.add_argument("--to", choices=FORMATS, default="diffusers", help="output layout")


def run(args) -> int:
    """Entry point of `rectflow convert-lora`."""
    lora, fmt = read_lora(args.src)
    if not str(args.dst).endswith(".safetensors"):
        raise ValueError(f"dst {args.dst}: LoRA files are written as .safetensors")
    write_lora(lora, args.dst, args.to)
    ranks = sorted({a.rank for a in lora.values()})
    print(f"rectflow convert-lora: {args.src} ({fmt}, {len(lora)} layers, rank {'/'.join(map(str, ranks))}) -> "
          f"{args.dst} ({args.to})", file=sys.stderr)
    return 0
