"""Train the SmallAE shipped as rectflow/assets/shapes_ae.safetensors (autoencoder spec 'shapes-ae') and check it.

4 latent channels, factor 4 (32 px images -> 8 x 8 latents), width 32, 3,000 steps of batch 32 on the endless shapes
stream, L1 + 1e-6 KL (rectflow.autoencoder.train_small_ae): 17 CPU minutes on one thread of the development machine.
The check decodes 200 validation scenes and requires the shapes detector to read every one back exactly.

    python scripts/train_shapes_ae.py [--out rectflow/assets/shapes_ae.safetensors] [--steps 3000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rectflow.autoencoder import SHAPES_AE, train_small_ae
from rectflow.data.shapes import ShapesDataset
from rectflow.evaluate.geneval import ShapesDetector, exact_match


def check(ae, n: int = 200) -> tuple[float, float]:
    """(share of n validation scenes the detector reads back exactly from their reconstructions, PSNR in dB)."""
    val = ShapesDataset(32, split="val")
    items = [val[i] for i in range(n)]
    with torch.no_grad():
        x = torch.stack([it["image"] for it in items])
        rec = ae.decode(ae.encode(x)).clamp(-1, 1)
    det = ShapesDetector()
    exact = sum(exact_match(it["meta"], det(r)) for it, r in zip(items, rec)) / n
    return exact, float(10 * torch.log10(4 / (rec - x).pow(2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHAPES_AE)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    c0 = time.process_time()
    ae = train_small_ae(ShapesDataset(32), channels=4, factor=4, steps=args.steps, batch=32, width=32, seed=0)
    exact, psnr = check(ae)
    print(f"trained in {(time.process_time() - c0) / 60:.1f} CPU minutes; exact read-back {exact:.3f}, "
          f"PSNR {psnr:.1f} dB")
    ae.save(args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
