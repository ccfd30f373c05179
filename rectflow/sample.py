"""`rectflow sample`: generate images from prompts, e.g. `rectflow sample --run runs/first --prompt "a red circle"`.

The command line over rectflow.pipeline: the model (`--run DIR`, or `--checkpoint FILE` with `--text-encoder` and
`--autoencoder` for released files, `--lora`), the sampler (flags over the released models' presets,
rectflow.presets), image-to-image, the memory options, and the outputs: a captioned grid and each image beside it,
every PNG with its prompt and settings (rectflow's and an A1111-style `parameters` chunk), which `--from-png`
redraws. docs/sampling.md walks through it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from rectflow.checkpoints import model_hash
from rectflow.devices import resolve_device
from rectflow.images import make_grid, png_info, save_images, to_pil  # noqa: F401  (make_grid, save_images: API)
from rectflow.models.layers import compile_blocks
from rectflow.pipeline import (DEFAULT_SAMPLER, DEFAULTS_FOR_RELEASED, RELEASED_RESOLUTION,  # noqa: F401  (API)
                               Pipeline, encode_images, generate, keep_encoders, load_masks, load_model, load_pipeline,
                               read_metadata, uncond_features)
from rectflow.presets import PRESETS
from rectflow.runs import WEIGHT_FILES, resolve_weights  # noqa: F401  (re-exported)
from rectflow.sampling import SkipLayerGuidance, dynamic_shift

# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow sample` options."""
    src = parser.add_argument_group("model")
    src.add_argument("--run", default=None, help="a training run directory: its config.yaml and latest checkpoint")
    src.add_argument("--checkpoint", default=None, help="a weights file (rectflow safetensors or a released SD3 file) "
                     "or a checkpoint directory")
    src.add_argument("--weights", choices=("ema", "raw"), default=None, help="EMA or raw weights of a run or "
                     "checkpoint directory (default: ema; a directory without ema.safetensors: its model.safetensors); "
                     "an error when the file is absent or --checkpoint names a file")
    src.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a LoRA into the "
                     "model, scaled (default 1): rectflow, diffusers/PEFT, kohya, ComfyUI or OneTrainer layout; "
                     "repeatable")
    src.add_argument("--formulation", default=None, help="forward process (default: the run's; rf for released files)")
    src.add_argument("--text-encoder", default=None, help="text encoder spec (default: the run's)")
    src.add_argument("--autoencoder", default=None, help="autoencoder spec (default: the run's)")
    src.add_argument("--encoders", default=None, help="comma-separated subset of the text encoders to use, e.g. "
                     "clip_l,clip_g for SD3 without T5; absent ones give zeros (default: all)")
    p = parser.add_argument_group("prompts and output")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--init-image", action="append", default=[], metavar="FILE", help="image-to-image: start from "
                   "this image (centre-cropped to the resolution) instead of noise; one for all prompts, or one per "
                   "prompt (repeatable)")
    p.add_argument("--strength", type=float, default=0.6, help="image-to-image: the share of the steps run from the "
                   "noised image (1: all, ignoring the image; diffusers' default 0.6)")
    p.add_argument("--mask", action="append", default=[], metavar="FILE", help="inpainting, with --init-image: "
                   "white redraws, black keeps the image (one for all prompts, or one per prompt)")
    p.add_argument("--from-png", default=None, metavar="FILE", help="redraw an image rectflow sample wrote, from the "
                   "settings in its metadata (bit for bit on the same device); --out names the copy")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="a prompt whose encoding is classifier-free guidance's "
                   "unconditional branch (default: zeros for rectflow runs, the empty prompt \"\" for released "
                   "SD3 files)")
    p.add_argument("--out", default="samples/grid.png", help="the captioned grid; single images are written beside "
                   "it as <stem>_NNN.png")
    s = parser.add_argument_group("sampler (unset values come from --preset, else the defaults shown)")
    s.add_argument("--preset", default="auto", choices=["auto", "none", *PRESETS], help="the released models' "
                   "recommended settings (rectflow.presets, sources in docs/sampling.md); auto: the preset of a "
                   "recognised released checkpoint; none: the defaults")
    s.add_argument("--steps", type=int, default=None, help=f"solver steps (default {DEFAULT_SAMPLER['steps']})")
    s.add_argument("--solver", choices=("euler", "heun", "dpmpp_2m"), default=None,
                   help=f"ODE solver (default {DEFAULT_SAMPLER['solver']})")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = no guidance; "
                   f"default {DEFAULT_SAMPLER['cfg_scale']})")
    s.add_argument("--shift", default=None, help="time-grid shift alpha; auto: the reference shift scaled by "
                   "sqrt(pixels / reference pixels) (docs/paper.md §5); dynamic: diffusers' exp(mu) from the token "
                   "count, on its sd3-dynamic grid; default: the run's training shift, 3.0 for released files")
    s.add_argument("--schedule", choices=("linear", "sd3", "sd3-dynamic"), default=None, help="time grid: linear, "
                   "or sd3 (the released samplers' grid, docs/paper.md §6); default linear for runs, sd3 for released "
                   "files")
    s.add_argument("--slg-layers", default=None, metavar="7,8,9", help="skip-layer guidance: the joint blocks left "
                   "out of the extra conditional forward; none: off (default: the preset's, else off)")
    s.add_argument("--slg-scale", type=float, default=None, help="skip-layer guidance scale (default 2.8)")
    s.add_argument("--slg-start", type=float, default=None, help="skip-layer guidance from this fraction of the "
                   "steps (default 0.01)")
    s.add_argument("--slg-stop", type=float, default=None, help="skip-layer guidance until this fraction of the "
                   "steps (default 0.2)")
    s.add_argument("--t5-length", type=int, default=None, help="T5 tokens of SD3 text encoders (default: the "
                   "preset's 256, else 77)")
    s.add_argument("--no-t5", action="store_true", help="do not load T5: zeros in its place (SD3 was trained to "
                   "accept them; saves T5-XXL's 4.7B parameters)")
    s.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded by seed + i")
    s.add_argument("--batch-size", type=int, default=8, help="images per model batch")
    s.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the run's)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    m = parser.add_argument_group("memory")
    m.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights of every component: bf16 "
                   "halves the memory (and implies --bf16)")
    m.add_argument("--compile", action="store_true", help="torch.compile each transformer block (pays off over many "
                   "steps and images)")
    m.add_argument("--vae-tiling", action="store_true", help="decode the SD3 VAE in tiles (large images)")
    m.add_argument("--keep-text-encoders", action="store_true", help="keep the text encoders loaded while the "
                   "transformer runs (by default they are freed once every prompt is encoded)")


def _shift_value(text) -> float | str | None:
    """--shift: None, 'auto', 'dynamic' or a float."""
    if text is None or text in ("auto", "dynamic"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--shift: expected a number, auto or dynamic, got {text!r}") from None


def check_sampler_args(args) -> None:
    """Reject values the sampler cannot use, naming the flag and the allowed range."""
    shift = _shift_value(args.shift)
    checks = [("--steps", args.steps, args.steps is None or args.steps >= 1, "an integer >= 1"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
              ("--cfg-scale", args.cfg_scale, args.cfg_scale is None or (math.isfinite(args.cfg_scale)
                                                                         and args.cfg_scale >= 0),
               "a finite number >= 0 (1 = no guidance)"),
              ("--shift", args.shift, not isinstance(shift, float) or (math.isfinite(shift) and shift > 0),
               "a finite number > 0, or auto"),
              ("--resolution", args.resolution, args.resolution is None or args.resolution >= 1,
               "a positive number of pixels"),
              ("--t5-length", args.t5_length, args.t5_length is None or args.t5_length >= 1, "an integer >= 1")]
    for flag, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{flag}: expected {expected}, got {value!r}")


def slg_from_args(args, preset_slg: dict | None = None) -> SkipLayerGuidance | None:
    """The skip-layer guidance of --slg-layers/--slg-scale/--slg-start/--slg-stop over the preset's (None: off)."""
    if args.slg_layers is not None and str(args.slg_layers).lower() == "none":
        return None
    base = dict(preset_slg or {})
    if args.slg_layers is not None:
        try:
            base["layers"] = tuple(int(x) for x in str(args.slg_layers).split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--slg-layers: expected block indices like 7,8,9, got {args.slg_layers!r}") from None
    if "layers" not in base:
        return None
    for key in ("scale", "start", "stop"):
        if getattr(args, f"slg_{key}") is not None:
            base[key] = getattr(args, f"slg_{key}")
    return SkipLayerGuidance(**base)


def sampler_settings(args, pipe: Pipeline) -> tuple[dict, SkipLayerGuidance | None]:
    """The sampler of `rectflow sample`: each flag given, else the pipeline's preset, else DEFAULT_SAMPLER; the
    shift's and the grid's defaults depend on the model (runs: their training shift on a linear grid; released
    models and fine-tunes of them: shift 3 on SD3's grid); --shift auto scales the reference shift by
    sqrt(pixels / reference pixels) (docs/paper.md §5)."""
    released = not pipe.train_config or pipe.uncond_prompt == ""
    chosen = PRESETS[pipe.preset] if pipe.preset else {}
    defaults = {**DEFAULT_SAMPLER, "shift": DEFAULTS_FOR_RELEASED["shift"] if released else
                float(pipe.train_config.get("shift", 1.0))}
    settings = {k: getattr(args, k) if getattr(args, k) is not None else chosen.get(k, defaults[k])
                for k in ("steps", "solver", "cfg_scale")}
    shift = _shift_value(args.shift)
    reference = chosen.get("shift", defaults["shift"])
    if shift == "auto":  # the reference shift belongs to the released models' 1024 px, or the run's resolution
        base_side = RELEASED_RESOLUTION if released else int(pipe.train_config.get("resolution", pipe.resolution))
        shift = reference * pipe.resolution / base_side  # sqrt(m / n) for square images of m and n pixels
    default_schedule = DEFAULTS_FOR_RELEASED["schedule"] if released or chosen else "linear"
    if shift == "dynamic":  # diffusers' use_dynamic_shifting: exp(mu) of the image's token count
        tokens = (pipe.resolution // pipe.autoencoder.factor // pipe.model.config.get("patch_size", 1)) ** 2
        shift, default_schedule = dynamic_shift(tokens), "sd3-dynamic"
    settings["shift"] = reference if shift is None else shift
    settings["schedule"] = args.schedule or default_schedule
    settings["seed"] = args.seed
    return settings, slg_from_args(args, chosen.get("slg"))


def read_prompts(args) -> list[str]:
    """--prompt values then --prompts-file lines (blank lines skipped)."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} " + ("is a directory" if path.is_dir() else
                                                                 "does not exist"))
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompts-file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def settings_from_png(path: str | Path) -> tuple[dict, dict]:
    """(rectflow's settings of a PNG that `rectflow sample` wrote, all its text chunks)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-png {path} does not exist")
    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--from-png {path} is not a readable image ({err})") from None
    try:
        settings = {**json.loads(chunks["rectflow"]), "prompt": chunks["prompt"]}
        missing = {"source", "steps", "solver", "cfg_scale", "shift", "seed"} - set(settings)
    except (KeyError, json.JSONDecodeError, TypeError):
        missing = {"rectflow", "prompt"}
    if missing:
        raise ValueError(f"--from-png {path} carries no rectflow sample settings (a single image written by rectflow "
                         f"sample has them; grids and other tools' PNGs do not)") from None
    return settings, chunks


def apply_png(args, settings: dict) -> int:
    """Set every option of `args` to what drew the PNG's image (its whole batch, so that the image comes out bit
    for bit); returns the image's index in that batch."""
    batch = settings.get("batch") or {"prompts": [settings["prompt"]], "seed": settings["seed"], "index": 0}
    slg = settings.get("slg")
    values = {
        "run": None, "checkpoint": settings["source"], "weights": None, "text_encoder": settings.get("text_encoder"),
        "autoencoder": settings.get("autoencoder"), "formulation": settings.get("formulation"),
        "resolution": settings.get("resolution"), "prompt": list(batch["prompts"]), "prompts_file": None,
        "steps": settings["steps"], "solver": settings["solver"], "cfg_scale": settings["cfg_scale"],
        "shift": str(settings["shift"]), "schedule": settings.get("schedule"), "seed": batch["seed"],
        "negative_prompt": settings.get("negative_prompt"),
        "encoders": ",".join(settings.get("encoders") or []) or None,
        "lora": [f"{lo['file']}:{lo['scale']}" for lo in settings.get("loras") or ()], "preset": "none",
        "slg_layers": ",".join(map(str, slg["layers"])) if slg else "none",
        "slg_scale": slg["scale"] if slg else None, "slg_start": slg["start"] if slg else None,
        "slg_stop": slg["stop"] if slg else None, "t5_length": settings.get("t5_length"),
        "no_t5": not settings.get("t5", True), "bf16": settings.get("bf16", False), "batch_size": len(batch["prompts"]),
        "dtype": settings.get("dtype", "fp32"),
        "init_image": list(settings.get("init_images") or ()), "strength": settings.get("strength", 0.6),
        "mask": list(settings.get("masks") or ())}
    for key, value in values.items():
        setattr(args, key, value)
    return batch["index"]


def run(args) -> int:
    """Entry point of `rectflow sample`."""
    png = None
    if args.from_png:
        settings, chunks = settings_from_png(args.from_png)
        png = (apply_png(args, settings), chunks)
    if (args.run is None) == (args.checkpoint is None):
        print("rectflow sample: give exactly one of --run DIR or --checkpoint FILE", file=sys.stderr)
        return 2
    try:
        check_sampler_args(args)
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give the grid's file name, e.g. {args.out}/grid.png")
        prompts = read_prompts(args)
        device = resolve_device(args.device)
        pipe = load_pipeline(args.run, args.checkpoint, args.weights, device, args.formulation, args.text_encoder,
                             args.autoencoder, args.resolution, loras=args.lora,
                             preset=None if args.preset == "none" else args.preset, t5_length=args.t5_length,
                             no_t5=args.no_t5, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
        if args.vae_tiling:
            pipe.autoencoder.enable_tiling()
        if args.compile:
            compile_blocks(pipe.model)
        if pipe.preset:
            print(f"rectflow sample: preset {pipe.preset} ({PRESETS[pipe.preset]['source']}); flags override it",
                  file=sys.stderr)
        encoders = [e.strip() for e in args.encoders.split(",") if e.strip()] if args.encoders else None
        settings, slg = sampler_settings(args, pipe)
        init = encode_images(pipe, args.init_image) if args.init_image else None
        if init is not None:
            settings["strength"] = args.strength
        if args.mask and init is None:
            raise ValueError("--mask: inpainting needs --init-image (the image to keep outside the mask)")
        mask = load_masks(pipe, args.mask) if args.mask else None
        images = generate(pipe, prompts, batch_size=args.batch_size, encoders=encoders,
                          bf16=args.bf16 or args.dtype == "bf16", progress=True, negative_prompt=args.negative_prompt,
                          slg=slg, init_latents=init, release_text=not args.keep_text_encoders, mask=mask,
                          **settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"rectflow sample: {err}", file=sys.stderr)
        return 2
    if png is not None:  # the one image the PNG holds, with the PNG's own metadata
        index, chunks = png
        to_pil(images[index]).save(args.out, pnginfo=png_info(chunks))
        print(f"rectflow sample: redrew {args.from_png} into {args.out}", file=sys.stderr)
        return 0
    uncond = args.negative_prompt if args.negative_prompt is not None else pipe.uncond_prompt
    # weights: what the loaded file says it holds; source: the file itself; enough to redraw it (--from-png)
    meta = {**settings, "weights": pipe.weights, "source": pipe.source, "formulation": pipe.formulation.name,
            "encoders": encoders or list(pipe.text_encoder.encoder_names), "resolution": pipe.resolution,
            "negative_prompt": uncond,  # the prompt encoded for CFG's unconditional branch; null: zeros
            "loras": pipe.loras, "slg": None if slg is None else dataclasses.asdict(slg), "preset": pipe.preset,
            "t5": not args.no_t5, "t5_length": getattr(pipe.text_encoder, "t5_length", None), "bf16": args.bf16,
            "dtype": args.dtype,
            "text_encoder": args.text_encoder or pipe.train_config.get("text_encoder"),
            "autoencoder": args.autoencoder or pipe.train_config.get("autoencoder"),
            "model": Path(pipe.source).stem, "model_hash": model_hash(pipe.source),
            "init_images": [str(Path(p).resolve()) for p in args.init_image],
            "masks": [str(Path(p).resolve()) for p in args.mask]}
    save_images(images, prompts, args.out, meta, batch_size=args.batch_size)
    print(f"rectflow sample: wrote {args.out} and {len(prompts)} images beside it", file=sys.stderr)
    return 0
