"""The released models' recommended sampler settings (`rectflow sample --preset`), each with where it comes from.

steps, cfg_scale, solver, shift and skip-layer guidance are Stability AI's reference inference code
(github.com/Stability-AI/sd3.5, sd3_infer.py, CONFIGS; its SD3.5 medium skip-layer config is what --skip_layer_cfg
turns on). Two values are not from there: SD3 medium's shift is 3.0, its diffusers scheduler_config.json value, which
the reference's own comment names for every public model (its CONFIGS entry says 1.0); and the T5 length is
diffusers' StableDiffusion3Pipeline default, max_sequence_length=256 (the reference pads T5 to at least 77 tokens).
Every preset uses SD3's time grid (docs/paper.md §6, diffusers' FlowMatchEulerDiscreteScheduler) and the empty
prompt as classifier-free guidance's unconditional input.

A checkpoint is recognised by its architecture: 24 blocks of width 1536 without QK-norm is SD3 medium, with MMDiT-X
dual attention SD3.5 medium, 38 blocks of width 2432 SD3.5 large (large turbo when its file name says turbo).
"""
from __future__ import annotations

from pathlib import Path

REFERENCE = "Stability-AI/sd3.5 sd3_infer.py CONFIGS"
PRESETS: dict[str, dict] = {
    "sd3-medium": {"steps": 50, "cfg_scale": 5.0, "solver": "dpmpp_2m", "shift": 3.0, "t5_length": 256,
                   "slg": None, "source": f"{REFERENCE}['sd3_medium'] (shift: diffusers' scheduler_config.json)"},
    "sd3.5-medium": {"steps": 50, "cfg_scale": 5.0, "solver": "dpmpp_2m", "shift": 3.0, "t5_length": 256,
                     "slg": {"layers": (7, 8, 9), "scale": 2.5, "start": 0.01, "stop": 0.3},
                     "source": f"{REFERENCE}['sd3.5_medium'] with its skip_layer_config"},
    "sd3.5-large": {"steps": 40, "cfg_scale": 4.5, "solver": "dpmpp_2m", "shift": 3.0, "t5_length": 256,
                    "slg": None, "source": f"{REFERENCE}['sd3.5_large']"},
    "sd3.5-large-turbo": {"steps": 4, "cfg_scale": 1.0, "solver": "euler", "shift": 3.0, "t5_length": 256,
                          "slg": None, "source": f"{REFERENCE}['sd3.5_large_turbo']"},
}
SAMPLER_KEYS = ("steps", "cfg_scale", "solver", "shift")


def recognise(config: dict, path: str | Path | None = None) -> str | None:
    """The preset of a released model's architecture (an MMDiT config), or None for other models."""
    if config.get("arch", "mmdit") != "mmdit" or config.get("in_channels") != 16:
        return None
    depth, hidden, dual = config.get("depth"), config.get("hidden_size"), config.get("dual_attention_layers")
    if (depth, hidden) == (24, 1536):
        return "sd3.5-medium" if dual else "sd3-medium" if config.get("qk_norm") is None else None
    if (depth, hidden) == (38, 2432):
        return "sd3.5-large-turbo" if path is not None and "turbo" in Path(path).name.lower() else "sd3.5-large"
    return None


def preset(name: str) -> dict:
    """The settings of a preset by name (an error lists the names)."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}, auto or none")
    return PRESETS[name]
