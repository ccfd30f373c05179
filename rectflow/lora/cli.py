"""`rectflow convert-lora IN OUT --to diffusers|kohya|comfy|rectflow`: convert a LoRA between the layouts
(rectflow.lora), exactly: fused qkv <-> separate q, k, v, kohya's and ComfyUI's key names and alpha tensors.
"""
from __future__ import annotations

import sys

from rectflow.lora.formats import FORMATS, read_lora, write_lora


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
