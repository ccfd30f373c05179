"""Images as files: tensors to PIL images, captioned grids, and PNGs that carry their prompt and settings as text
metadata (one place for every grid rectflow writes: sample, training samples, evaluation and study figures).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def png_info(fields: dict) -> PngInfo:
    """PNG text chunks: strings as they are, anything else as JSON."""
    info = PngInfo()
    for k, v in fields.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    return info


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def make_grid(images: list[Image.Image], captions: list[str], tile: int = 128, columns: int | None = None,
              caption_lines: int = 3) -> Image.Image:
    """Images scaled (nearest) to tile x tile, each with its caption below, on a white sheet."""
    n = len(images)
    columns = columns or min(n, 8, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    font = ImageFont.load_default(size=11)
    line_h = 13
    cap_h = caption_lines * line_h + 4
    pad = 4
    sheet = Image.new("RGB", (columns * (tile + pad) + pad, rows * (tile + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        x, y = pad + c * (tile + pad), pad + r * (tile + cap_h + pad)
        sheet.paste(img.resize((tile, tile), Image.NEAREST), (x, y))
        lines = _wrap(caption, draw, font, tile)
        if len(lines) > caption_lines:
            lines = lines[:caption_lines - 1] + [lines[caption_lines - 1] + " ..."]
        for k, line in enumerate(lines):
            draw.text((x, y + tile + 2 + k * line_h), line, fill="black", font=font)
    return sheet


SAMPLER_NAMES = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}  # as A1111 / Forge name them


def a1111_parameters(prompt: str, settings: dict, size: tuple[int, int]) -> str:
    """The `parameters` text chunk of AUTOMATIC1111 / Forge / Civitai: the prompt, the negative prompt, then
    'Key: value' pairs (the usual ones first; rectflow's shift, time grid and skip layers after)."""
    lines = [prompt]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    pairs = [("Steps", settings.get("steps")), ("Sampler", SAMPLER_NAMES.get(settings.get("solver"))),
             ("Schedule type", settings.get("schedule")), ("CFG scale", settings.get("cfg_scale")),
             ("Seed", settings.get("seed")), ("Size", f"{size[0]}x{size[1]}"),
             ("Model hash", settings.get("model_hash")), ("Model", settings.get("model")),
             ("Shift", settings.get("shift"))]
    slg = settings.get("slg")
    if slg:
        pairs.append(("Skip layers", f"{','.join(map(str, slg['layers']))} x{slg['scale']} "
                                     f"({slg['start']}-{slg['stop']})"))
    for lora in settings.get("loras") or ():
        pairs.append(("LoRA", f"{Path(lora['file']).stem}:{lora['scale']}"))
    pairs.append(("Version", "rectflow"))
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def save_images(images: torch.Tensor, prompts: list[str], out: str | Path, settings: dict,
                singles: bool = True, batch_size: int | None = None) -> Image.Image:
    """Write the captioned grid to `out` and (singles=True) each image beside it as <stem>_NNN.png, carrying its
    prompt, rectflow's settings (with the prompts of the batch it was drawn in, which `rectflow sample --from-png`
    redraws to reproduce it exactly) and an A1111-style `parameters` chunk."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pils = [to_pil(img) for img in images]
    if singles:
        bs = batch_size or len(prompts)
        for i, (img, prompt) in enumerate(zip(pils, prompts)):
            seed = settings.get("seed", 0) + i
            lo = i - i % bs
            batch = {"prompts": prompts[lo:lo + bs], "seed": settings.get("seed", 0) + lo, "index": i - lo}
            fields = {"prompt": prompt, "rectflow": {**settings, "seed": seed, "batch": batch},
                      "parameters": a1111_parameters(prompt, {**settings, "seed": seed}, img.size)}
            img.save(out.with_name(f"{out.stem}_{i:03d}.png"), pnginfo=png_info(fields))
    grid = make_grid(pils, prompts)
    grid.save(out, pnginfo=png_info({"prompts": prompts, "rectflow": settings}))
    return grid
