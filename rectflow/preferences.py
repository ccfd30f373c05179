"""Preference pairs from a model's own samples, judged exactly (docs/finetune.md "Preference tuning"): for GenEval-
style shapes prompts, draw several images per prompt, let the shapes detector (rectflow.evaluate.geneval) say which
follow the prompt, and pair a correct one (preferred) with an incorrect one (rejected); prompts whose samples are all
right or all wrong give no pair. The paper's human preferences are replaced by an exact judge; the pairs are on-policy.

Prompts are drawn apart from `rectflow eval`'s GenEval prompt set at its default 120 samples (any that coincide are
left out), so an evaluation after DPO measures held-out prompts; the single_object and colors categories have 18
captions each, all in that set, so they give no pairs. Writes OUT/preferences.jsonl (prompt, chosen, rejected, category; the plain
layout `rectflow train --objective dpo --data OUT` reads), OUT/images/, OUT/summary.json and OUT/preview.png.

    rectflow preferences --checkpoint rectflow/assets/default_model --prompts 300 --per-prompt 4 --out data/prefs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rectflow.data.shapes import CATEGORIES, caption_for, eval_prompts
from rectflow.evaluate.geneval import ShapesDetector, is_correct
from rectflow.evaluate.protocol import eval_set
from rectflow.files import write_json, write_text_atomic
from rectflow.images import save_images, to_pil
from rectflow.pipeline import generate, load_pipeline

# the prompts of `rectflow eval --samples 120` (its default) are never used for pairs; single_object and colors have
# 18 captions each, all among them, so those categories give no pairs (their evaluation is never held out)
HELD_OUT = 120


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="a training run (its EMA weights)")
    p.add_argument("--checkpoint", default=None, help="a weights file or checkpoint folder")
    p.add_argument("--data", default="shapes", choices=["shapes"], help="the prompts and the judge: built-in shapes")
    p.add_argument("--prompts", type=int, default=300, help="prompts to try (spread over the GenEval categories)")
    p.add_argument("--per-prompt", type=int, default=4, help="images drawn per prompt")
    p.add_argument("--steps", type=int, default=25, help="Euler steps")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=1, help="seed of the prompts and the noise")
    p.add_argument("--batch", type=int, default=64, help="images sampled at once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="the preference folder to write")


def candidate_prompts(n: int, seed: int, resolution: int) -> list[dict]:
    """n shapes metas (categories interleaved) whose captions are not among rectflow eval's prompts."""
    held = set(eval_set("shapes", resolution, HELD_OUT, 0, {})[0])
    per = -(-n // len(CATEGORIES))
    metas = eval_prompts(2 * per, seed=1000 + seed)  # twice as many: some are held out
    by_category = [[m for m in metas if m["category"] == c and caption_for(m) not in held] for c in CATEGORIES]
    interleaved = [cat[i] for i in range(2 * per) for cat in by_category if i < len(cat)]
    return interleaved[:n]


def run(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --run DIR or --checkpoint PATH")
    if args.per_prompt < 2:
        raise ValueError(f"--per-prompt: a pair needs at least 2 images per prompt, got {args.per_prompt}")
    pipe = load_pipeline(run=args.run, checkpoint=args.checkpoint, device=args.device)
    metas = candidate_prompts(args.prompts, args.seed, pipe.resolution)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    detector, rows, preview = ShapesDetector(), [], []
    judged = {c: [0, 0] for c in CATEGORIES}  # correct, drawn
    per_batch = max(1, args.batch // args.per_prompt)
    for lo in tqdm(range(0, len(metas), per_batch), desc="sampling and judging", unit="batch"):
        group = metas[lo:lo + per_batch]
        prompts = [caption_for(m) for m in group for _ in range(args.per_prompt)]
        images = generate(pipe, prompts, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed * 10**6 + lo * 97,
                          batch_size=len(prompts), shift=pipe.train_config.get("shift", 1.0))
        for g, meta in enumerate(group):
            mine = images[g * args.per_prompt:(g + 1) * args.per_prompt]
            verdicts = [is_correct(meta, detector(im)) for im in mine]
            judged[meta["category"]][0] += sum(verdicts)
            judged[meta["category"]][1] += len(verdicts)
            if all(verdicts) or not any(verdicts):
                continue
            k = len(rows)
            chosen, rejected = mine[verdicts.index(True)], mine[verdicts.index(False)]
            for name, image in ((f"{k:05d}_chosen.png", chosen), (f"{k:05d}_rejected.png", rejected)):
                to_pil(image).save(out / "images" / name)
            rows.append({"prompt": caption_for(meta), "chosen": f"images/{k:05d}_chosen.png",
                         "rejected": f"images/{k:05d}_rejected.png", "category": meta["category"]})
            if len(preview) < 16:
                preview += [(chosen, f"chosen: {caption_for(meta)}"), (rejected, "rejected")]
    write_text_atomic(out / "preferences.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"source": args.run or args.checkpoint, "prompts": len(metas), "per_prompt": args.per_prompt,
               "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed, "pairs": len(rows),
               "pairs_per_category": {c: sum(r["category"] == c for r in rows) for c in CATEGORIES},
               "sample_accuracy": {c: (n / d if d else None) for c, (n, d) in judged.items()}}
    write_json(out / "summary.json", summary)
    if preview:
        save_images(torch.stack([im for im, _ in preview]), [c for _, c in preview], out / "preview.png",
                    {"source": summary["source"]}, singles=False)
    print(f"{out}: {len(rows)} pairs from {len(metas)} prompts x {args.per_prompt} images "
          f"({', '.join(f'{c} {n}' for c, n in summary['pairs_per_category'].items())})")
    return 0
